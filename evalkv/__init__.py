"""evalkv: evaluate KV-cache eviction methods for long-context LLM inference."""

__version__ = "0.1.0"

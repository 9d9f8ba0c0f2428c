"""evalkv inside other evaluation harnesses: `evalkv.integrations.lm_eval` (lm-evaluation-harness's `evalkv` model)."""

"""Where evalkv keeps things: the cache (models assembled or converted once) and its Hydra configs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$EVALKV_CACHE`, else `$XDG_CACHE_HOME/evalkv`, else `~/.cache/evalkv`."""
    if os.environ.get("EVALKV_CACHE"):
        return Path(os.environ["EVALKV_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "evalkv"


def configs_dir() -> Path:
    """The Hydra configs: inside the installed package (wheel), else the source checkout's top-level `configs/`."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "configs", package.parent / "configs"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"evalkv's configs/ folder is missing (looked in {package} and its parent)")

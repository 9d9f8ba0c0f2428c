"""The one exception type evalkv shows to users: a message that says what was wrong and what to try."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class EvalkvError(Exception):
    """A user-facing error; the CLI prints its message (no traceback) and exits non-zero."""


def did_you_mean(given: str, known: Iterable[str]) -> str:
    """` (did you mean 'snapkv'?)` when a known name is close to the one given, else ``."""
    close = difflib.get_close_matches(str(given), list(known), n=3)
    return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""


def unknown_name(kind: str, name: str, known: Iterable[str], hint: str) -> EvalkvError:
    """`unknown method 'snapkvv' (did you mean 'snapkv'?); known: full, h2o, snapkv (evalkv list methods)`."""
    known = sorted(known)
    return EvalkvError(f"unknown {kind} {name!r}{did_you_mean(name, known)}; known: {', '.join(known)} ({hint})")


def unknown_option(owner: str, option: str, known: Iterable[str]) -> EvalkvError:
    """`method 'snapkv' has no option 'windw_size' (did you mean 'window_size'?); its options: ...`."""
    known = sorted(known)
    return EvalkvError(f"{owner} has no option {option!r}{did_you_mean(option, known)}; its options: "
                       f"{', '.join(known)}")

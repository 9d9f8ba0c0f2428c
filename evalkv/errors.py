"""The one exception type evalkv shows to users: a message that says what was wrong and what to try."""


class EvalkvError(Exception):
    """A user-facing error; the CLI prints its message (no traceback) and exits non-zero."""


def unknown_name(kind: str, name: str, known: list[str], hint: str) -> EvalkvError:
    """`unknown method 'snapkvv'; known: full, h2o, snapkv (evalkv list methods)`."""
    return EvalkvError(f"unknown {kind} {name!r}; known: {', '.join(sorted(known))} ({hint})")

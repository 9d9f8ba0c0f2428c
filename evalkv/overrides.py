"""evalkv's command-line dialect: `key=value` overrides in Hydra's grammar (`model=`, `method=`, `task=`, `budget=`,
`compression_ratio=`, `model.X=`, `method.X=`, `task.X=`, run keys such as `output_dir=`), shared by every command
that configures a model, method or task, and every mistake in them explained in evalkv's own words: an unknown name
or option lists the valid ones with a did-you-mean, a wrong type names the key and the type it takes.

Hydra's override grammar: https://hydra.cc/docs/advanced/override_grammar/basic/
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from evalkv.errors import EvalkvError, did_you_mean, unknown_name, unknown_option

GROUPS = ("model", "method", "task")
SECTIONS = ("cache",)  # run keys with options of their own: cache.quant=, cache.group_size=
EXAMPLES = "e.g. budget=128, method.window_size=8, task.lengths=[1024,2048]"
COMPOSITION_ERRORS = (HydraException, OmegaConfBaseException)  # what compose raises; `explain` words them


def group_choices(group: str) -> list[str]:
    """The names `group=` accepts: the registered methods / tasks (plug-ins included) and the yaml files in
    configs/<group>/ (models; a method or task yaml that carries values)."""
    from evalkv.paths import configs_dir

    names = {path.stem for path in (configs_dir() / group).glob("*.yaml")}
    if group == "method":
        from evalkv.methods import method_names

        names.update(method_names())
    elif group == "task":
        from evalkv.tasks import task_names

        names.update(task_names())
    return sorted(names)


class _GroupChoices:
    """What Hydra's override parser asks a config loader for to expand a `glob(...)` sweep: a group's choices."""

    def get_group_options(self, group: str, results_filter=None, config_name=None, overrides=None) -> list[str]:
        return group_choices(group) if group in GROUPS else []


def parse(overrides: Sequence[str]) -> list[Override]:
    """Hydra's reading of each override; one that does not parse is an EvalkvError naming it."""
    parser = OverridesParser.create(config_loader=_GroupChoices())
    parsed = []
    for text in overrides:
        try:
            parsed.extend(parser.parse_overrides([text]))
        except OverrideParseException as error:
            reason = str(error).splitlines()[1 if "=" not in text else 0].strip()
            raise EvalkvError(f"cannot read the override {text!r} ({reason}); overrides are KEY=VALUE, {EXAMPLES} "
                              "(quote a value with spaces or special characters: key='a b')") from None
    return parsed


@dataclass(frozen=True)
class Dialect:
    """What one command takes of evalkv pred's overrides.

    accepts: exact keys ("model") and prefixes ending in "." ("model." for model.X=); None: every key, Hydra's
    own (hydra.X, hydra/launcher=) included. note: why the command takes no others (shown when one is given).
    """

    command: str
    accepts: tuple[str, ...] | None = None
    note: str = ""

    def takes(self, key: str) -> bool:
        return self.accepts is None or any(
            key == form or (form.endswith(".") and key.startswith(form)) for form in self.accepts)

    def forms(self) -> str:
        """`model=, model.X=, task=, task.X=`."""
        return ", ".join(f"{key}X=" if key.endswith(".") else f"{key}=" for key in self.accepts or ())


PRED = Dialect("pred")


def check(overrides: Sequence[str], dialect: Dialect = PRED, multirun: bool = False) -> list[Override]:
    """Refuse, before any composition, what evalkv's typed configs cannot take: `+key` / `~key` edits, keys the
    command does not take, several values outside a --multirun sweep, and unknown `model=` / `method=` / `task=`
    names. Returns the parsed overrides."""
    parsed = parse(overrides)
    for override in parsed:
        key, text = override.key_or_group, override.input_line
        if override.is_hydra_override():
            if dialect.accepts is not None:
                raise EvalkvError(f"{text}: Hydra's own settings apply to evalkv pred only")
            continue
        if override.is_add() or override.is_force_add() or override.is_delete():
            raise EvalkvError(f"{text}: evalkv's configs are typed, so keys are set, never added or removed; "
                              f"write {key}=VALUE ({EXAMPLES})")
        if not dialect.takes(key):
            note = f" ({dialect.note})" if dialect.note else ""
            raise EvalkvError(f"evalkv {dialect.command} takes {dialect.forms()} overrides; {text} is not one of "
                              f"them{note}")
        if override.is_sweep_override() and not multirun:
            raise EvalkvError(f"{text}: several values make a sweep, which only evalkv pred --multirun runs; a list "
                              f"is written {key}=[a,b] and a string with commas is quoted: {key}='a,b'")
        if key in GROUPS:
            known = group_choices(key)
            values = override.sweep_string_iterator() if override.is_sweep_override() else [override.value()]
            for value in values:
                if value not in known:
                    raise unknown_name(key, value, known, f"evalkv list {key}s")
    return parsed


def sweep_jobs(overrides: Sequence[str]) -> list[list[str]]:
    """The overrides of every job of a --multirun sweep, as Hydra's basic sweeper expands them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    try:
        return BasicSweeper.split_arguments(parse(overrides), None)[0]
    except HydraException as error:  # an interval sweep: for other sweepers than Hydra's basic one
        raise EvalkvError(f"cannot expand the sweep: {error}") from None


def describe_type(kind: Any) -> str:
    """How a message names the values a field takes: `an integer`, `a list of integers`, `a number or null`."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Union:
        inner = [arg for arg in args if arg is not type(None)]
        described = " or ".join(describe_type(arg) for arg in inner)
        return f"{described} or null" if len(inner) < len(args) else described
    if origin in (list, tuple, Sequence) or kind in (list, tuple):
        element = describe_type(args[0]) if args else "a value"
        example = "[1,2]" if element in ("an integer", "a number") else "[a,b]"
        return f"a list of {_plural(element)} such as {example}"
    if origin is dict or kind is dict:
        return "a mapping such as {a:1}"
    if isinstance(kind, type) and issubclass(kind, Enum):
        return f"one of {', '.join(member.name for member in kind)}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(kind, "a value")


def _plural(described: str) -> str:
    return described.removeprefix("an ").removeprefix("a ") + ("" if described.endswith("false") else "s")


def _innermost(error: BaseException) -> BaseException:
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def _input(full_key: str, overrides: Sequence[str]) -> str:
    """The override that set `full_key` or a key below it (the last one), else the key."""
    key = full_key.split("[")[0]
    for text in reversed(overrides):
        given = text.split("=")[0].lstrip("+~")
        if given == key or given.startswith(f"{key}."):
            return text
    return full_key


def _unknown_run_key(key: str, known: list[str], overrides: Sequence[str]) -> EvalkvError:
    text = _input(key, overrides)
    if key in group_choices("method"):  # bench's per-method spelling, given to a command with one method
        return EvalkvError(f"{text}: options of method {key} are written method.X=VALUE with method={key}")
    return EvalkvError(f"unknown key {key!r}{did_you_mean(key, [*known, *GROUPS])}; the keys are model=, method=, "
                       f"task=, their options model.X=, method.X=, task.X=, and {', '.join(sorted(known))}")


def explain(error: Exception, overrides: Sequence[str]) -> EvalkvError:
    """Hydra's or OmegaConf's composition error as evalkv's one-paragraph message (no `+key` advice)."""
    cause = _innermost(error)
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
        object_type = getattr(cause, "object_type", None)
        parent = getattr(cause, "parent_node", None)
        if object_type is not None and dataclasses.is_dataclass(object_type):
            known = [field.name for field in dataclasses.fields(object_type) if field.name != "name"]
        else:
            known = list(parent.keys()) if hasattr(parent, "keys") else []
        group = str(cause.full_key).split(".")[0]
        if group not in (*GROUPS, *SECTIONS) or "." not in str(cause.full_key):  # a top-level key
            return _unknown_run_key(str(cause.key), [key for key in known if key not in GROUPS and key != "hydra"],
                                    overrides)
        name = parent.get("name") if hasattr(parent, "get") else None
        return unknown_option(f"{group} {name!r}" if name else group, str(cause.key), known)
    if isinstance(cause, ValidationError):
        full_key = cause.full_key or str(cause.key)
        object_type = getattr(cause, "object_type", None)
        kind = getattr(cause, "ref_type", None)
        if object_type is not None and dataclasses.is_dataclass(object_type):
            kind = typing.get_type_hints(object_type).get(str(cause.key), kind)
        wanted = describe_type(kind) if kind not in (None, Any) else "another type"
        key = full_key.split("[")[0]
        return EvalkvError(f"{_input(full_key, overrides)}: {key} takes {wanted}, not {cause.value!r}")
    if isinstance(error, MissingConfigException):
        missing = error.missing_cfg_file or ""
        group, _, name = missing.rpartition("/")
        hint = " (install Hydra's SLURM launcher: pip install 'evalkv[slurm]')" if "submitit" in missing else ""
        if error.options:
            return EvalkvError(f"{unknown_name(group, name, error.options, 'evalkv pred --hydra-help')}{hint}")
        return EvalkvError(f"the config {missing} is missing{hint}")
    reason = " ".join(line.strip() for line in str(error).splitlines()
                      if line.strip() and not line.startswith(("To append", "See https")))
    return EvalkvError(f"bad override: {reason or type(error).__name__} ({EXAMPLES})")

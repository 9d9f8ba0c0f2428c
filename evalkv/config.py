"""Typed Hydra configs generated from the registries, and the one function every command composes them with.

The config groups `method/<name>` and `task/<name>` live in Hydra's ConfigStore, generated here from every
registered method's and task's dataclass (plug-ins included: the registries are discovered first): the dataclass's
fields with their defaults plus `name`. So `method=<any registered name>` works without a yaml file, a misspelt
option or a wrong type fails at composition, and the defaults live in one place (the dataclass). Models are yaml
files that carry values (configs/model/*.yaml extend `/schema/model`); a yaml file in configs/method/ or
configs/task/ may add a named variant that carries values (it extends `/method/<name>@_here_`).

`compose_run` is what `evalkv pred` composes (through Hydra's app), and what bench, headmask, train-policy,
plot pattern and demo compose with the same `key=value` overrides (evalkv/overrides.py explains every mistake).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from evalkv.errors import EvalkvError, did_you_mean, unknown_name
from evalkv.kv.quant import QUANTIZERS, Kivi
from evalkv.methods import build_method
from evalkv.methods.base import Method
from evalkv.methods.registry import REGISTRY as METHOD_REGISTRY
from evalkv.models.config import ModelConfig
from evalkv.overrides import COMPOSITION_ERRORS, PRED, Dialect, check, explain, group_choices, parse, sweep_jobs
from evalkv.tasks import Task, build_task
from evalkv.tasks.registry import REGISTRY as TASK_REGISTRY


@dataclass
class CacheConfig:
    """How the cache holds the entries the method keeps (docs/methods.md#kivi).

    quant: none (the model's dtype), kivi2 or kivi4 (KIVI: keys per channel, values per entry, 2 or 4 bits).
    group_size: with KIVI, the entries (keys) or channels (values) that share a scale and a zero point.
    residual: with KIVI, the newest entries kept exact (a multiple of group_size).
    """

    quant: str = "none"
    group_size: int = 32
    residual: int = 128


@dataclass
class RunConfig:
    """The root config of `evalkv pred`.

    budget / compression_ratio: shorthands that fill `method.budget` / `method.compression_ratio`.
    compress: the shorthand that fills `task.compress`: `prompt` compresses each whole prompt, question included (the
        KV-cache papers' protocol, the default); `context` compresses the context alone and feeds the question after
        it without eviction (kvpress's protocol). evalkv/tasks/base.py.
    batch_size: samples whose compressed caches decode together (same shape, a method without per-sample decode
        state); 1 decodes every sample alone. Tokens equal batch size 1 (specs in evalkv/kv/engine.py).
    mlp_chunk: run each layer's MLP over at most this many prompt tokens at a time (null: whole prompt); with an
        evicting method this keeps a 128K-token prefill within a few GB of the weights (docs/performance.md).
    decode_graphs: "auto" replays decode steps as CUDA graphs on CUDA devices, for methods whose cache only grows
        while decoding (evalkv/kv/graphs.py); "compile" replays graphs of a torch.compile'd step for methods with a
        budget (compiled once per batch shape); "off" decodes eagerly.
    output_dir: runs go to `<output_dir>/<task>/<model>/<method label>/` unless `run_dir` names the folder.
    cache: how the kept entries are held (CacheConfig: cache.quant=kivi2 quantises them; the label gets +kivi2).
    """

    model: Any = MISSING
    method: Any = MISSING
    task: Any = MISSING
    budget: Optional[int] = None
    compression_ratio: Optional[float] = None
    compress: str = "prompt"
    output_dir: str = "results"
    run_dir: Optional[str] = None
    progress: bool = True
    batch_size: int = 8
    mlp_chunk: Optional[int] = None
    decode_graphs: str = "auto"
    cache: CacheConfig = field(default_factory=CacheConfig)


def _schema(cls: type, name: str) -> type:
    """A dataclass with a `name` field plus every field of `cls`, with resolved types, for OmegaConf."""
    hints = typing.get_type_hints(cls)
    fields = [("name", str, field(default=name))]
    for item in dataclasses.fields(cls):
        default = (
            field(default_factory=item.default_factory)
            if item.default_factory is not dataclasses.MISSING
            else field(default=item.default)
        )
        fields.append((item.name, hints[item.name], default))
    return dataclasses.make_dataclass(f"{cls.__name__}Config", fields)


_stored: dict[str, type] = {}  # "method/snapkv" -> the class whose config the ConfigStore holds


def register_configs() -> None:
    """Store the run and model schemas and one group config per registered method and task in Hydra's ConfigStore.
    Cheap to call again: only names registered since the last call are stored."""
    store = ConfigStore.instance()
    if not _stored:
        store.store(name="evalkv_run_schema", node=RunConfig)
        store.store(group="schema", name="model", node=ModelConfig)
    for group, registry in (("method", METHOD_REGISTRY), ("task", TASK_REGISTRY)):
        for name in registry.names():
            cls = registry.classes[name]
            if _stored.get(f"{group}/{name}") is cls:
                continue
            try:
                store.store(group=group, name=name, node=_schema(cls, name))
            except OmegaConfBaseException as error:
                raise EvalkvError(
                    f"{group} {name!r} ({cls.__module__}.{cls.__qualname__}) cannot be configured: "
                    f"{str(error).splitlines()[0]}; options take int, float, bool, str, an Enum, Optional of "
                    "those, or lists and dicts of them") from None
            _stored[f"{group}/{name}"] = cls


def compose_run(overrides: Sequence[str], dialect: Dialect = PRED) -> DictConfig:
    """The composed `evalkv pred` config for these overrides (Hydra's composition, without its app machinery).
    Every mistake is an EvalkvError in evalkv's words; `dialect` says what a command other than pred takes."""
    from hydra import compose, initialize_config_dir

    from evalkv.paths import configs_dir

    check(overrides, dialect)
    register_configs()
    try:
        with initialize_config_dir(str(configs_dir()), version_base=None):
            return compose("config", overrides=list(overrides))
    except COMPOSITION_ERRORS as error:
        raise explain(error, overrides) from None


def options(section: DictConfig) -> dict[str, Any]:
    """A composed group config as plain keyword arguments (without its `name`)."""
    values = OmegaConf.to_container(section, resolve=True)
    values.pop("name", None)
    return values


def model_config(cfg: DictConfig) -> ModelConfig:
    return ModelConfig(**options(cfg.model), name=cfg.model.name)


@dataclass
class Run:
    """What a composed config builds before any model loads: every check that needs no model has passed."""

    model: ModelConfig
    method: Method
    task: Task
    quantization: Kivi | None = None  # cache.quant


def quantization(cache: DictConfig | CacheConfig) -> Kivi | None:
    """The KIVI settings of a run's `cache` section, or None (cache.quant=none); a bad value is an EvalkvError."""
    if cache.quant == "none":
        return None
    if cache.quant not in QUANTIZERS:
        raise unknown_name("cache.quant", cache.quant, ["none", *QUANTIZERS], "docs/methods.md#kivi")
    return Kivi(QUANTIZERS[cache.quant], cache.group_size, cache.residual)


def build_run(cfg: DictConfig) -> Run:
    """The model config, method and task of a composed config (cheap: nothing loads); a bad option is an
    EvalkvError from the method's or task's own checks."""
    from evalkv.kv.engine import check_decode_graphs

    if cfg.batch_size < 1:
        raise EvalkvError(f"batch_size must be at least 1 (1 decodes every sample alone), got {cfg.batch_size}")
    check_decode_graphs(cfg.decode_graphs)
    try:  # resolves interpolations such as budget=${oc.env:BUDGET}
        model, method_options, task_options = model_config(cfg), options(cfg.method), options(cfg.task)
    except COMPOSITION_ERRORS as error:
        raise explain(error, []) from None
    method = build_method(cfg.method.name, method_options)
    kivi = quantization(cfg.cache)
    if kivi is not None:
        kivi.check(method)
    return Run(model, method, build_task(cfg.task.name, task_options), kivi)


def check_jobs(overrides: Sequence[str], multirun: bool) -> int:
    """Compose and build the run of these `evalkv pred` overrides, or of every job of their --multirun sweep, so a
    mistake is refused once, before any model loads or any job folder exists. Returns the number of jobs."""
    parsed = check(overrides, multirun=multirun)
    jobs = sweep_jobs(overrides) if multirun else [list(overrides)]
    swept = {override.get_key_element() for override in parsed if override.is_sweep_override()}
    for job in jobs:
        try:
            build_run(compose_run(job))
        except EvalkvError as error:
            if len(jobs) == 1:
                raise
            values = " ".join(text for text in job if text.partition("=")[0] in swept)
            raise EvalkvError(f"in the sweep's job {values}: {error} (nothing ran)") from None
    return len(jobs)


def method_options(name: str) -> list[str]:
    """The options `method.X=` may set for the method choice `name` (a registered name, or a yaml variant)."""
    if name in METHOD_REGISTRY.classes:
        return METHOD_REGISTRY.options(name)
    return sorted(key for key in compose_run([f"method={name}"]).method if key != "name")


def compose_methods(names: Sequence[str], overrides: Sequence[str], dialect: Dialect) -> list[DictConfig]:
    """One composed, built config per method, for commands that compare several (bench, demo). `method.X=V` sets
    option X of every listed method that has it (an error when none has), `NAME.X=V` sets it for method NAME
    alone; every other override applies to each."""
    known = group_choices("method")
    for name in names:
        if name not in known:
            raise unknown_name("method", name, known, "evalkv list methods")
    shared, own, common = [], {name: [] for name in names}, []
    for override in parse(overrides):
        root, dot, option = override.key_or_group.partition(".")
        setting = f"method.{option}={override.get_value_element_as_str()}"
        if dot and root == "method":
            shared.append((option.split(".")[0], setting, override.input_line))
        elif dot and root in own:
            own[root].append(setting)
        elif dot and root in known:
            raise EvalkvError(f"{override.input_line}: {root} is not among the methods ({', '.join(names)})")
        else:
            common.append(override.input_line)
    check([*common, *(text for _, _, text in shared)], dialect)
    fields = {name: method_options(name) for name in names}
    for option, _, text in shared:
        if not any(option in fields[name] for name in names):
            every = sorted({key for name in names for key in fields[name]})
            raise EvalkvError(f"{text}: none of the methods ({', '.join(names)}) has an option {option!r}"
                              f"{did_you_mean(option, every)}; their options: {', '.join(every)}")
    configs = []
    for name in names:
        settings = [setting for option, setting, _ in shared if option in fields[name]]
        cfg = compose_run([*common, f"method={name}", *settings, *own[name]])
        build_run(cfg)
        configs.append(cfg)
    return configs

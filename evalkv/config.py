"""Typed Hydra configs: the root run config and one schema per registered method and task.

configs/method/<name>.yaml and configs/task/<name>.yaml extend `/schema/method/<name>` and `/schema/task/<name>`,
which are generated here from the method's and task's dataclass, so a misspelt option or a wrong type fails at
composition with Hydra's message, and the defaults live in one place (the dataclass).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from evalkv.methods import METHODS
from evalkv.models.config import ModelConfig
from evalkv.tasks import TASKS


@dataclass
class RunConfig:
    """The root config of `evalkv pred`.

    budget / compression_ratio: shorthands that fill `method.budget` / `method.compression_ratio`.
    batch_size: samples whose compressed caches decode together (same shape, a method without per-sample decode
        state); 1 decodes every sample alone. Tokens equal batch size 1 (specs in evalkv/kv/engine.py).
    mlp_chunk: run each layer's MLP over at most this many prompt tokens at a time (null: whole prompt); with an
        evicting method this keeps a 128K-token prefill within a few GB of the weights (docs/performance.md).
    decode_graphs: "auto" replays decode steps as CUDA graphs on CUDA devices, for methods whose cache only grows
        while decoding (evalkv/kv/graphs.py); "compile" replays graphs of a torch.compile'd step for methods with a
        budget (compiled once per batch shape); "off" decodes eagerly.
    output_dir: runs go to `<output_dir>/<task>/<model>/<method label>/` unless `run_dir` names the folder.
    """

    model: Any = MISSING
    method: Any = MISSING
    task: Any = MISSING
    budget: Optional[int] = None
    compression_ratio: Optional[float] = None
    output_dir: str = "results"
    run_dir: Optional[str] = None
    progress: bool = True
    batch_size: int = 8
    mlp_chunk: Optional[int] = None
    decode_graphs: str = "auto"


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


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="evalkv_run_schema", node=RunConfig)
    store.store(group="schema", name="model", node=ModelConfig)
    for name, cls in METHODS.items():
        store.store(group="schema/method", name=name, node=_schema(cls, name))
    for name, cls in TASKS.items():
        store.store(group="schema/task", name=name, node=_schema(cls, name))


def compose_run(overrides: list[str]) -> DictConfig:
    """The composed `evalkv pred` config for these overrides, without running Hydra's app machinery."""
    from hydra import compose, initialize_config_dir

    from evalkv.paths import configs_dir

    register_configs()
    with initialize_config_dir(str(configs_dir()), version_base=None):
        return compose("config", overrides=overrides)


def options(section: DictConfig) -> dict[str, Any]:
    """A composed group config as plain keyword arguments (without its `name`)."""
    values = OmegaConf.to_container(section, resolve=True)
    values.pop("name", None)
    return values

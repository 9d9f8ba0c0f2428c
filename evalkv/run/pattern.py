"""`evalkv plot pattern`'s recomputation: one sample run again under a run's model, method and task, traced.

The model, method and task come from a run directory's `config.yaml` or from `evalkv pred` overrides, the sample from
its id (default: the task's first). Generation is greedy and ignores stop tokens up to decode step `step`, traced by
the engine (`Engine.generate(trace=True)`); the pattern is what each layer's attention read at that step, i.e. what
survived the prompt's compression (step 1) or `step` steps of decode-time eviction. evalkv/report/pattern.py draws it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from evalkv.config import compose_run, model_config, options
from evalkv.errors import EvalkvError
from evalkv.records import CONFIG
from evalkv.report.pattern import Pattern


def pattern_config(arguments: list[str]) -> DictConfig:
    """A run directory's stored config, or the config `evalkv pred` would compose from these overrides."""
    if len(arguments) == 1 and ("=" not in arguments[0] or Path(arguments[0]).is_dir()):  # labels hold "="
        run = Path(arguments[0])
        if not (run / CONFIG).is_file():
            raise EvalkvError(f"{run} is not a run directory (no {CONFIG}); give a run directory or evalkv pred "
                              "overrides such as model=random-tiny-llama method=snapkv budget=64")
        return OmegaConf.load(run / CONFIG)
    unexpected = [argument for argument in arguments if "=" not in argument]
    if unexpected:
        raise EvalkvError(f"expected one run directory or KEY=VALUE overrides, got {' '.join(unexpected)}")
    return compose_run(arguments)


def _rows(layer_entry) -> list[np.ndarray]:
    """One 1-D array of positions per head, from `[B, H, m]` or a list of per-head `[B, 1, m]` tensors."""
    if isinstance(layer_entry, list):
        return [head.reshape(-1).cpu().numpy() for head in layer_entry]
    return [layer_entry[0, h].cpu().numpy() for h in range(layer_entry.shape[1])]


def kept_matrix(attended: list, length: int) -> np.ndarray:
    """bool [layers * heads, length]: True where a layer's head held that position in one traced forward."""
    rows = [positions for layer_entry in attended for positions in _rows(layer_entry)]
    kept = np.zeros((len(rows), length), dtype=bool)
    for row, positions in enumerate(rows):
        kept[row, positions] = True
    return kept


def eviction_pattern(cfg: DictConfig, sample_id: str | None = None, step: int = 1) -> Pattern:
    """Recompute one sample under the config's model, method and task and return what each head held at `step`."""
    from evalkv.kv.engine import Engine
    from evalkv.methods import build_method
    from evalkv.models.loader import load_model
    from evalkv.tasks import build_task

    if step < 1:
        raise EvalkvError(f"--step must be >= 1 (1 = right after the prompt was compressed), got {step}")
    method = build_method(cfg.method.name, options(cfg.method))
    task = build_task(cfg.task.name, options(cfg.task))
    model = load_model(model_config(cfg))
    seen = []
    for sample in task.samples(model):
        if sample_id is None or sample.id == sample_id:
            break
        seen.append(sample.id)
    else:
        shown = ", ".join(seen[:5]) + (", ..." if len(seen) > 5 else "")
        raise EvalkvError(f"task {task.name} has no sample {sample_id!r} (its ids: {shown})")
    engine = Engine(model.model, method, model.backend, model.tokenizer)
    generation = engine.generate(sample.prompt_ids, step + 1, suffix_ids=sample.suffix_ids, trace=True)
    attended = generation.trace[-1]
    length = generation.prompt_tokens + step
    kept = kept_matrix(attended, length)
    label = f"{cfg.model.name} / {method.describe()} / {cfg.task.name}"
    return Pattern(kept, len(attended), kept.shape[0] // len(attended), generation.prompt_tokens, step, sample.id,
                   label)

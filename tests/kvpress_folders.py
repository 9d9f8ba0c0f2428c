"""kvpress evaluation folders written as kvpress's evaluation/evaluate.py writes them, without kvpress.

The format is kvpress 0.5.5's (PyPI sdist; the same code as NVIDIA/kvpress@8bb29b9 up to trust_remote_code), class
`EvaluationRunner`: `EvaluationConfig.get_results_dir` names the folder, `_save_results` writes predictions.csv
(`df[list(set(df.columns) - set(["context"]))].to_csv(..., index=False)`), `_calculate_and_save_metrics` writes
metrics.json (`json.dump(metrics, f, indent=4)`), `EvaluationConfig.save_config` writes config.yaml
(`yaml.dump(config_dict, f, default_flow_style=False, indent=2, sort_keys=False)`, the fields in the dataclass's order,
`threshold` / `head_compression_ratio` dropped when None, `compression_ratio` dropped when either is set). The data set
comes from `load_dataset(...).to_pandas()`, which holds a list column as numpy object arrays: `np.array(list,
dtype=object)` prints the same (checked against datasets 5.2's to_pandas).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

LLAMA = "meta-llama/Meta-Llama-3.1-8B-Instruct"  # kvpress's default model id
# RULER's max_new_tokens per family (kvpress benchmarks/ruler/create_huggingface_dataset.py MAX_NEW_TOKENS).
MAX_NEW_TOKENS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}


def kvpress_folder(root: Path, press_name: str, compression_ratio: float, samples: list[tuple[str, list[str], str]],
                   metrics, *, model: str = LLAMA, dataset: str = "ruler", data_dir: int | str = 4096,
                   query_aware: bool = False, threshold: float | None = None) -> Path:
    """One run's folder; `samples` are (task, answers, predicted answer), `metrics` metrics.json's content."""
    ratio = 0.0 if press_name == "no_press" else compression_ratio  # EvaluationConfig.__post_init__
    components = [dataset, str(data_dir), model.replace("/", "--"), press_name,
                  f"{threshold:.2f}" if threshold is not None else f"{ratio:.2f}"]
    folder = root / "__".join(components + (["query_aware"] if query_aware else []))
    folder.mkdir(parents=True)
    df = pd.DataFrame({
        "context": [f"context {i} " for i in range(len(samples))],
        "question": [f"What is {task}?" for task, _, _ in samples],
        "answer_prefix": [" Answer:"] * len(samples),
        "answer": [np.array(answers, dtype=object) for _, answers, _ in samples],
        "task": [task for task, _, _ in samples],
        "max_new_tokens": [MAX_NEW_TOKENS[task.split("_")[0]] for task, _, _ in samples],
    })
    if query_aware:
        df["context"] = df["context"] + df["question"]
        df["question"] = ""
    df["predicted_answer"] = [prediction for _, _, prediction in samples]
    df["compression_ratio"] = ratio
    df[list(set(df.columns) - {"context"})].to_csv(str(folder / "predictions.csv"), index=False)
    with open(folder / "metrics.json", "w") as handle:
        json.dump(metrics, handle, indent=4)
    config = {
        "dataset": dataset, "data_dir": data_dir, "model": model, "device": "cuda:0", "press_name": press_name,
        "compression_ratio": ratio, "key_channel_compression_ratio": None, "head_compression_ratio": None,
        "threshold": threshold, "fraction": 1.0, "max_new_tokens": None, "max_context_length": None,
        "query_aware": query_aware, "needle_depth": None, "compression_interval": None, "target_size": None,
        "hidden_states_buffer_size": None, "output_dir": "./results", "log_level": "INFO", "model_kwargs": {},
        "trust_remote_code": False, "press_init_command": f"Press(compression_ratio={ratio})", "seed": 42,
        "fp8": False,
    }
    if threshold is not None:
        config.pop("compression_ratio")
    else:
        config.pop("threshold")
    config.pop("head_compression_ratio")
    with open(folder / "config.yaml", "w") as handle:
        yaml.dump(config, handle, default_flow_style=False, indent=2, sort_keys=False)
    return folder

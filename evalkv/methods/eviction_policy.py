"""The learned eviction policy that `learned_mlp` runs and `evalkv train-policy` trains (docs/methods.md#learned_mlp).

One small MLP per layer and KV head maps a cached token's features (its key before RoPE, optionally the log of its
position and the norm of its value) to a logit: how likely the token is among the most attended in the next steps.
All MLPs of a model are held as stacked tensors (`[L, H_kv, in, out]`) and run in one batched matmul.

File format: safetensors (never pickle). Tensors `weight.<i>` `[L, H_kv, in, out]`, `bias.<i>` `[L, H_kv, out]`,
`feature_mean` / `feature_std` `[L, H_kv, F]` (inputs are standardised with the training data's statistics);
metadata key `evalkv_policy` holds JSON: format, version, architecture, features, model geometry, vocabulary size
and a description of the training data.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from evalkv.errors import EvalkvError
from evalkv.kv.view import ModelGeometry

FORMAT = "evalkv-learned-mlp"
VERSION = 1
FEATURES = ("key", "log_position", "value_norm")
_GEOMETRY_FIELDS = ("num_layers", "num_heads", "num_kv_heads", "head_dim")


def token_features(keys_before_rope: Tensor, positions: Tensor, values: Tensor, features: list[str]) -> Tensor:
    """Per-token policy inputs `[B, h, m, F]` fp32 from keys before RoPE `[B, h, m, d]`, positions `[B, h, m]` and
    values `[B, h, m, d]`, in the order of `features` (a subset of FEATURES)."""
    parts = {
        "key": lambda: keys_before_rope.float(),
        "log_position": lambda: torch.log1p(positions.float())[..., None],
        "value_norm": lambda: values.float().norm(dim=-1, keepdim=True),
    }
    return torch.cat([parts[name]() for name in features], dim=-1)


def feature_width(features: list[str], head_dim: int) -> int:
    return sum(head_dim if name == "key" else 1 for name in features)


class EvictionPolicy(torch.nn.Module):
    """Stacked per-(layer, KV head) MLPs: Linear -> ReLU -> ... -> Linear(1), on standardised features."""

    def __init__(self, weights: list[Tensor], biases: list[Tensor], feature_mean: Tensor, feature_std: Tensor,
                 metadata: dict[str, Any]):
        super().__init__()
        self.weights = torch.nn.ParameterList(weights)
        self.biases = torch.nn.ParameterList(biases)
        self.register_buffer("feature_mean", feature_mean)
        self.register_buffer("feature_std", feature_std)
        self.metadata = metadata

    @classmethod
    def initialise(cls, geometry: ModelGeometry, features: list[str], hidden: list[int], seed: int,
                   metadata: dict[str, Any] | None = None) -> EvictionPolicy:
        """Seeded `nn.Linear`-style init (uniform in +-1/sqrt(fan_in)); identity standardisation."""
        unknown = sorted(set(features) - set(FEATURES))
        if unknown or not features:
            raise EvalkvError(f"policy features must be a non-empty subset of {', '.join(FEATURES)}, got {features}")
        generator = torch.Generator().manual_seed(seed)
        width = feature_width(features, geometry.head_dim)
        sizes = [width, *hidden, 1]
        stack = (geometry.num_layers, geometry.num_kv_heads)
        weights, biases = [], []
        for fan_in, fan_out in zip(sizes, sizes[1:]):
            bound = 1 / math.sqrt(fan_in)
            weights.append((torch.rand(*stack, fan_in, fan_out, generator=generator) * 2 - 1) * bound)
            biases.append((torch.rand(*stack, fan_out, generator=generator) * 2 - 1) * bound)
        description = {
            "format": FORMAT, "version": VERSION, "features": list(features),
            "architecture": {"kind": "mlp", "per": "layer and KV head", "hidden": list(hidden), "activation": "relu",
                             "output": "logit"},
            "geometry": {name: getattr(geometry, name) for name in _GEOMETRY_FIELDS},
            **(metadata or {}),
        }
        return cls(weights, biases, torch.zeros(*stack, width), torch.ones(*stack, width), description)

    @property
    def features(self) -> list[str]:
        return self.metadata["features"]

    def logits(self, features: Tensor, layer: int | None = None) -> Tensor:
        """features `[B, H_kv, m, F]` of layer `layer` (or `[L, H_kv, m, F]` for every layer) -> logits `[..., m]`."""
        select = slice(None) if layer is None else layer
        hidden = (features - self.feature_mean[select, :, None]) / self.feature_std[select, :, None]
        for index, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            hidden = hidden @ weight[select] + bias[select][..., None, :]
            if index < len(self.weights) - 1:
                hidden = torch.relu(hidden)
        return hidden[..., 0]

    def check_geometry(self, geometry: ModelGeometry, source: str) -> None:
        stored = self.metadata["geometry"]
        actual = {name: getattr(geometry, name) for name in _GEOMETRY_FIELDS}
        if stored != actual:
            differing = ", ".join(f"{k} {stored.get(k)} vs {actual[k]}" for k in actual if stored.get(k) != actual[k])
            raise EvalkvError(
                f"policy {source} was trained for another model geometry (policy vs this model: {differing}; "
                f"trained on {self.metadata.get('model', 'an unnamed model')}); train one for this model with "
                "`evalkv train-policy model=<this model> ...`"
            )

    def save(self, path: str | Path) -> None:
        """Write the policy as safetensors (atomically: a temporary file renamed into place)."""
        from safetensors.torch import save_file

        tensors = {f"weight.{i}": w.detach().float().cpu().contiguous() for i, w in enumerate(self.weights)}
        tensors |= {f"bias.{i}": b.detach().float().cpu().contiguous() for i, b in enumerate(self.biases)}
        tensors |= {"feature_mean": self.feature_mean.float().cpu().contiguous(),
                    "feature_std": self.feature_std.float().cpu().contiguous()}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
        save_file(tensors, partial, metadata={"evalkv_policy": json.dumps(self.metadata)})
        os.replace(partial, path)

    @classmethod
    def load(cls, path: str | Path) -> EvictionPolicy:
        """Read a policy file written by `save`; every malformed file fails with a message naming it."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise EvalkvError(f"policy file {str(path)!r} not found; train one with `evalkv train-policy model=<model> "
                              "-o policy.safetensors`")
        try:
            with safe_open(str(path), framework="pt") as reader:
                raw = (reader.metadata() or {}).get("evalkv_policy")
                tensors = {name: reader.get_tensor(name) for name in reader.keys()}
        except (SafetensorError, OSError) as error:
            raise EvalkvError(f"policy file {str(path)!r} is not a readable safetensors file: {error}") from None
        try:
            metadata = json.loads(raw or "")
        except json.JSONDecodeError:
            metadata = {}
        if metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
            raise EvalkvError(f"{str(path)!r} is not an evalkv learned_mlp policy (format {FORMAT} version "
                              f"{VERSION}); write one with `evalkv train-policy`")
        try:
            layers = len(metadata["architecture"]["hidden"]) + 1
            weights = [tensors[f"weight.{i}"] for i in range(layers)]
            biases = [tensors[f"bias.{i}"] for i in range(layers)]
            policy = cls(weights, biases, tensors["feature_mean"], tensors["feature_std"], metadata)
            stack = (metadata["geometry"]["num_layers"], metadata["geometry"]["num_kv_heads"])
            width = feature_width(metadata["features"], metadata["geometry"]["head_dim"])
            policy.logits(torch.zeros(*stack, 1, width))  # shapes agree with the metadata
        except (KeyError, TypeError, RuntimeError) as error:
            raise EvalkvError(f"policy file {str(path)!r} is inconsistent with its own metadata: {error}") from None
        return policy.requires_grad_(False)

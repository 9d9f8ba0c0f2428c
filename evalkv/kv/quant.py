"""KIVI: the cache's kept entries held as 2- or 4-bit codes, whatever method chose them (docs/methods.md#kivi).

Based on KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache (Liu, Yuan et al., ICML 2024,
arXiv 2402.02750) and its reference code (github.com/jy-yuan/KIVI at 876b4d2: `quant/new_pack.py`
`triton_quantize_and_pack_along_last_dim`, `unpack_and_dequant_kcache` / `_vcache`; `models/llama_kivi.py`'s cache).

- Asymmetric quantisation of groups of `group_size` numbers: zero point = the group's min, scale = (max - min) /
  (2^bits - 1), code = round((x - min) / scale) clamped to [0, 2^bits - 1], x' = code * scale + min.
- Keys per channel: a group is one channel of `group_size` consecutive entries. Values per token: a group is
  `group_size` consecutive channels of one entry.
- The newest entries stay in the cache's dtype (the residual). Keys: when `residual` entries have gathered, they are
  quantised together (residual / group_size groups per channel), so 0 to residual - 1 keys stay exact after each
  forward. Values: the oldest is quantised as soon as more than `residual` are held, so the newest `residual` stay
  exact. Both rules run after each forward's attention (the reference's order), the prompt's included.

Composition with eviction: a method evicts from the prompt's exact entries (its hooks see the model's tensors), then
`Kivi.settle` quantises what it kept. Quantised groups cannot lose a member, so methods that evict while decoding
(a `before_step` / `after_step` hook) are refused (`check_method`). Methods and the attention read `layer.keys` /
`layer.values` as before: the entries de-quantised on demand, a transient copy of one layer.

Deviations from the reference code: codes are packed 8 // bits to a byte (the reference: 32 // bits to an int32, the
same bytes); scales and zero points are computed in fp32 and stored in the cache's dtype, and codes are computed with
the stored values (the reference computes in fp16); a constant group (max = min) gets codes 0 (the reference divides
by a zero scale); no fused de-quantising kernel (the reference's `cuda_bmm_fA_qB_outer`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from evalkv.errors import EvalkvError
from evalkv.kv.attention import repeat_kv
from evalkv.kv.cache import LayerCache
from evalkv.kv.graphs import decodes_without_hooks

QUANTIZERS = {"kivi2": 2, "kivi4": 4}  # cache.quant= -> bits of keys and values


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Integer codes in [0, 2^bits) `[..., n]` -> uint8 `[..., n * bits / 8]`; the first code in the lowest bits."""
    per_byte = 8 // bits
    grouped = codes.to(torch.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (grouped << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack_codes(packed: Tensor, bits: int) -> Tensor:
    """The inverse of `pack_codes`: uint8 `[..., n * bits / 8]` -> uint8 codes `[..., n]`."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * (8 // bits))


def quantize(x: Tensor, group_size: int, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """KIVI's asymmetric quantisation along the last dimension in groups of `group_size`: x `[..., n]` ->
    (packed codes uint8 `[..., n * bits / 8]`, scale `[..., n / group_size]`, zero point `[..., n / group_size]`),
    scale and zero point in x's dtype."""
    top = (1 << bits) - 1
    groups = x.float().reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale, zero = ((high - low) / top).to(x.dtype), low.to(x.dtype)
    step = scale.float()[..., None]
    codes = ((groups - zero.float()[..., None]) / step.masked_fill(step == 0, 1)).clamp(0, top).round()
    return pack_codes(codes.reshape(x.shape), bits), scale, zero


def dequantize(packed: Tensor, scale: Tensor, zero: Tensor, group_size: int, bits: int) -> Tensor:
    """The numbers `quantize` encoded: `[..., n]` in the scale's dtype."""
    codes = unpack_codes(packed, bits).float()
    groups = codes.reshape(*codes.shape[:-1], codes.shape[-1] // group_size, group_size)
    values = groups * scale.float()[..., None] + zero.float()[..., None]
    return values.reshape(codes.shape).to(scale.dtype)


@dataclass(frozen=True)
class Kivi:
    """How a session quantises its cache (`cache.quant=kivi2|kivi4`, `cache.group_size`, `cache.residual`).

    bits: 2 or 4, for keys and values. group_size: entries (keys) or channels (values) sharing a scale and a zero
    point (KIVI's LongBench runs: 32). residual: the newest entries kept exact, a multiple of group_size (128).
    """

    bits: int
    group_size: int = 32
    residual: int = 128

    def __post_init__(self) -> None:
        if self.bits not in QUANTIZERS.values():
            raise EvalkvError(f"KIVI quantises to 2 or 4 bits, got {self.bits}")
        if self.group_size < 1 or self.group_size % (8 // self.bits):
            raise EvalkvError(f"cache.group_size must be a positive multiple of {8 // self.bits} (codes of "
                              f"{self.bits} bits are packed {8 // self.bits} to a byte), got {self.group_size}")
        if self.residual < self.group_size or self.residual % self.group_size:
            raise EvalkvError(f"cache.residual must be a positive multiple of cache.group_size ({self.group_size}): "
                              f"keys are quantised residual / group_size groups at a time; got {self.residual}")

    @property
    def name(self) -> str:
        """The cache.quant value that asks for these bits: kivi2, kivi4."""
        return f"kivi{self.bits}"

    def check(self, method, head_dim: int | None = None) -> None:
        """Refuse a method that evicts while decoding, and a head dimension that value groups do not divide."""
        if not decodes_without_hooks(method):
            raise EvalkvError(
                f"method {method.name} evicts while decoding (a before_step / after_step hook), which a KIVI cache "
                f"cannot follow: its keys are quantised in groups of {self.group_size} entries that cannot lose a "
                "member. Use a method that compresses the prompt only (snapkv, pyramidkv, adakv, knorm, the full "
                "cache, ...; docs/methods.md#kivi), switch the method's decoding-time eviction off where it has an "
                "option for it (decode_interval=null), or run without cache.quant")
        if getattr(method, "key_channel_ratio", 0):
            raise EvalkvError(
                f"method {method.name} prunes key channels (key_channel_ratio, ThinK), which a KIVI cache does not "
                "hold: its keys are quantised per channel over all of them. Run ThinK without cache.quant, or KIVI "
                "without key_channel_ratio (docs/methods.md#kivi)")
        if getattr(method, "rescore_prompt", None) is not None:
            raise EvalkvError(
                f"method {method.name} re-scores the prompt after it (rescore_prompt, KVzip's replay), which runs "
                "after KIVI has quantised the prompt's keys; run it without cache.quant (docs/methods.md#kivi)")
        if head_dim is not None and head_dim % self.group_size:
            raise EvalkvError(f"cache.group_size={self.group_size} does not divide the model's head dimension "
                              f"{head_dim}: values are quantised in groups of channels; choose a divisor of "
                              f"{head_dim}")

    def settle(self, layer: LayerCache) -> LayerCache:
        """After a forward's attention and hooks: the layer with what KIVI quantises at this point quantised (a new
        `QuantizedLayer` for an exact layer; a ragged layer's heads each become one)."""
        if isinstance(layer, QuantizedLayer):
            layer.settle()
            return layer
        if layer.is_ragged:
            layer.heads = [self.settle(head) for head in layer.heads]
            return layer
        if layer.keys is None:
            return layer
        quantized = QuantizedLayer(self, layer.keys, layer.values, layer.positions, layer.extras)
        quantized.settle()
        return quantized


class QuantizedLayer(LayerCache):
    """A dense layer held as KIVI holds it: quantised keys (per channel, packed along entries), quantised values
    (per entry, packed along channels), and exact residuals of the newest keys and values; positions and method
    state as in `LayerCache`. `keys` / `values` read the entries de-quantised; the entries cannot be evicted."""

    def __init__(self, kivi: Kivi, keys: Tensor, values: Tensor, positions: Tensor, extras: dict[str, Tensor]):
        """An unquantised start: every entry in the residuals (`settle` quantises)."""
        batch, heads, _, dim = keys.shape
        bytes_per_row = dim * kivi.bits // 8
        self.kivi = kivi
        self.key_codes = keys.new_empty(batch, heads, dim, 0, dtype=torch.uint8)  # [B, H, d, m_k * bits / 8]
        self.key_scale = keys.new_empty(batch, heads, dim, 0)  # [B, H, d, m_k / group_size]
        self.key_zero = torch.empty_like(self.key_scale)
        self.key_residual = keys  # [B, H, r_k, d]
        self.value_codes = values.new_empty(batch, heads, 0, bytes_per_row, dtype=torch.uint8)  # [B, H, m_v, .]
        self.value_scale = values.new_empty(batch, heads, 0, dim // kivi.group_size)  # [B, H, m_v, d / group_size]
        self.value_zero = torch.empty_like(self.value_scale)
        self.value_residual = values  # [B, H, r_v, d]
        self.positions = positions
        self.extras = dict(extras)
        self.heads, self.padded = None, False

    _PARTS = ("key_codes", "key_scale", "key_zero", "key_residual", "value_codes", "value_scale", "value_zero",
              "value_residual")

    def _parts(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in self._PARTS}

    @property
    def keys(self) -> Tensor:
        kivi = self.kivi
        quantized = dequantize(self.key_codes, self.key_scale, self.key_zero, kivi.group_size, kivi.bits)
        return torch.cat([quantized.transpose(-1, -2), self.key_residual], dim=-2)

    @property
    def values(self) -> Tensor:
        kivi = self.kivi
        quantized = dequantize(self.value_codes, self.value_scale, self.value_zero, kivi.group_size, kivi.bits)
        return torch.cat([quantized, self.value_residual], dim=-2)

    @property
    def quantized_entries(self) -> tuple[int, int]:
        """(keys, values) held as codes per head; the rest of the `length` entries are exact."""
        return self.key_scale.shape[-1] * self.kivi.group_size, self.value_codes.shape[-2]

    @property
    def length(self) -> int:
        return self.positions.shape[-1]

    @property
    def num_heads(self) -> int:
        return self.positions.shape[1]

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(self.nbytes_of(row) for row in range(self.batch_size))

    def nbytes_of(self, row: int) -> int:
        """Bytes batch row `row` holds: packed codes, scales, zero points and the exact residuals."""
        return sum(part[row].numel() * part.element_size() for part in self._parts().values())

    def settle(self) -> None:
        """Quantise the residual keys in whole blocks of `residual` entries, and the residual values beyond the newest
        `residual` (KIVI's rules, docs/methods.md#kivi). The exact copies quantised are freed."""
        kivi = self.kivi
        whole = self.key_residual.shape[-2] // kivi.residual * kivi.residual
        if whole:
            codes, scale, zero = quantize(self.key_residual[:, :, :whole].transpose(-1, -2), kivi.group_size, kivi.bits)
            self.key_codes = torch.cat([self.key_codes, codes], dim=-1)
            self.key_scale = torch.cat([self.key_scale, scale], dim=-1)
            self.key_zero = torch.cat([self.key_zero, zero], dim=-1)
            self.key_residual = self.key_residual[:, :, whole:].clone()  # a view would keep the quantised rows
        excess = self.value_residual.shape[-2] - kivi.residual
        if excess > 0:
            codes, scale, zero = quantize(self.value_residual[:, :, :excess], kivi.group_size, kivi.bits)
            self.value_codes = torch.cat([self.value_codes, codes], dim=-2)
            self.value_scale = torch.cat([self.value_scale, scale], dim=-2)
            self.value_zero = torch.cat([self.value_zero, zero], dim=-2)
            self.value_residual = self.value_residual[:, :, excess:].clone()

    def append(self, keys: Tensor, values: Tensor, positions: Tensor) -> None:
        """New entries join the residuals (exact until `settle`)."""
        if keys.shape[1] != self.num_heads:  # a cache of query heads (query-head granularity)
            groups = self.num_heads // keys.shape[1]
            keys, values = repeat_kv(keys, groups), repeat_kv(values, groups)
        self.key_residual = torch.cat([self.key_residual, keys], dim=-2)
        self.value_residual = torch.cat([self.value_residual, values], dim=-2)
        new_positions = positions[:, None, :].expand(keys.shape[0], keys.shape[1], positions.shape[-1])
        self.positions = torch.cat([self.positions, new_positions], dim=-1)

    def _with(self, parts: dict[str, Tensor], positions: Tensor, extras: dict[str, Tensor]) -> QuantizedLayer:
        copy = QuantizedLayer.__new__(QuantizedLayer)
        copy.kivi, copy.positions, copy.extras, copy.heads, copy.padded = self.kivi, positions, extras, None, False
        for name, part in parts.items():
            setattr(copy, name, part)
        return copy

    def clone(self) -> QuantizedLayer:
        return self._with({name: part.clone() for name, part in self._parts().items()}, self.positions.clone(),
                          {name: value.clone() for name, value in self.extras.items()})

    @staticmethod
    def stacked(parts: Sequence[QuantizedLayer]) -> QuantizedLayer:
        """`parts` (equal shapes: `shape_key`) as the rows of one batch, in order."""
        first = parts[0]
        return first._with({name: torch.cat([getattr(part, name) for part in parts]) for name in first._PARTS},
                           torch.cat([part.positions for part in parts]),
                           {name: torch.cat([part.extras[name] for part in parts]) for name in first.extras})

    def select_rows(self, rows: Sequence[int]) -> None:
        index = torch.tensor(rows, dtype=torch.long, device=self.positions.device)
        for name, part in self._parts().items():
            setattr(self, name, part.index_select(0, index))
        self.positions = self.positions.index_select(0, index)
        self.extras = {name: value.index_select(0, index) for name, value in self.extras.items()}

    def shape_key(self) -> tuple:
        """What layers of batch rows must share to stack: every part's shape but the batch's, the dtype, device."""
        return ("kivi", self.kivi, tuple(tuple(part.shape[1:]) for part in self._parts().values()),
                self.key_residual.dtype, str(self.positions.device),
                tuple((name, tuple(value.shape[1:])) for name, value in sorted(self.extras.items())))

    def _refuse(self, *args, **kwargs):
        raise RuntimeError("a KIVI-quantised layer cannot evict, gather or expand its entries (its key groups span "
                           f"{self.kivi.group_size} entries); methods that evict while decoding are refused with "
                           "cache.quant (docs/methods.md#kivi)")

    keep = keep_per_head = expand_heads = stack_rows = _refuse

"""Load a model and its tokenizer from a model config: hub id or local folder, GGUF file, the embedded model, or a
random-init architecture preset. Weights load from safetensors or GGUF only (never pickles); remote code runs only
when the config asks for it."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from evalkv.errors import EvalkvError
from evalkv.kv.attention import BACKENDS
from evalkv.models.config import ModelConfig
from evalkv.models.embedded import embedded_gguf, sha256_of
from evalkv.models.presets import build_random_model, byte_tokenizer
from evalkv.paths import cache_dir

# End-of-turn tokens of common chat templates; those that are special tokens of a tokenizer stop generation.
END_OF_TURN_TOKENS = (
    "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "<|im_end|>", "<|endoftext|>", "</s>", "<end_of_turn>",
    "<|end|>", "<|eos|>",
)

# Marks where a rendered prompt's context ends (private-use characters no prompt holds): see encode_rendered.
SPLIT_MARKER = "\ue000evalkv-split\ue000"

SOURCES = ("hub", "gguf", "embedded", "random")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's placement strategies


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module
    tokenizer: object
    backend: str  # attention backend inside evalkv's attention: sdpa | eager | flash_attention_2
    max_prompt_length: int | None
    stop_token_ids: list[int]
    description: str  # what was loaded, for run.json

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def chat_text(self, text: str) -> str:
        """`text` as one user turn with the model's chat template, followed by the assistant's generation prompt."""
        if not self.has_chat_template:
            raise EvalkvError(f"model {self.name} has no chat template; set the task's chat_template=false")
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )

    def _tokenize(self, text: str, chat: bool, **options):
        # A chat template writes its own BOS; plain text gets the tokenizer's default special tokens.
        return self.tokenizer(text, add_special_tokens=not chat, **options)

    def encode_prompt(self, text: str, chat: bool = False) -> list[int]:
        """Token ids of `text`, wrapped as one user turn with the model's chat template when `chat`."""
        return self._tokenize(self.chat_text(text) if chat else text, chat)["input_ids"]

    def encode_parts(self, text: str, context_end: int, chat: bool = False,
                     split: bool = True) -> tuple[list[int], list[int] | None]:
        """`encode_prompt(text, chat)`; with `split`, cut in two where `text[:context_end]` ends (the chat template's
        opening goes with the first part, its closing with the second). See `encode_rendered`."""
        def render(marker: str) -> str:
            marked = text[:context_end] + marker + text[context_end:]
            return self.chat_text(marked) if chat else marked

        return self.encode_rendered(render, special_tokens=not chat, split=split)

    def encode_rendered(self, render: Callable[[str], str], special_tokens: bool,
                        split: bool = True) -> tuple[list[int], list[int] | None]:
        """The token ids of the prompt `render("")`: `(ids, None)`, or with `split`, `(context ids, question ids)` cut
        where `render(SPLIT_MARKER)` puts the marker. The rendered prompt is tokenized once (`special_tokens`: the
        tokenizer adds its own, such as a BOS), so the two parts concatenate to exactly the whole prompt's ids; a
        token that straddles the cut goes to the second part. A renderer that changes the text around the marker (a
        chat template that strips or rewrites the user's text) cannot be split."""
        rendered = render("")
        if not split:
            return self.tokenizer(rendered, add_special_tokens=special_tokens)["input_ids"], None
        marked = render(SPLIT_MARKER)
        position = marked.find(SPLIT_MARKER)
        if position < 0 or marked.replace(SPLIT_MARKER, "", 1) != rendered:
            raise EvalkvError(
                f"the chat template of model {self.name} rewrites the prompt, so its context and question cannot be "
                "fed separately; use compress=prompt, or set the task's chat_template=false"
            )
        if not getattr(self.tokenizer, "is_fast", False):
            raise EvalkvError(f"model {self.name}: compress=context splits each prompt by character offsets, which "
                              "needs a fast tokenizer; use compress=prompt")
        encoded = self.tokenizer(rendered, add_special_tokens=special_tokens, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        cut = next((index for index, (_, end) in enumerate(offsets) if end > position), len(ids))
        return ids[:cut], ids[cut:]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalkvError(f"model.device={device} but no CUDA GPU is visible; use model.device=cpu or auto")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise EvalkvError(f"unknown dtype {dtype!r}; known: auto, {', '.join(table)}")
    return table[dtype]


def special_token_ids(tokenizer) -> dict[str, int]:
    """The tokenizer's special tokens (its named ones and every added token marked special), text -> id."""
    special = {token.content: int(index) for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    special.update(zip(tokenizer.all_special_tokens, map(int, tokenizer.all_special_ids)))
    return special


def stop_token_ids(tokenizer, model) -> list[int]:
    """Every end-of-turn token: the generation config's and the tokenizer's EOS, plus those of END_OF_TURN_TOKENS that
    are special tokens of this tokenizer. An ordinary vocabulary entry never stops generation, though it spells an
    end-of-turn token elsewhere (Qwen2.5's `</s>` is plain text that a model may write)."""
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        ids.extend(value if isinstance(value, list) else [value] if value is not None else [])
    special = special_token_ids(tokenizer)
    ids.extend(special[token] for token in END_OF_TURN_TOKENS if token in special)
    return sorted(set(int(i) for i in ids))


def fix_chat_template_kwargs(tokenizer, cfg: ModelConfig) -> None:
    """Render every chat prompt with `cfg.chat_template_kwargs`: each becomes a `{% set %}` at the top of the
    tokenizer's chat template, so every caller of `apply_chat_template` (`chat_text`, RULER's and needle's wrappers)
    gets it and none can forget it. Values are booleans, numbers or strings."""
    variables = dict(cfg.chat_template_kwargs or {})
    if not variables:
        return
    templates = getattr(tokenizer, "chat_template", None)
    if not templates:
        raise EvalkvError(f"model {cfg.name}: chat_template_kwargs {variables} given, but its tokenizer has no chat "
                          "template; remove them")
    for name, value in variables.items():
        if not name.isidentifier() or not isinstance(value, (bool, int, float, str)):
            raise EvalkvError(f"model {cfg.name}: chat_template_kwargs.{name}={value!r}: expected a template variable "
                              "name set to a boolean, number or string")
    prefix = "".join(f"{{% set {name} = {json.dumps(value)} %}}" for name, value in variables.items())
    if isinstance(templates, dict):  # named templates (default, tool_use, ...)
        tokenizer.chat_template = {key: prefix + template for key, template in templates.items()}
    else:
        tokenizer.chat_template = prefix + templates


def _hub_kwargs(cfg: ModelConfig) -> dict:
    return {"trust_remote_code": cfg.trust_remote_code, "revision": cfg.revision}


def _load_pretrained(path: str, cfg: ModelConfig, dtype, device, **kwargs):
    from transformers import AutoModelForCausalLM

    device_map = cfg.device_map or (str(device) if device.type != "cpu" else None)
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, device_map=device_map, attn_implementation="sdpa", **kwargs,
    )


def _check_device_map(cfg: ModelConfig) -> None:
    if cfg.device_map not in DEVICE_MAPS:
        raise EvalkvError(f"unknown model.device_map {cfg.device_map!r}; known: {', '.join(DEVICE_MAPS)}")
    if cfg.device != "auto":
        raise EvalkvError(
            f"model.device={cfg.device} and model.device_map={cfg.device_map} both place the model; set one "
            "(device_map spreads it over every visible GPU; choose them with CUDA_VISIBLE_DEVICES)"
        )
    if cfg.source == "random":
        raise EvalkvError(
            f"model {cfg.name}: model.device_map applies to models loaded from weights (source hub, gguf or "
            "embedded); a random-init model goes on model.device"
        )


def placement(model: torch.nn.Module) -> str:
    """Where the model's weights sit: `cuda:0`, or `cuda:0, cuda:1` for a model spread by a device_map."""
    devices = {str(parameter.device) for parameter in model.parameters()}
    return ", ".join(sorted(devices))


def _converted_gguf(gguf: Path, cfg: ModelConfig) -> Path:
    """A safetensors copy of a GGUF model's de-quantised weights, made once and cached by the file's sha256.

    De-quantising a GGUF file takes about a minute on two CPU cores; the copy loads in seconds.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = sha256_of(gguf)
    target = cache_dir() / "converted" / digest[:32]
    if (target / "evalkv-source.json").is_file():
        return target
    print(f"evalkv: de-quantising {gguf.name} into fp32 safetensors in {target} (once; about a minute on two CPU "
          "cores)", file=sys.stderr, flush=True)
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer.save_pretrained(partial)
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (partial / "config.json").write_text(json.dumps(config, indent=2))
        model.generation_config.save_pretrained(partial)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, partial / "model.safetensors")
        (partial / "evalkv-source.json").write_text(json.dumps({"gguf": gguf.name, "sha256": digest}))
        if target.exists():
            shutil.rmtree(partial)
        else:
            os.replace(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def load_model(cfg: ModelConfig) -> LoadedModel:
    from transformers import AutoTokenizer

    if cfg.source not in SOURCES:
        raise EvalkvError(f"model {cfg.name}: unknown source {cfg.source!r}; known: {', '.join(SOURCES)}")
    if cfg.attn_implementation not in BACKENDS:
        raise EvalkvError(f"unknown attn_implementation {cfg.attn_implementation!r}; known: {', '.join(BACKENDS)}")
    if cfg.attn_implementation == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            raise EvalkvError(
                "attn_implementation=flash_attention_2 needs flash-attn: pip install 'evalkv[flash]'"
            ) from None
    if cfg.device_map is not None:
        _check_device_map(cfg)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)

    if cfg.source == "random":
        if not cfg.architecture:
            raise EvalkvError(f"model {cfg.name}: source=random needs model.architecture (evalkv list models)")
        model = build_random_model(cfg.architecture, dtype, device, cfg.seed)
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer) if cfg.tokenizer else byte_tokenizer()
        description = f"random-init {cfg.architecture} (seed {cfg.seed})"
    elif cfg.source in ("gguf", "embedded"):
        gguf = embedded_gguf() if cfg.source == "embedded" else Path(cfg.path or "")
        if not gguf.is_file():
            raise EvalkvError(f"model {cfg.name}: GGUF file {str(gguf)!r} not found (set model.path)")
        folder = _converted_gguf(gguf, cfg)
        model = _load_pretrained(str(folder), cfg, dtype, device, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        description = f"GGUF {gguf.name} (sha256 {sha256_of(gguf) if cfg.source == 'gguf' else 'verified'})"
    else:
        if not cfg.path:
            raise EvalkvError(f"model {cfg.name}: source=hub needs model.path (a hub id or a local folder)")
        if cfg.path.startswith((".", "/")) and not Path(cfg.path).exists():
            raise EvalkvError(f"model {cfg.name}: local model folder {cfg.path!r} does not exist")
        try:
            tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.path, **_hub_kwargs(cfg))
            model = _load_pretrained(cfg.path, cfg, dtype, device, use_safetensors=True, **_hub_kwargs(cfg))
        except OSError as error:
            raise EvalkvError(f"model {cfg.name}: cannot load {cfg.path!r}: {error}") from None
        description = f"{cfg.path}" + (f"@{cfg.revision}" if cfg.revision else "")
    fix_chat_template_kwargs(tokenizer, cfg)
    model.eval()
    if cfg.device_map is None and model.device != device:
        model.to(device)
    return LoadedModel(
        name=cfg.name, model=model, tokenizer=tokenizer, backend=cfg.attn_implementation,
        max_prompt_length=cfg.max_prompt_length, stop_token_ids=stop_token_ids(tokenizer, model),
        description=f"{description}, {str(dtype).removeprefix('torch.')} on "
        + (f"{placement(model)} (device_map={cfg.device_map})" if cfg.device_map else str(device)),
    )

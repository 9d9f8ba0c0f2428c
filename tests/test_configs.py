"""Every method and task registered in code has a Hydra config that composes into its typed schema."""

from __future__ import annotations

import dataclasses

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from evalkv.config import options, register_configs
from evalkv.methods import METHODS, build_method
from evalkv.models.config import ModelConfig
from evalkv.paths import configs_dir
from evalkv.tasks import TASKS, build_task

register_configs()


def _compose(*overrides: str):
    with initialize_config_dir(str(configs_dir()), version_base=None):
        return compose("config", overrides=list(overrides))


def test_config_files_match_the_registries():
    assert {p.stem for p in (configs_dir() / "method").glob("*.yaml")} == set(METHODS)
    assert {p.stem for p in (configs_dir() / "task").glob("*.yaml")} == set(TASKS)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_config_composes_to_the_dataclass_defaults(name):
    cfg = _compose(f"method={name}", "budget=1024")
    assert cfg.method.name == name
    method = build_method(name, options(cfg.method))
    default = METHODS[name](budget=1024) if METHODS[name].needs_budget else METHODS[name]()
    assert dataclasses.replace(default, budget=method.budget) == method


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_config_composes(name):
    cfg = _compose(f"task={name}")
    assert build_task(name, options(cfg.task)) == TASKS[name]()


@pytest.mark.parametrize("path", sorted((configs_dir() / "model").glob("*.yaml")), ids=lambda p: p.stem)
def test_model_configs_are_typed(path):
    overrides = [f"model={path.stem}"] + (["model.path=x"] if path.stem in ("hf", "gguf") else [])
    cfg = _compose(*overrides)
    model = ModelConfig(**options(cfg.model), name=cfg.model.name)
    assert model.name == path.stem
    assert OmegaConf.get_type(cfg.model).__name__ == "ModelConfig"


def test_typos_and_wrong_types_fail_at_composition():
    with pytest.raises(Exception, match="window_sizee"):
        _compose("method=snapkv", "method.window_sizee=3")
    with pytest.raises(Exception, match="window_size"):
        _compose("method=snapkv", "method.window_size=abc")


def test_budget_shorthand_fills_the_method():
    assert _compose("method=h2o", "budget=96").method.budget == 96
    assert _compose("method=h2o", "compression_ratio=0.5").method.compression_ratio == 0.5


# The end of Qwen3's chat template: the assistant turn opens with an empty think block when thinking is off.
QWEN3_GENERATION_PROMPT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def test_qwen3_renders_its_chat_prompts_without_thinking():
    from evalkv.models.loader import fix_chat_template_kwargs
    from evalkv.models.presets import byte_tokenizer

    cfg = _compose("model=qwen3-8b").model
    assert options(cfg)["chat_template_kwargs"] == {"enable_thinking": False}
    qwen_like = byte_tokenizer()
    qwen_like.chat_template = QWEN3_GENERATION_PROMPT
    messages = [{"role": "user", "content": "hi"}]
    assert "<think>" not in qwen_like.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    fix_chat_template_kwargs(qwen_like, ModelConfig(**options(cfg), name=cfg.name))
    assert qwen_like.apply_chat_template(messages, tokenize=False, add_generation_prompt=True).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")


@pytest.mark.parametrize("kwargs", [{"enable thinking": False}, {"enable_thinking": [False]}])
def test_malformed_chat_template_kwargs_are_refused(kwargs):
    from evalkv.errors import EvalkvError
    from evalkv.models.loader import fix_chat_template_kwargs
    from evalkv.models.presets import byte_tokenizer

    with pytest.raises(EvalkvError, match="chat_template_kwargs"):
        fix_chat_template_kwargs(byte_tokenizer(), ModelConfig(name="m", chat_template_kwargs=kwargs))

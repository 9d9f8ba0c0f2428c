"""Every method and task registered in code is a Hydra config group option generated from its dataclass (no yaml),
and composes into its typed schema; models are yaml files that carry values."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from evalkv.cli import main
from evalkv.config import compose_run, options, register_configs
from evalkv.methods import METHODS, build_method
from evalkv.models.config import ModelConfig
from evalkv.overrides import group_choices
from evalkv.paths import configs_dir
from evalkv.tasks import TASKS, build_task


def test_method_and_task_groups_come_from_the_registries_not_yaml():
    register_configs()
    store = ConfigStore.instance()
    assert {name.removesuffix(".yaml") for name in store.list("method")} >= set(METHODS)
    assert {name.removesuffix(".yaml") for name in store.list("task")} >= set(TASKS)
    assert group_choices("method") == sorted(METHODS) and group_choices("task") == sorted(TASKS)
    # A yaml file in these groups must carry values; none does today.
    assert not list(configs_dir().glob("method/*.yaml")) and not list(configs_dir().glob("task/*.yaml"))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_config_composes_to_the_dataclass_defaults(name):
    cfg = compose_run([f"method={name}", "budget=1024"])
    assert cfg.method.name == name
    method = build_method(name, options(cfg.method))
    default = METHODS[name](budget=1024) if METHODS[name].needs_budget else METHODS[name]()
    assert dataclasses.replace(default, budget=method.budget) == method


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_config_composes(name):
    cfg = compose_run([f"task={name}"])
    assert build_task(name, options(cfg.task)) == TASKS[name]()


@pytest.mark.parametrize("path", sorted((configs_dir() / "model").glob("*.yaml")), ids=lambda p: p.stem)
def test_model_configs_are_typed(path):
    overrides = [f"model={path.stem}"] + (["model.path=x"] if path.stem in ("hf", "gguf") else [])
    cfg = compose_run(overrides)
    model = ModelConfig(**options(cfg.model), name=cfg.model.name)
    assert model.name == path.stem
    assert OmegaConf.get_type(cfg.model).__name__ == "ModelConfig"


def test_budget_shorthand_fills_the_method():
    assert compose_run(["method=h2o", "budget=96"]).method.budget == 96
    assert compose_run(["method=h2o", "compression_ratio=0.5"]).method.compression_ratio == 0.5


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

    cfg = compose_run(["model=qwen3-8b"]).model
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


def test_a_yaml_variant_carries_values_over_a_generated_config(tmp_path, monkeypatch, capsys):
    shutil.copytree(configs_dir(), tmp_path / "configs")
    (tmp_path / "configs" / "method").mkdir()
    (tmp_path / "configs" / "method" / "snapkv_w8.yaml").write_text(
        "# SnapKV with an 8-token window\ndefaults: [/method/snapkv@_here_, _self_]\nwindow_size: 8\n")
    monkeypatch.setattr("evalkv.paths.configs_dir", lambda: tmp_path / "configs")
    cfg = compose_run(["method=snapkv_w8", "budget=64"])
    assert build_method(cfg.method.name, options(cfg.method)) == METHODS["snapkv"](budget=64, window_size=8)
    assert compose_run(["method=snapkv_w8", "budget=64", "method.window_size=4"]).method.window_size == 4
    assert main(["list", "methods"]) == 0
    listed = {line.split(maxsplit=1)[0]: line.split(maxsplit=1)[1] for line in capsys.readouterr().out.splitlines()}
    assert listed["snapkv_w8"] == "SnapKV with an 8-token window"

"""learned_mlp and `evalkv train-policy` (docs/methods.md#learned_mlp): the policy file, training, the rules."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import prompt_ids, tiny_model
from method_cases import TINY_POLICY
from single_layer import GEOMETRY, SingleLayer

from evalkv.cli import main
from evalkv.errors import EvalkvError
from evalkv.kv.engine import Engine
from evalkv.kv.view import ModelGeometry, Phase
from evalkv.methods import build_method
from evalkv.methods.eviction_policy import EvictionPolicy, token_features
from evalkv.methods.learned_mlp import SCORE
from evalkv.records import read_records
from evalkv.run.train_policy import TrainingOptions, fit, top_overlap

TINY = ["model=random-tiny-llama", "model.device=cpu", "progress=false"]
TINY_GEOMETRY = ModelGeometry(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)


def test_train_policy_runs_end_to_end_and_pred_uses_the_policy(tmp_path, capsys):
    policy_path = tmp_path / "policy.safetensors"
    assert main(["train-policy", *TINY, "task.lengths=[256]", "task.depths=[0,50,100]", "--steps", "4",
                 "--top", "16", "--epochs", "2", "-o", str(policy_path)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(policy_path)
    policy = EvictionPolicy.load(policy_path)
    meta = policy.metadata
    assert meta["geometry"] == {"num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16}
    assert meta["features"] == ["key", "value_norm"] and meta["architecture"]["hidden"] == [128, 64]
    training = meta["training"]
    assert training["task"]["seed"] == 1729  # not passkey's evaluation seed
    assert (training["prompts"], training["held_out_prompts"]) == (2, 1)
    assert 0 <= training["held_out_top_overlap"] <= 1 and training["final_loss"] > 0
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # written atomically, no leftovers

    assert main(["pred", *TINY, "method=learned_mlp", f"method.policy_path={policy_path}", "budget=64",
                 "method.window_size=8", "task.lengths=[256]", "task.n_samples=1",
                 f"output_dir={tmp_path / 'results'}"]) == 0
    run = capsys.readouterr().out.strip().splitlines()[-1]
    assert "policy_path=policy.safetensors" in run  # the run directory names the file, not its folders
    assert read_records(f"{run}/predictions.jsonl")[0]["kept_tokens"] == 64


def test_train_policy_refuses_method_overrides(capsys):
    assert main(["train-policy", *TINY, "method=snapkv", "-o", "x.safetensors"]) == 2
    assert "full cache" in capsys.readouterr().err


def test_policy_learns_which_keys_get_attention():
    """Targets that depend on a simple key feature (|k . u| for a direction u per layer and head) are learned:
    the trained policy's top C on held-out keys recovers most of the true top C (chance: C / m)."""
    generator = torch.Generator().manual_seed(0)
    geometry = ModelGeometry(num_layers=2, num_heads=2, num_kv_heads=2, head_dim=8)
    keys = torch.randn(2, 2, 3000, 8, generator=generator)
    directions = torch.nn.functional.normalize(torch.randn(2, 2, 8, generator=generator), dim=-1)
    target = (keys @ directions[..., None])[..., 0].abs()
    features = token_features(keys, torch.zeros(2, 2, 3000), keys, ["key"])
    labels = torch.zeros(2, 2, 2000).scatter_(-1, target[..., :2000].topk(200).indices, 1.0)
    policy = EvictionPolicy.initialise(geometry, ["key"], [32], seed=0)
    losses = fit(policy, features[:, :, :2000], labels, TrainingOptions(epochs=20, lr=1e-2, batch_size=250))
    assert losses[-1] < 0.3 * losses[0]
    held_out = top_overlap(policy, features[:, :, 2000:], target[..., 2000:], 100)
    assert held_out > 0.7  # chance: 100 / 1000


def test_training_is_deterministic():
    generator = torch.Generator().manual_seed(1)
    features, labels = torch.randn(1, 2, 300, 9, generator=generator), torch.rand(1, 2, 300, generator=generator)
    geometry = ModelGeometry(num_layers=1, num_heads=2, num_kv_heads=2, head_dim=8)
    weights = []
    for _ in range(2):
        policy = EvictionPolicy.initialise(geometry, ["key", "log_position"], [8], seed=3)
        fit(policy, features, labels.round(), TrainingOptions(epochs=2, batch_size=64, seed=5))
        weights.append([w.detach().clone() for w in policy.weights])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


def test_policy_file_roundtrip_is_safetensors_with_json_metadata(tmp_path):
    policy = EvictionPolicy.initialise(TINY_GEOMETRY, ["key", "log_position", "value_norm"], [8, 4], seed=0,
                                       metadata={"model_config": "random-tiny-llama"})
    path = tmp_path / "p.safetensors"
    policy.save(path)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as reader:
        assert set(reader.keys()) == {"weight.0", "weight.1", "weight.2", "bias.0", "bias.1", "bias.2",
                                      "feature_mean", "feature_std"}
        assert json.loads(reader.metadata()["evalkv_policy"])["model_config"] == "random-tiny-llama"
    loaded = EvictionPolicy.load(path)
    features = torch.randn(1, 2, 5, 18)
    torch.testing.assert_close(loaded.logits(features, 1), policy.logits(features, 1))


def test_mismatched_geometry_fails_with_a_clear_message(tmp_path, tokenizer):
    path = tmp_path / "other.safetensors"
    other = ModelGeometry(num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16)
    EvictionPolicy.initialise(other, ["key"], [8], seed=0, metadata={"model": "a 3-layer model"}).save(path)
    method = build_method("learned_mlp", {"budget": 64, "policy_path": str(path)})
    with pytest.raises(EvalkvError, match=r"another model geometry \(policy vs this model: num_layers 3 vs 2; "
                                          r"trained on a 3-layer model\)"):
        Engine(tiny_model(), method, tokenizer=tokenizer).generate(prompt_ids(tokenizer), 2)


def test_policy_for_another_vocabulary_is_refused(tmp_path, tokenizer):
    path = tmp_path / "vocab.safetensors"
    EvictionPolicy.initialise(TINY_GEOMETRY, ["key"], [8], seed=0, metadata={"vocab_size": 32000}).save(path)
    with pytest.raises(EvalkvError, match="32000-token vocabulary"):
        Engine(tiny_model(), build_method("learned_mlp", {"budget": 64, "policy_path": str(path)}), tokenizer=tokenizer)


def test_bad_policy_files_fail_clearly(tmp_path):
    from safetensors.torch import save_file

    def prepare(path):
        build_method("learned_mlp", {"budget": 64, "policy_path": path}).prepare(None)

    with pytest.raises(EvalkvError, match="needs a policy file: method.policy_path="):
        build_method("learned_mlp", {"budget": 64}).prepare(None)
    with pytest.raises(EvalkvError, match="not found; train one with `evalkv train-policy"):
        prepare(str(tmp_path / "missing.safetensors"))
    pickled = tmp_path / "pickled.pt"
    torch.save({"weight.0": torch.zeros(1)}, pickled)  # never unpickled
    with pytest.raises(EvalkvError, match="not a readable safetensors file"):
        prepare(str(pickled))
    save_file({"x": torch.zeros(1)}, tmp_path / "plain.safetensors")
    with pytest.raises(EvalkvError, match="is not an evalkv learned_mlp policy"):
        prepare(str(tmp_path / "plain.safetensors"))


def test_learned_mlp_needs_room_for_sinks_and_window():
    with pytest.raises(EvalkvError, match="smaller than n_sink \\+ window_size"):
        build_method("learned_mlp", {"budget": 20, "policy_path": str(TINY_POLICY)})


def _value_norm_policy(path) -> str:
    """A linear policy whose score is the value's norm (one feature, weight 1, no hidden layer)."""
    policy = EvictionPolicy.initialise(GEOMETRY, ["value_norm"], [], seed=0)
    with torch.no_grad():
        policy.weights[0].fill_(1.0)
        policy.biases[0].zero_()
    policy.save(path)
    return str(path)


def test_learned_mlp_keeps_sinks_window_and_best_scores_at_every_step(tmp_path):
    budget, window, sink = 20, 4, 4
    method = build_method("learned_mlp", {"budget": budget, "window_size": window,
                                          "policy_path": _value_norm_policy(tmp_path / "norm.safetensors")})
    layer = SingleLayer(method, prompt_length=40)
    generator = torch.Generator().manual_seed(0)
    for step in range(6):
        count = 40 if step == 0 else 1
        keys, values = torch.randn(1, 2, count, 8, generator=generator), torch.randn(1, 2, count, 8,
                                                                                    generator=generator)
        seen = layer.forward(keys, values, torch.randn(1, 4, count, 8), Phase.PREFILL if step == 0 else Phase.DECODE)
        newest = layer.next_position
        for head in range(2):
            kept = layer.cache.positions[0, head].tolist()
            assert len(kept) == budget
            assert kept[:sink] == list(range(sink)) and kept[-window:] == list(range(newest - window, newest))
            norms = seen.appended_values[0, head].norm(dim=-1)
            candidates = seen.appended_positions[0, head, sink:-window]
            best = candidates[norms[sink:-window].argsort(descending=True)[: budget - sink - window]]
            assert kept[sink:-window] == sorted(best.tolist())
            torch.testing.assert_close(layer.cache.extras[SCORE][0, head], layer.cache.values[0, head].norm(dim=-1))


def test_learned_mlp_on_a_model_caches_the_scores_of_the_kept_entries(tokenizer):
    method = build_method("learned_mlp", {"budget": 48, "window_size": 8, "policy_path": str(TINY_POLICY)})
    engine = Engine(tiny_model(), method, tokenizer=tokenizer)
    generation = engine.generate(prompt_ids(tokenizer), 5, keep_session=True)
    policy = EvictionPolicy.load(TINY_POLICY)
    for index, layer in enumerate(generation.session.cache.layers):
        assert layer.length == 48
        from evalkv.kv.rope import unrotate_keys

        features = token_features(unrotate_keys(layer.keys, layer.positions, engine.rotary), layer.positions,
                                  layer.values, policy.features)
        torch.testing.assert_close(layer.extras[SCORE], policy.logits(features, index), atol=1e-4, rtol=1e-4)

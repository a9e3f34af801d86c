"""The ``teacher`` target: heads regress and rank a registered scorer's scores (KVzip = the KVzap recipe, SnapKV
query-aware); teacher scores in the feature cache equal the scorer run directly; bad settings name the field."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from _training_helpers import batch_of, random_samples, tiny_config
from gatekv.compress import shared_prefill
from gatekv.heads import build_heads
from gatekv.scorers import get_scorer
from gatekv.training.config import TargetConfig
from gatekv.models import tiny_model
from gatekv.training.objective import FeatureCache, HeadObjective
from gatekv.training.teacher import teacher_scores

KVZIP = {"chunk_size": 16, "prompt_ids": [5, 6, 7], "continue_ids": [8], "suffix_ids": [9]}
SHAPES = ((50, 36), (40, 30))


@pytest.fixture(scope="module")
def models():
    return {family: tiny_model(family) for family in ("llama", "qwen3", "phi3")}


def _direct(model, name, options, prompt, window, sinks):
    """(Ly, H, P) scores of ``name`` on ``prompt`` (P,) from a shared prefill (another path than the teacher's)."""
    with torch.no_grad(), shared_prefill(model, {"t": get_scorer(name, **options)}, window=window, sinks=sinks) as shared:
        shared.prefill(prompt[None])
        results = shared._score_set.results["t"]
        positions = [shared.session._held["cache"].layers[l].dense_view()[2] for l in range(len(results))]
    out = torch.full((len(results), results[0].shape[1], prompt.numel()), float("nan"))
    for l, scores in results.items():
        real = positions[l][0] >= 0
        head, slot = real.nonzero(as_tuple=True)
        out[l, head, positions[l][0][head, slot]] = scores[0][head, slot]
    return out


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3"])
@pytest.mark.parametrize("name,options", [("kvzip", KVZIP), ("snapkv", {"window": 4})], ids=["kvzip", "snapkv"])
def test_cached_teacher_scores_equal_the_scorer_run_directly(models, tmp_path, family, name, options):
    model = models[family]
    heads = build_heads("linear_gate", model, hidden=8)
    cache = FeatureCache(tmp_path, heads.config.fingerprint, f"tiny:{family}", heads.feature_names, torch.float32)
    target = TargetConfig(kind="teacher", teacher=name, teacher_options=options, window=4, sinks=2)
    objective = HeadObjective(model, heads, target, feature_cache=cache)
    samples = random_samples(SHAPES, seed=1)
    batch = batch_of(samples)
    first, metrics = objective(batch)
    assert torch.isfinite(first) and (cache.hits, cache.misses) == (0, 2)
    second, _ = objective(batch)
    assert (cache.hits, cache.misses) == (2, 2) and torch.equal(first, second)
    for sample in samples:
        stored = load_file(str(cache.path(sample.input_ids, sample.prompt_length)))["labels"][:, 0]  # (Ly, H, P)
        direct = _direct(model, name, options, sample.input_ids[: sample.prompt_length], window=4, sinks=2)
        torch.testing.assert_close(stored, direct, atol=1e-5, rtol=1e-4)


def test_query_aware_teacher_uses_the_response(models):
    model = models["qwen3"]
    sample = random_samples(SHAPES, seed=2)[0]
    prompt, response = sample.input_ids[: sample.prompt_length], sample.input_ids[sample.prompt_length :]
    scorer = get_scorer("snapkv", window=4)
    agnostic = teacher_scores(model, scorer, prompt, None, window=4, sinks=2)
    aware = teacher_scores(model, scorer, prompt, response, window=4, sinks=2)
    assert agnostic.shape == aware.shape == (model.config.num_hidden_layers, model.config.num_key_value_heads, prompt.numel())
    assert torch.isfinite(aware).all() and not torch.allclose(agnostic, aware)


@pytest.mark.parametrize("head_type", ["retaining_head", "attention_gate", "linear_gate"])
def test_teacher_loss_falls(models, tmp_path, head_type):
    torch.manual_seed(0)
    model = models["llama"]
    heads = build_heads(head_type, model, hidden=16)
    cache = FeatureCache(tmp_path, heads.config.fingerprint, "tiny:llama", heads.feature_names, torch.float32)
    target = TargetConfig(kind="teacher", teacher="kvzip", teacher_options=KVZIP, rank_weight=1.0, window=4, sinks=2)
    objective = HeadObjective(model, heads, target, feature_cache=cache)
    optimizer = torch.optim.Adam(heads.parameters(), lr=1e-2)
    batch = batch_of(random_samples(SHAPES, seed=3))
    losses = []
    for _ in range(40):
        loss, metrics = objective(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses[::8]
    assert set(metrics) >= {"regression", "rank", "topk_overlap"}
    assert not any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_teacher_labels_log_transform_keeps_padding():
    objective = HeadObjective.__new__(HeadObjective)
    torch.nn.Module.__init__(objective)
    objective.target = TargetConfig(kind="teacher", teacher="snapkv", teacher_floor=1e-4)
    raw = torch.tensor([0.5, 0.0, float("-inf")])
    torch.testing.assert_close(objective.teacher_labels(raw), torch.tensor([0.5, 1e-4, 0.0]).log().where(
        torch.tensor([True, True, False]), torch.tensor(float("-inf"))))


def test_feature_cache_keys_teacher_labels_apart(models, tmp_path):
    heads = build_heads("retaining_head", models["llama"], hidden=8)
    directories = set()
    for target in (TargetConfig(), TargetConfig(kind="teacher", teacher="kvzip"),
                   TargetConfig(kind="teacher", teacher="kvzip", teacher_options={"chunk_size": 64}),
                   TargetConfig(kind="teacher", teacher="snapkv", teacher_query=True)):
        cache = FeatureCache(tmp_path, heads.config.fingerprint, "tiny:llama", heads.feature_names, torch.float32)
        HeadObjective(models["llama"], heads, target, feature_cache=cache)
        directories.add(cache.directory)
    assert len(directories) == 4


@pytest.mark.parametrize(
    "fields,message",
    [({"kind": "teacher"}, "target.teacher"), ({"kind": "teacher", "teacher": "nope"}, "target.teacher"),
     ({"kind": "teacher", "teacher": "kvzip", "teacher_options": {"chunk_size": 0}}, "target.teacher_options"),
     ({"kind": "teacher", "teacher": "kvzip", "teacher_options": {"colour": 1}}, "target.teacher_options"),
     ({"kind": "teacher", "teacher": "kvzip", "teacher_query": True}, "target.teacher_query"),
     ({"kind": "teacher", "teacher": "snapkv", "teacher_floor": 0.0}, "target.teacher_floor"),
     ({"kind": "cis", "teacher": "kvzip"}, "target.teacher"),
     ({"kind": "distill", "teacher_query": True}, "target.teacher_query")],
)
def test_bad_teacher_settings_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        TargetConfig(**fields)


def test_train_config_accepts_teacher_with_feature_cache(tmp_path):
    config = tiny_config(tmp_path, target={"kind": "teacher", "teacher": "kvzip", "rank_weight": 0.5},
                         data={"feature_cache": str(tmp_path / "cache")})
    assert config.target.summary()["teacher"] == "kvzip"
    with pytest.raises(ValueError, match="teacher_opts"):
        tiny_config(tmp_path, target={"kind": "teacher", "teacher": "kvzip", "teacher_opts": {}})

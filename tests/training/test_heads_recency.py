"""The heads' learned recency bias (``recency_buckets``): its definition, training = inference, adapter round trip."""

from __future__ import annotations

import math

import pytest
import torch

from gatekv import compress
from gatekv.heads import build_heads, load_adapter, save_adapter
from gatekv.models import tiny_model

from gatekv.models import capture_layer_inputs, inspect_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _reference_bias(table: torch.Tensor, distance: int) -> torch.Tensor:
    """(H,) bias of one layer's table (H, n) at ``distance``: linear between buckets u = 2 log2(1 + d)."""
    n = table.shape[-1]
    u = min(2.0 * math.log2(1.0 + distance), n - 1)
    low = min(int(math.floor(u)), n - 1)
    high = min(low + 1, n - 1)
    frac = u - low
    return table[:, low] * (1 - frac) + table[:, high] * frac


def _heads(model, buckets=8, seed=0):
    torch.manual_seed(seed)
    heads = build_heads("retaining_head", model, hidden=8, recency_buckets=buckets)
    with torch.no_grad():
        heads.recency.normal_()
    return heads


def _stacked_features(model, heads, ids):
    spec = inspect_model(model)
    sinks = [{} for _ in range(spec.num_layers)]
    handles = []
    for layer in range(spec.num_layers):
        handles += capture_layer_inputs(spec, layer, sinks[layer], hidden=False, pre_rope=True)
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for handle in handles:
            handle.remove()
    per_layer = [heads.layer_inputs(sink) for sink in sinks]
    return {name: torch.stack([inputs[name] for inputs in per_layer]) for name in per_layer[0]}


def test_recency_bias_matches_the_bucket_definition(model):
    heads = _heads(model, buckets=6)
    distances = torch.tensor([0, 1, 2, 3, 5, 7, 8, 30, 31, 1000, 10**6])
    got = heads.recency_bias(distances[None, None, None, :].expand(1, 1, 1, -1))  # (Ly, 1, H, T)
    for layer in range(heads.recency.shape[0]):
        for t, d in enumerate(distances.tolist()):
            want = _reference_bias(heads.recency[layer].detach(), d)
            torch.testing.assert_close(got[layer, 0, :, t], want, rtol=1e-5, atol=1e-6)
    one = heads.recency_bias(distances[None, None, :], layer_idx=1)  # (B, 1 -> H, T)
    torch.testing.assert_close(one[0], got[1, 0])


def test_off_by_default_and_adds_nothing(model):
    torch.manual_seed(0)
    heads = build_heads("retaining_head", model, hidden=8)
    assert heads.config.recency_buckets == 0 and not hasattr(heads, "recency")
    ids = torch.randint(3, 120, (1, 12))
    inputs, valid = _stacked_features(model, heads, ids), torch.ones(1, 12, dtype=torch.bool)
    assert torch.equal(heads.stacked_scores(inputs, valid), heads.stacked_content_scores(inputs, valid))


def test_stacked_scores_add_the_bias_of_the_distance_to_each_rows_last_token(model):
    heads = _heads(model)
    ids = torch.randint(3, 120, (2, 10))
    inputs = _stacked_features(model, heads, ids)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, 7:] = False  # row 1: a 7-token prompt, padded
    content = heads.stacked_content_scores(inputs, valid)
    scores = heads.stacked_scores(inputs, valid)
    for layer in range(content.shape[0]):
        for b, length in ((0, 10), (1, 7)):
            for j in range(length):
                want = content[layer, b, :, j] + _reference_bias(heads.recency[layer].detach(), length - 1 - j)
                torch.testing.assert_close(scores[layer, b, :, j], want, rtol=1e-5, atol=1e-5)


def test_gradient_reaches_the_recency_table(model):
    heads = _heads(model)
    heads.train()
    ids = torch.randint(3, 120, (1, 9))
    inputs = _stacked_features(model, heads, ids)
    heads.stacked_scores(inputs, torch.ones(1, 9, dtype=torch.bool)).sum().backward()
    assert heads.recency.grad is not None and bool((heads.recency.grad != 0).any())


@pytest.mark.parametrize("prefill", ["one_shot", "chunked"])
def test_inference_ranks_by_the_bias_of_the_distance_to_the_newest_token(model, prefill, tmp_path):
    """With a bias that dominates the content scores, what compress() keeps is set by the distance to the newest
    token (recomputed at every scoring, also in chunked prefill), in both directions."""
    for sign in (-1.0, 1.0):  # -1: far tokens get a lower score (keep the newest); +1: keep the oldest
        heads = _heads(model, buckets=16)
        with torch.no_grad():
            heads.recency.copy_(sign * 1000.0 * torch.arange(16.0).expand_as(heads.recency))
        save_adapter(heads, tmp_path / f"a{sign}")
        loaded = load_adapter(tmp_path / f"a{sign}", model=model)
        torch.testing.assert_close(loaded.recency, heads.recency)
        ids = torch.randint(3, 120, (1, 48))
        with compress(model, loaded, "uniform", budget=12, prefill=prefill, chunk_size=16, window=2, sinks=2,
                      record=True) as session:
            model(ids)
        kept = session.stats.events[-1].kept_positions[0][0]  # layer 0, (H, T) positions, -1 = empty
        for h in range(kept.shape[0]):
            positions = sorted(p for p in kept[h].tolist() if p >= 0)
            if sign < 0:
                assert positions == [0, 1] + list(range(38, 48)), (h, positions)
            else:
                assert positions[:2] == [0, 1] and positions[-2:] == [46, 47], (h, positions)
                middle = positions[2:-2]
                assert middle == sorted(middle) and max(middle) < 24, (h, positions)  # the oldest survivors


def test_one_shot_keeps_the_top_of_the_training_scores(model):
    """Training scores (stacked_scores at the prompt's end) and inference scores (score() in compress) agree: a
    one-shot uniform compression keeps, per head, the top of stacked_scores outside the sinks and window."""
    heads = _heads(model, buckets=12, seed=3)
    ids = torch.randint(3, 120, (1, 40))
    inputs = _stacked_features(model, heads, ids)
    scores = heads.stacked_scores(inputs, torch.ones(1, 40, dtype=torch.bool))  # (Ly, 1, H, 40)
    budget, sinks, window = 10, 2, 3
    with compress(model, heads, "uniform", budget=budget, window=window, sinks=sinks, record=True) as session:
        model(ids)
    event = session.stats.events[-1]
    for layer in range(scores.shape[0]):
        kept = event.kept_positions[layer][0]
        for h in range(kept.shape[0]):
            free = scores[layer, 0, h, sinks : 40 - window]
            top = (torch.topk(free, budget - sinks - window).indices + sinks).tolist()
            want = sorted(list(range(sinks)) + top + list(range(40 - window, 40)))
            assert sorted(p for p in kept[h].tolist() if p >= 0) == want, (layer, h)


def test_config_validation():
    from gatekv.training.config import load_train_config

    with pytest.raises(ValueError, match="recency_buckets"):
        build_heads("retaining_head", tiny_model("llama"), recency_buckets=-1)
    with pytest.raises(ValueError, match="recency_buckets"):
        load_train_config(None, ["heads.recency_buckets=8", "target.kind=distill"])
    assert load_train_config(None, ["heads.recency_buckets=8"]).heads.recency_buckets == 8


def test_the_recency_table_gets_its_own_learning_rate():
    from torch import nn

    from gatekv.training.config import load_train_config
    from gatekv.training.module import HeadTrainingModule

    objective = nn.Module()
    objective.heads = build_heads("retaining_head", tiny_model("llama"), hidden=8, recency_buckets=8)
    for overrides, want in ((["optim.lr=0.001"], 0.02), (["optim.lr=0.001", "optim.recency_lr=0.005"], 0.005)):
        config = load_train_config(None, overrides + ["heads.recency_buckets=8"])
        optimizer = HeadTrainingModule(objective, config, {}).configure_optimizers()["optimizer"]
        groups = {len(g["params"]): g["initial_lr"] for g in optimizer.param_groups}
        assert groups == {1: pytest.approx(want), sum(1 for _ in objective.heads.layers.parameters()): 0.001}
    objective.heads = build_heads("retaining_head", tiny_model("llama"), hidden=8)
    optimizer = HeadTrainingModule(objective, load_train_config(None, []), {}).configure_optimizers()["optimizer"]
    assert len(optimizer.param_groups) == 1


def test_lora_weights_get_their_own_learning_rate():
    """optim.lora_lr: the backbone's LoRA weights train at their own rate (the lm / distill recipes' gates at lr)."""
    pytest.importorskip("peft", reason="needs the train extra: pip install 'gatekv[train]'")
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from torch import nn

    from gatekv.training.config import load_train_config
    from gatekv.training.module import HeadTrainingModule

    objective = nn.Module()
    objective.backbone = get_peft_model(tiny_model("llama"), PeftLoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    objective.heads = build_heads("attention_gate", tiny_model("llama"))
    lora = sum(1 for n, p in objective.backbone.named_parameters() if p.requires_grad)
    heads = sum(1 for _ in objective.heads.parameters())
    for overrides, want in ((["optim.lr=0.01"], 0.01), (["optim.lr=0.01", "optim.lora_lr=0.0005"], 0.0005)):
        config = load_train_config(None, overrides + ["target.kind=lm", "target.lora.enabled=true"])
        optimizer = HeadTrainingModule(objective, config, {}).configure_optimizers()["optimizer"]
        groups = sorted((len(g["params"]), g["initial_lr"]) for g in optimizer.param_groups)
        assert groups == sorted([(heads, pytest.approx(0.01)), (lora, pytest.approx(want))])
    with pytest.raises(ValueError, match="optim.lora_lr must be > 0"):
        load_train_config(None, ["optim.lora_lr=0"])


def test_chunked_prefill_measures_recency_to_the_prompts_end(model):
    """Chunked prefill ranks every token by its distance to the prompt's end, as one-shot prefill does: with zero
    content scores and a bumpy recency table, every chunk's eviction keeps what the final one-shot ranking keeps, so
    both prefills end with the same slots. (Measured to each chunk's newest token instead, a token ranked high at
    the end may be evicted by an early chunk whose distances fall elsewhere in the table: on SmolLM2 at 8K the shipped
    heads found 1 of 10 needles in chunks of 512 that way and 6 of 10 without the bias.)"""
    heads = _heads(model, buckets=16, seed=5)  # 16 buckets reach distance 255: no two distances tie here
    with torch.no_grad():
        for param in heads.layers.parameters():
            param.zero_()  # content score 0: the recency bias alone ranks
        heads.recency.copy_(torch.randn(heads.recency.shape, generator=torch.Generator().manual_seed(7)) * 10)
    ids = torch.randint(3, 120, (1, 64))
    kept = {}
    for prefill in ("one_shot", "chunked"):
        with compress(model, heads, "uniform", budget=12, prefill=prefill, chunk_size=16, window=2, sinks=2,
                      record=True) as session:
            model(ids)
        event = session.stats.events[-1]
        kept[prefill] = [[sorted(p for p in event.kept_positions[layer][0][h].tolist() if p >= 0)
                          for h in range(event.kept_positions[layer][0].shape[0])]
                         for layer in range(len(event.kept_positions))]
    assert kept["chunked"] == kept["one_shot"]
    assert len({tuple(h) for layer in kept["one_shot"] for h in layer}) > 1  # the table does rank differently per head


def test_recency_can_be_switched_off_at_inference_and_the_adapter_keeps_the_switch(model, tmp_path):
    """set_recency(False): compress() ranks by the content scores alone (what heads without the bias keep); the
    saved adapter records it (inference.recency) and loads it back; a non-bool is refused."""
    heads = _heads(model, buckets=16, seed=2)
    plain = build_heads("retaining_head", model, hidden=8)
    plain.load_state_dict({k: v for k, v in heads.state_dict().items() if k != "recency"})
    ids = torch.randint(3, 120, (1, 48))

    def kept(scorer):
        with compress(model, scorer, "uniform", budget=12, window=2, sinks=2, record=True) as session:
            model(ids)
        return [t.tolist() for t in session.stats.events[-1].kept_positions[0]]

    assert kept(heads) != kept(plain)  # the bias changes what is kept here
    heads.set_recency(False)
    assert kept(heads) == kept(plain)
    save_adapter(heads, tmp_path / "off")
    loaded = load_adapter(tmp_path / "off", model=model)
    assert loaded.use_recency is False and kept(loaded) == kept(plain)
    with pytest.raises(ValueError, match="recency must be true or false"):
        heads.set_recency("no")

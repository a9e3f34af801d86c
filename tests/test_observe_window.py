"""observe_window: the scorers and allocators observe the last ``observe_window`` prompt tokens while only ``window``
tokens are protected; None keeps the two equal; the shared prefill, GateKV and the eval config carry it."""

from __future__ import annotations

import pytest
import torch

from gatekv import CompressionConfig, GateKV, compress
from gatekv.compress import shared_prefill
from gatekv.eval.config import EvalConfig, MethodConfig
from gatekv.models import cache_kwarg, char_tokenizer
from gatekv.scorers.base import LayerContext, Scorer
from tiny_models import random_batch, tiny_model


class _OldestFirst(Scorer):
    """Prefers old tokens (score = -position) and records what it observed."""

    def __init__(self):
        self.window_sizes: list[int] = []
        self.attention_rows: list[int] = []

    def score(self, ctx: LayerContext) -> torch.Tensor:
        self.window_sizes.append(ctx.window_size)
        self.attention_rows.append(ctx.window_attention().shape[2])
        return -ctx.positions.float()


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _kept(model, scorer, **options):
    ids, mask = random_batch(1, 60, seed=11)
    with torch.no_grad(), compress(model, scorer, "uniform", budget=20, sinks=2, record=True, **options) as session:
        model(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_kwarg(model): session.new_cache()})
    return [set(p[0, h].tolist()) for p in session.stats.events[0].kept_positions for h in range(p.shape[1])]


def test_observers_are_not_protected(llama):
    scorer = _OldestFirst()
    kept = _kept(llama, scorer, window=4, observe_window=12)
    assert set(scorer.window_sizes) == {12} and set(scorer.attention_rows) == {12}
    # protected: 2 sinks + the last 4; the other 14 slots go to the oldest tokens, so observers 48-55 are evicted
    expected = {0, 1} | set(range(2, 16)) | set(range(56, 60))
    assert all(head == expected for head in kept)


def test_none_observes_the_protected_window(llama):
    scorer = _OldestFirst()
    kept = _kept(llama, scorer, window=4)
    assert set(scorer.window_sizes) == {4}
    assert kept == _kept(llama, _OldestFirst(), window=4, observe_window=4)


def test_observe_window_changes_what_snapkv_keeps(llama):
    # the same protected window, more observers: SnapKV ranks by other queries' attention
    assert _kept(llama, "snapkv", window=4) != _kept(llama, "snapkv", window=4, observe_window=16)


@pytest.mark.parametrize("value", [0, -3, 2.5, True])
def test_bad_observe_window_is_refused(value):
    with pytest.raises(ValueError, match=r"observe_window must be None or an int >= 1"):
        CompressionConfig(observe_window=value)


def test_shared_prefill_fork_equals_compress_with_observe_window(llama):
    ids, _ = random_batch(1, 60, seed=12)
    follow, _ = random_batch(1, 5, seed=13)
    kw = cache_kwarg(llama)
    with torch.no_grad():
        with compress(llama, "snapkv", "adakv", budget=0.3, window=4, sinks=2, observe_window=16) as session:
            cache = session.new_cache()
            llama(input_ids=ids, **{kw: cache})
            reference = llama(input_ids=follow, **{kw: cache}).logits
        with shared_prefill(llama, {"snapkv": "snapkv"}, window=4, sinks=2, observe_window=16) as shared:
            shared.prefill(ids)
            fork, _ = shared.fork("snapkv", "adakv", 0.3)
            assert torch.equal(llama(input_ids=follow, **{kw: fork}).logits, reference)
        with shared_prefill(llama, {"snapkv": "snapkv"}, window=4, sinks=2) as shared:
            shared.prefill(ids)
            fork, _ = shared.fork("snapkv", "adakv", 0.3)
            assert not torch.equal(llama(input_ids=follow, **{kw: fork}).logits, reference)


def test_gatekv_and_eval_config_carry_it(llama):
    runner = GateKV(llama, char_tokenizer(), scorer="snapkv", window=4, sinks=2, observe_window=16)
    assert runner.config.observe_window == 16
    config = EvalConfig(methods=[MethodConfig(name="snapkv", scorer="snapkv")], observe_window=64)
    assert config.compression().observe_window == 64 and config.compression().window == 32
    with pytest.raises(ValueError, match="observe_window"):
        EvalConfig(methods=[MethodConfig(name="snapkv", scorer="snapkv")], observe_window=0)

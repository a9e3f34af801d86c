"""One prefill for many (scorer, allocator, budget) settings: every fork equals its own compress() run."""

from __future__ import annotations

import pytest
import torch

from gatekv import compress
from gatekv.compress import shared_prefill
from gatekv.heads import build_heads
from gatekv.inference import GateKV
from gatekv.models import cache_kwarg
from gatekv.models import char_tokenizer
from tiny_models import tiny_model

CONTEXT = "the quick brown fox jumps over the lazy dog while seven owls count the stars " * 5
QUESTION = "who jumps over the dog?"
SETTINGS = [
    dict(scorer="snapkv", allocator="uniform", budget=0.25),
    dict(scorer="snapkv", allocator="adakv", budget=0.4),
    dict(scorer="h2o", allocator="pyramid", budget=0.3),
    dict(scorer="knorm", allocator="adakv", budget=48),
    dict(scorer="heads", allocator="adakv", budget=0.2),
    dict(scorer="snapkv", allocator="uniform", budget=0.3, merge="ems"),
]


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def _scorers(model):
    torch.manual_seed(3)
    return {"snapkv": "snapkv", "h2o": "h2o", "knorm": "knorm", "heads": build_heads("retaining_head", model, hidden=16)}


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3"])
def test_every_fork_equals_its_own_compressed_run(family, tokenizer):
    model = tiny_model(family)
    scorers = _scorers(model)
    runner = GateKV(model, tokenizer, window=8, sinks=2)
    shared = runner.answer_settings(CONTEXT, QUESTION, SETTINGS, scorers=scorers, max_new_tokens=8)
    assert len(shared) == len(SETTINGS)
    for setting, answer in zip(SETTINGS, shared):
        alone = GateKV(model, tokenizer, scorer=scorers[setting["scorer"]], allocator=setting["allocator"],
                       budget=setting["budget"], merge=setting.get("merge"), window=8, sinks=2)
        expected = alone.answer(CONTEXT, QUESTION, query_aware=False, max_new_tokens=8)
        assert answer.text == expected.text, setting
        assert answer.kv_bytes == expected.kv_bytes, setting
        assert torch.equal(answer.stats.kept_tokens, expected.stats.kept_tokens), setting
        assert 0 < answer.kv_bytes < answer.full_kv_bytes


def test_forks_are_independent_copies_with_identical_logits(tokenizer):
    model = tiny_model("llama")
    ids = tokenizer(CONTEXT, return_tensors="pt")["input_ids"]
    follow = tokenizer(QUESTION, add_special_tokens=False, return_tensors="pt")["input_ids"]
    full = torch.cat([ids, follow], 1)
    kw = cache_kwarg(model)
    with torch.no_grad():
        with compress(model, "snapkv", "adakv", budget=0.3, window=8, sinks=2, record=True) as session:
            cache = session.new_cache()
            model(input_ids=ids, **{kw: cache})
            reference = model(input_ids=follow, **{kw: cache}).logits
            reference_positions = session.stats.events[0].kept_positions
        with shared_prefill(model, {"snapkv": "snapkv", "tova": "tova"}, window=8, sinks=2, record=True) as shared:
            shared.prefill(ids)
            first, stats = shared.fork("snapkv", "adakv", 0.3)
            other, _ = shared.fork("tova", "uniform", 0.1)
            second, _ = shared.fork("snapkv", "adakv", 0.3)
            logits_first = model(input_ids=follow, **{kw: first}).logits
            logits_second = model(input_ids=follow, **{kw: second}).logits  # the first fork's decode left no trace
            assert other.kv_bytes() < first.kv_bytes()
    assert torch.equal(logits_first, reference) and torch.equal(logits_second, reference)
    for mine, theirs in zip(stats.events[0].kept_positions, reference_positions):
        assert torch.equal(mine, theirs)
    assert full.shape[1] == ids.shape[1] + follow.shape[1]


def test_model_is_untouched_after_a_shared_prefill(tokenizer):
    model = tiny_model("llama")
    ids = tokenizer(CONTEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with shared_prefill(model, {"snapkv": "snapkv"}) as shared:
            shared.prefill(ids)
            shared.fork("snapkv", "uniform", 0.5)
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    assert model.config._attn_implementation == "sdpa"


def test_shared_prefill_bad_input(tokenizer):
    model = tiny_model("llama")
    ids = tokenizer(CONTEXT, return_tensors="pt")["input_ids"]
    with pytest.raises(ValueError, match="scorers must not be empty"):
        with shared_prefill(model, {}):
            pass
    with torch.no_grad(), shared_prefill(model, {"snapkv": "snapkv"}, window=8, sinks=2) as shared:
        with pytest.raises(RuntimeError, match="needs a prefill"):
            shared.fork("snapkv")
        shared.prefill(ids)
        with pytest.raises(ValueError, match="scorer 'tova' was not scored in this prefill; scored: \\['snapkv'\\]"):
            shared.fork("tova")
        with pytest.raises(ValueError, match="allocator .*cannot run on a shared prefill"):
            shared.fork("snapkv", "cake", 0.3)
        with pytest.raises(ValueError, match="fewer than sinks \\+ window = 10"):
            shared.fork("snapkv", "uniform", 0.01)
    runner = GateKV(model, tokenizer)
    with pytest.raises(ValueError, match="settings: unknown keys \\['budjet'\\]"):
        runner.answer_settings(CONTEXT, QUESTION, [{"scorer": "s", "budjet": 0.1}], scorers={"s": "snapkv"})
    with pytest.raises(ValueError, match="needs scorers"):
        runner.answer_settings(CONTEXT, QUESTION, [{}])

"""Every generate() mode inside compress(): assisted and prompt-lookup decoding (the cache crops rejected drafts),
beam search, sampling, num_return_sequences; the inner decoder called directly; decode room sized from generate."""

from __future__ import annotations

import pytest
import torch

from gatekv import compress
from gatekv.cache import CompressedCache
from gatekv.models import cache_kwarg
from tiny_models import random_batch, tiny_model

NEW = 10
# decode_budget above anything reached forces gatekv's cache and attention with no token evicted (full budget)
FULL = dict(budget=1.0, decode_budget=10_000)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def draft():
    return tiny_model("llama", seed=1)


def greedy(model, ids, mask, **kwargs):
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                          pad_token_id=0, **kwargs)


@pytest.mark.parametrize("mode", ["assistant", "prompt_lookup"])
def test_assisted_decoding_at_full_budget_equals_the_plain_model(llama, draft, mode):
    ids, mask = random_batch(1, 90, seed=4)
    extra = dict(assistant_model=draft) if mode == "assistant" else dict(prompt_lookup_num_tokens=3)
    plain = greedy(llama, ids, mask, **extra)
    assert torch.equal(plain, greedy(llama, ids, mask))  # assisted greedy = greedy
    with compress(llama, "snapkv", "uniform", **FULL) as session:
        out = greedy(llama, ids, mask, **extra)
    assert isinstance(session.cache, CompressedCache)
    assert torch.equal(out, plain)
    # the cache holds exactly the tokens fed (rejected drafts cropped): prompt + NEW - 1
    assert session.cache.get_seq_length() == 90 + NEW - 1
    assert session.cache.kept_tokens().unique().tolist() == [90 + NEW - 1]


@pytest.mark.parametrize("allocator", ["uniform", "adakv"])
@pytest.mark.parametrize("mode", ["assistant", "prompt_lookup"])
def test_assisted_decoding_on_a_compressed_cache_equals_greedy_on_it(llama, draft, allocator, mode):
    """Same prefill compression (the drafts are not part of the prompt), same tokens as plain greedy decoding."""
    ids, mask = random_batch(1, 120, seed=5)
    extra = dict(assistant_model=draft) if mode == "assistant" else dict(prompt_lookup_num_tokens=4)
    with compress(llama, "snapkv", allocator, budget=0.3, window=8, record=True) as session:
        expected = greedy(llama, ids, mask)
    with compress(llama, "snapkv", allocator, budget=0.3, window=8, record=True) as assisted:
        out = greedy(llama, ids, mask, **extra)
    assert torch.equal(out, expected)
    prefill, again = session.stats.events[0], assisted.stats.events[0]
    assert assisted.stats.prompt_tokens.tolist() == [120]
    for kept, kept_again in zip(prefill.kept_positions, again.kept_positions):
        assert torch.equal(kept, kept_again)
    assert torch.equal(assisted.cache.kept_tokens(), session.cache.kept_tokens())


def test_beam_search_sampling_and_return_sequences(llama):
    ids, mask = random_batch(2, 70, pad=[0, 9], seed=6)
    modes = [
        dict(num_beams=3, do_sample=False),
        dict(num_beams=2, num_return_sequences=2, do_sample=False),
        dict(do_sample=True, top_k=20, num_return_sequences=3),
    ]
    for options in modes:
        torch.manual_seed(0)
        plain = llama.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0, **options)
        torch.manual_seed(0)
        with compress(llama, "snapkv", "adakv", **FULL) as session:
            out = llama.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0, **options)
        assert isinstance(session.cache, CompressedCache), options
        assert torch.equal(out, plain), options
        rows = ids.shape[0] * options.get("num_return_sequences", 1)
        with compress(llama, "snapkv", "adakv", budget=0.3, window=8) as session:
            torch.manual_seed(0)
            out = llama.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, pad_token_id=0, **options)
        assert out.shape == (rows, 76), options
        assert session.stats.events and session.cache.kv_bytes() < session.stats.full_kv_bytes


def test_inner_decoder_call_is_compressed_like_the_lm(llama):
    """``model.model(ids, cache=...)`` (kvpress-style prefill) compresses exactly as ``model(ids, cache=...)``."""
    ids, mask = random_batch(2, 100, pad=[0, 7], seed=7)
    question = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(1))
    full_ids = torch.cat([ids, question], 1)
    full_mask = torch.cat([mask, torch.ones_like(question)], 1)
    outputs = []
    for call in ("lm", "decoder"):
        with compress(llama, "snapkv", "adakv", budget=0.25, window=8) as session:
            cache = session.new_cache()
            forward = llama if call == "lm" else llama.get_decoder()
            forward(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_kwarg(llama): cache})
            kept = cache.kept_tokens()
            out = llama.generate(full_ids, attention_mask=full_mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                                 **{cache_kwarg(llama): cache})
        assert len(session.stats.events) == 1
        outputs.append((kept, out, cache.layers[0].dense_view()))
    (kept_a, out_a, view_a), (kept_b, out_b, view_b) = outputs
    assert torch.equal(kept_a, kept_b) and torch.equal(out_a, out_b)
    for a, b in zip(view_a[:3], view_b[:3]):
        assert torch.equal(a, b)


def _kv_slot_bytes(model) -> int:
    """Bytes of one token in every layer and KV head (fp32)."""
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 4


@pytest.mark.parametrize("length", [256, 400])
def test_kv_bytes_are_the_budget_plus_generated_tokens(llama, length):
    """Room from generate's max_new_tokens: exactly the generated slots; unknown length (a hand-written loop): the
    budget + <= 2% of the full cache + the tokens generated, regrown as they come."""
    ids, mask = random_batch(1, length, seed=8)
    slot = _kv_slot_bytes(llama)
    full = slot * length
    for budget in (0.1, 0.2):
        with compress(llama, "snapkv", "adakv", budget=budget, window=8) as session:
            llama.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                           pad_token_id=0)
        kept = int(session.stats.budget_tokens[0])  # tokens per head, all layers together
        assert session.stats.events[0].kv_bytes_after == slot * (kept + NEW - 1)
        assert session.cache.kv_bytes() == slot * (kept + NEW - 1)
        # a hand-written decode loop: generation length unknown
        with compress(llama, "snapkv", "adakv", budget=budget, window=8) as session, torch.no_grad():
            cache = session.new_cache()
            out = llama(input_ids=ids, use_cache=True, **{cache_kwarg(llama): cache})
            assert cache.kv_bytes() <= slot * kept + 0.02 * full
            token = out.logits[:, -1:].argmax(-1)
            for step in range(1, 25):
                out = llama(input_ids=token, use_cache=True, **{cache_kwarg(llama): cache})
                token = out.logits[:, -1:].argmax(-1)
                held = cache.kv_bytes()
                assert held <= slot * (kept + step) + 0.02 * full + slot * step / 2, step  # growth room <= 50%
        # declared by hand: exact again
        with compress(llama, "snapkv", "adakv", budget=budget, window=8) as session, torch.no_grad():
            session.expect_new_tokens(NEW)
            cache = session.new_cache()
            llama(input_ids=ids, use_cache=True, **{cache_kwarg(llama): cache})
            assert cache.kv_bytes() == slot * (kept + NEW - 1)

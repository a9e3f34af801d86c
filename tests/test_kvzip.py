"""KVzip scorer: its chunked replay inside ``compress`` (one-shot and chunked prefill, left-padded batch, shared
prefill) equals a plain PyTorch reference that runs the model on ``context + replay`` and computes the full softmax
of every replay query; works with every allocator; bad options are ValueErrors naming the option."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from gatekv import compress
from gatekv.allocators import get_allocator
from gatekv.compress import shared_prefill
from gatekv.models import cache_kwarg
from gatekv.scorers import available_scorers, get_scorer
from gatekv.scorers.kvzip import KVzipScorer
from masked_reference import reference_logits
from tiny_models import random_batch, tiny_model

PROMPT, CONTINUE, SUFFIX, PREFIX = [5, 6, 7], [8, 9], [10], [3, 4]
OPTIONS = dict(chunk_size=10, n_sink=2, prev_tokens=3, query_block=7, prompt_ids=PROMPT, continue_ids=CONTINUE,
               suffix_ids=SUFFIX, prefix_ids=PREFIX)
REFERENCE = "gatekv_test_kvzip_reference"
_CAPTURED: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}


def _recording_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    _CAPTURED[module.layer_idx] = (query.detach().double(), key.detach().double(), scaling or query.shape[-1] ** -0.5)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


@pytest.fixture(scope="module")
def models():
    AttentionInterface.register(REFERENCE, _recording_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(REFERENCE, sdpa_mask)
    return {family: tiny_model(family) for family in ("llama", "qwen3", "phi3")}


class Recording(KVzipScorer):
    """KVzip that keeps, per layer, the scores (and slot positions) of the last replay forward."""

    def __init__(self, **options):
        super().__init__(**options)
        self.last: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def score(self, ctx):
        out = super().score(ctx)
        if ctx.replay is not None:
            self.last[ctx.layer_idx] = (out.clone(), torch.where(ctx.candidates, ctx.positions, -1))
        return out


def _layer_qk(model, ids: list[int]) -> dict:
    """Post-RoPE queries and keys of every layer for one unpadded sequence (plain forward, no cache)."""
    _CAPTURED.clear()
    original = model.config._attn_implementation
    model.set_attn_implementation(REFERENCE)
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        model.set_attn_implementation(original)
    return dict(_CAPTURED)


def reference_scores(model, ids: list[int], chunks: list[tuple[int, int]], o=OPTIONS) -> torch.Tensor:
    """(layers, H_kv, len(ids)) float64 KVzip scores of one row, ``chunks``: the prefill chunks [a, b) in token index
    (one-shot: a single chunk). Each piece's replay runs on ``ids[:b] + replay`` with a T x T softmax."""
    layers = model.config.num_hidden_layers
    heads = model.config.num_key_value_heads
    out = torch.full((layers, heads, len(ids)), float("nan"), dtype=torch.float64)
    skip = len(o["prefix_ids"]) if ids[: len(o["prefix_ids"])] == o["prefix_ids"] else 0
    out[:, :, :skip] = 0.0
    for a, b in chunks:
        for lo in range(max(a, skip), b, o["chunk_size"]):
            hi = min(lo + o["chunk_size"], b)
            head = o["prompt_ids"] if lo == skip else o["continue_ids"] + ids[max(skip, lo - o["prev_tokens"]) : lo]
            replay = head + o["suffix_ids"] + ids[lo:hi]
            captured = _layer_qk(model, ids[:b] + replay)
            n = len(replay)
            for layer, (query, key, scale) in captured.items():
                group = query.shape[1] // key.shape[1]
                for h in range(heads):
                    best = torch.zeros(b + n, dtype=torch.float64)
                    for g in range(h * group, (h + 1) * group):
                        for i in range(b, b + n):
                            logits = query[0, g, i] @ key[0, h].T * scale
                            j = torch.arange(b + n)
                            keyset = (j < o["n_sink"]) | ((j >= lo) & (j < hi)) | ((j >= b) & (j <= i))
                            weights = torch.softmax(logits.masked_fill(~keyset, float("-inf")), -1)
                            best = torch.maximum(best, weights)
                    out[layer, h, lo:hi] = best[lo:hi]
    return out


def _batch(pad=(0, 7), length=40, seed=3):
    ids, mask = random_batch(2, length, pad=list(pad), seed=seed, vocab=100)
    ids[0, :2] = torch.tensor(PREFIX)  # row 0 starts with the chat head (not reconstructed), row 1 does not
    return ids, mask


def _compare(recorder_last, ids, mask, references):
    for layer, (scores, positions) in recorder_last.items():
        for b in range(ids.shape[0]):
            for h in range(scores.shape[1]):
                slots = positions[b, h] >= 0
                got = scores[b, h][slots].double()
                expected = references[b][layer, h][positions[b, h][slots]]
                torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_registered_and_defaults():
    assert "kvzip" in available_scorers()
    scorer = get_scorer("kvzip")
    assert scorer.replays and scorer.chunk_size == 2048 and scorer.n_sink == 4


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3"])
def test_one_shot_matches_reference(models, family):
    model = models[family]
    ids, mask = _batch()
    recorder = Recording(**OPTIONS)
    with torch.no_grad(), compress(model, recorder, "uniform", budget=0.5, window=4, sinks=2) as session:
        model(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_kwarg(model): session.new_cache()})
    rows = [ids[b][mask[b].bool()].tolist() for b in range(2)]
    references = [reference_scores(model, row, [(0, len(row))]) for row in rows]
    assert len(recorder.last) == model.config.num_hidden_layers
    _compare(recorder.last, ids, mask, references)
    # the replay KV is gone: the cache holds the prompt's kept tokens only
    assert int(session.stats.kept_tokens.max()) <= int(session.stats.budget_tokens.max())
    assert session.stats.replay_seconds > 0


def test_shared_prefill_matches_reference(models):
    model = models["llama"]
    ids, mask = _batch()
    with torch.no_grad(), shared_prefill(model, {"kvzip": get_scorer("kvzip", **OPTIONS), "snapkv": "snapkv"},
                                         window=4, sinks=2) as shared:
        shared.prefill(ids, mask)
        held = shared.session._held["cache"]
        results = shared._score_set.results
        last = {l: (results["kvzip"][l], held.layers[l].dense_view()[2]) for l in results["kvzip"]}
        assert all(results["snapkv"][l].shape == last[l][0].shape for l in last)
        cache, stats = shared.fork("kvzip", "adakv", 0.4)
    rows = [ids[b][mask[b].bool()].tolist() for b in range(2)]
    references = [reference_scores(model, row, [(0, len(row))]) for row in rows]
    # non-candidate slots are -inf in the shared results; compare the real ones
    _compare({l: (s.masked_fill(p < 0, 0.0), p) for l, (s, p) in last.items()}, ids, mask, references)
    kept = stats.kept_tokens  # (layers, B, H_kv): Ada-KV moves budget between heads, the layer total is fixed
    assert (kept.sum(-1) <= stats.budget_tokens[None] * kept.shape[-1]).all()


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_chunked_prefill_matches_reference(models, family):
    """Chunked prefill with a budget that evicts nothing before the end: each prefill chunk is replayed against the
    cache of the tokens up to it; earlier tokens keep the score their own chunk's replay gave them."""
    model = models[family]
    ids, mask = _batch()
    recorder = Recording(**OPTIONS)
    with torch.no_grad(), compress(model, recorder, "uniform", budget=0.9, prefill="chunked", chunk_size=16, window=4,
                                   sinks=2) as session:
        model(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_kwarg(model): session.new_cache()})
    assert [e.kind for e in session.stats.events] == ["chunk", "chunk", "prefill"]
    references = []
    for b in range(2):
        pad = int((mask[b] == 0).sum())
        columns = [(0, 8), (8, 24), (24, 40)]  # chunks aligned to the end of the prompt
        chunks = [(max(a - pad, 0), e - pad) for a, e in columns if e > pad]
        references.append(reference_scores(model, ids[b][mask[b].bool()].tolist(), chunks))
    _compare(recorder.last, ids, mask, references)


ALLOCATORS = ["uniform", "adakv", "pyramid", "global", "cake", "d2o", "threshold"]


@pytest.mark.parametrize("prefill", ["one_shot", "chunked"])
@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_every_allocator_matches_masked_reference(models, allocator, prefill):
    model = models["qwen3"]
    ids, mask = random_batch(2, 48, pad=[0, 9], seed=11)
    if allocator == "threshold":  # a tau on KVzip's [0, 1] scale
        allocator = get_allocator("threshold", tau=0.3)
    with torch.no_grad(), compress(model, get_scorer("kvzip", **{**OPTIONS, "prefix_ids": []}), allocator, budget=0.4,
                                   prefill=prefill, chunk_size=20, window=4, sinks=2, record=True) as session:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    kept = session.stats.kept_tokens
    assert int(kept.min()) < 48 - 9
    logits = torch.stack(out.logits, 1)
    assert torch.isfinite(logits).all()
    full_mask = torch.cat([mask, torch.ones(2, 3, dtype=mask.dtype)], 1)
    ref = reference_logits(model, out.sequences[:, :-1], full_mask[:, :-1], session.stats.events, None)
    torch.testing.assert_close(logits, ref[:, ids.shape[1] - 1 :].float(), atol=1e-4, rtol=0)


def test_decode_budget_keeps_generated_tokens(models):
    model = models["llama"]
    ids, mask = random_batch(1, 40, seed=2)
    with torch.no_grad(), compress(model, get_scorer("kvzip", **OPTIONS), budget=0.5, decode_budget=20, window=4,
                                   sinks=2) as session:
        model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert int(session.stats.kept_tokens.max()) <= 20


def test_bind_tokenizer_and_errors(models):
    class Tokenizer:
        chat_template = None

        def encode(self, text, add_special_tokens=False):
            return [ord(c) % 100 for c in text]

    scorer = get_scorer("kvzip", tokenizer=Tokenizer(), suffix_ids=[1])
    assert scorer.prompt_ids == Tokenizer().encode("\n\nRepeat the previous context exactly.")
    assert scorer.suffix_ids == [1] and scorer.prefix_ids == []
    ids, _ = random_batch(1, 20, seed=1)
    with pytest.raises(ValueError, match="query"):
        with compress(models["llama"], scorer, query=ids[0, :3]):
            pass
    with pytest.raises(ValueError, match="replaying"):
        with shared_prefill(models["llama"], {"a": get_scorer("kvzip"), "b": get_scorer("kvzip")}):
            pass


@pytest.mark.parametrize(
    "options,parameter",
    [({"chunk_size": 0}, "chunk_size"), ({"n_sink": -1}, "n_sink"), ({"prev_tokens": 1.5}, "prev_tokens"),
     ({"query_block": 0}, "query_block"), ({"prompt_ids": "repeat"}, "prompt_ids"), ({"suffix_ids": [-1]}, "suffix_ids"),
     ({"tokenizer": 3}, "tokenizer")],
)
def test_bad_options(options, parameter):
    with pytest.raises(ValueError, match=parameter):
        get_scorer("kvzip", **options)


def test_gatekv_binds_its_tokenizer_to_kvzip(models):
    """GateKV (and so ``gatekv eval``) gives KVzip the repeat prompt built from its tokenizer; other scorers stay as given."""
    from gatekv import GateKV

    class Tokenizer:
        chat_template = None
        pad_token_id = 0

        def encode(self, text, add_special_tokens=False):
            return [ord(c) % 100 for c in text]

    kv = GateKV(models["llama"], Tokenizer(), scorer="kvzip", budget=0.5)
    assert isinstance(kv.scorer, KVzipScorer)
    assert kv.scorer.prompt_ids == Tokenizer().encode("\n\nRepeat the previous context exactly.")
    given = get_scorer("kvzip", prompt_ids=[5, 6])
    assert GateKV(models["llama"], Tokenizer(), scorer=given).scorer.prompt_ids == [5, 6]  # explicit ids are kept
    assert GateKV(models["llama"], Tokenizer(), scorer="snapkv").scorer == "snapkv"
    assert GateKV(models["llama"], None, scorer="kvzip").scorer == "kvzip"  # no tokenizer: nothing to bind

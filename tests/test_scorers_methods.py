"""Scorers of issue 8 (DefensiveKV, CAKE, A2SF, ExpectedAttention, TriAttention, CompressKV): each equals a naive
loop reference on small shapes, runs inside ``compress`` on several families with left padding, and rejects bad
hyper-parameters with a ValueError naming the parameter."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

from gatekv import compress
from gatekv.cli import retrieval_heads_main as main
from gatekv.scorers import LayerContext, available_scorers, get_scorer
from gatekv.scorers.retrieval_heads import RetrievalHeads, identify_retrieval_heads
from masked_reference import reference_logits
from tiny_models import random_batch, tiny_model

B, T, Q = 2, 12, 5
NEW_TOKENS = 3


@pytest.fixture(scope="module")
def models():
    return {family: tiny_model(family) for family in ("llama", "qwen3", "phi3")}


def make_ctx(model, seed=0, window=3, pre_rope=False):
    """A LayerContext with random tensors shaped like layer 0 of ``model``; row 1 has 2 padding slots and its
    first query is padding, head 0 of row 0 (if any) misses slot 3."""
    attn = model.model.layers[0].self_attn
    config = model.config
    h_q, h_kv = config.num_attention_heads, config.num_key_value_heads
    d = attn.head_dim
    g = torch.Generator().manual_seed(seed)
    positions = torch.arange(T).repeat(B, h_kv, 1)
    positions[1, :, :2] = -1
    positions[0, 0, 3] = -1
    query_positions = torch.arange(T - Q, T).repeat(B, 1)
    query_positions[1, 0] = -1
    return LayerContext(
        layer_idx=0,
        num_layers=config.num_hidden_layers,
        module=attn,
        keys=torch.randn(B, h_kv, T, d, generator=g),
        values=torch.randn(B, h_kv, T, d, generator=g),
        positions=positions,
        candidates=positions >= 0,
        queries=torch.randn(B, h_q, Q, d, generator=g),
        query_positions=query_positions,
        new_slots=torch.full((B, h_kv), T - Q),
        scale=d**-0.5,
        window_size=window,
        pre_rope_queries=torch.randn(B, h_q, Q, d, generator=g) * 2 + 1 if pre_rope else None,
    )


def attention_row(ctx, b, qh, i):
    """(T,) softmax weights of query i of query head qh (zeros for a padding query)."""
    h = qh // ctx.group_size
    if ctx.query_positions[b, i] < 0:
        return torch.zeros(T)
    logits = []
    for j in range(T):
        p = ctx.positions[b, h, j]
        ok = p >= 0 and p <= ctx.query_positions[b, i]
        logits.append(float(ctx.queries[b, qh, i] @ ctx.keys[b, h, j]) * ctx.scale if ok else -math.inf)
    m = max(logits)
    exps = torch.tensor([math.exp(x - m) if x > -math.inf else 0.0 for x in logits])
    return exps / exps.sum()


def avg_pool(row, k, pooling="avg"):
    """Mean (or max) over the slots [j - k // 2, j - k // 2 + k) inside the row."""
    left, right = k // 2, k - 1 - k // 2
    reduce = torch.mean if pooling == "avg" else torch.max
    return torch.stack([reduce(row[max(0, j - left) : min(T, j + right + 1)]) for j in range(T)])


def rope(model, vector, position):
    """The model's own RoPE applied to one pre-RoPE vector (d,) at ``position``."""
    cos, sin = model.model.rotary_emb(vector[None, None], torch.tensor([[position]]))
    out, _ = apply_rotary_pos_emb(vector[None, None, None].double(), vector[None, None, None].double(), cos.double(), sin.double())
    return out[0, 0, 0]


def test_registered():
    assert {"defensivekv", "cake", "a2sf", "expected_attention", "triattention", "compresskv"} <= set(available_scorers())


@pytest.mark.parametrize("critical", [False, True])
@pytest.mark.parametrize("kernel_size, pooling", [(3, "avg"), (4, "avg"), (5, "avg"), (1, "avg"), (3, "max")])
def test_defensivekv(models, critical, kernel_size, pooling):
    model = models["llama"]
    ctx = make_ctx(model)
    scores = get_scorer("defensivekv", kernel_size=kernel_size, pooling=pooling, critical=critical).score(ctx)
    group, w = ctx.group_size, 3
    weight = ctx.module.o_proj.weight.detach().double()
    d = ctx.keys.shape[-1]
    for b in range(B):
        for h in range(ctx.num_kv_heads):
            m = torch.zeros(T)
            for g in range(h * group, (h + 1) * group):
                for i in range(Q - w, Q):
                    row = attention_row(ctx, b, g, i)
                    pooled = avg_pool(row, kernel_size, pooling)
                    if row.sum() > 0:
                        pooled = pooled * row.sum() / pooled.sum()
                    m = torch.maximum(m, pooled)
            cand = ctx.candidates[b, h]
            expected = torch.maximum(m, m[cand].mean())
            if critical:
                norms = torch.zeros(T, dtype=torch.float64)
                for j in range(T):
                    for g in range(h * group, (h + 1) * group):
                        norms[j] += sum(abs(float(weight[o, g * d : (g + 1) * d] @ ctx.values[b, h, j].double())) for o in range(weight.shape[0])) / group
                expected = expected * (norms / norms[cand].mean()).float()
            torch.testing.assert_close(scores[b, h][cand], expected[cand], atol=1e-6, rtol=1e-4)


def test_cake(models):
    ctx = make_ctx(models["llama"], window=4)
    scores = get_scorer("cake", gamma=50.0, kernel_size=3).score(ctx)
    group = ctx.group_size
    for b in range(B):
        for h in range(ctx.num_kv_heads):
            expected = torch.zeros(T)
            for g in range(h * group, (h + 1) * group):
                rows = torch.stack([attention_row(ctx, b, g, i) for i in range(Q - 4, Q) if ctx.query_positions[b, i] >= 0])
                indicator = rows.mean(0) + 50.0 * rows.var(0, unbiased=True)
                expected += avg_pool(indicator, 3) / group
            torch.testing.assert_close(scores[b, h], expected, atol=1e-6, rtol=1e-4)


def test_a2sf_decays_over_steps_and_forwards(models):
    ctx = make_ctx(models["llama"])
    gamma = 0.7
    scorer = get_scorer("a2sf", gamma=gamma, query_block=2)
    first = scorer.score(ctx)
    second = scorer.score(ctx)  # the same queries again: the stored sum decays and the new one is added
    group = ctx.group_size
    for b in range(B):
        for h in range(ctx.num_kv_heads):
            running = torch.zeros(T)
            results = []
            for _ in range(2):
                for i in range(Q):
                    if ctx.query_positions[b, i] < 0:
                        continue  # padding is not a step
                    step = sum(attention_row(ctx, b, g, i) for g in range(h * group, (h + 1) * group)) / group
                    running = gamma * running + step
                results.append(running.clone())
            torch.testing.assert_close(first[b, h], results[0], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(second[b, h], results[1], atol=1e-6, rtol=1e-5)


def query_stats(ctx, b, qh):
    rows = [ctx.pre_rope_queries[b, qh, i].double() for i in range(Q) if ctx.query_positions[b, i] >= 4]
    stacked = torch.stack(rows)
    mean = stacked.mean(0)
    centred = stacked - mean
    return stacked, mean, centred.T @ centred / len(rows)


@pytest.mark.parametrize("family", ["llama", "phi3", "qwen3"])
def test_expected_attention(models, family):
    model = models[family]
    ctx = make_ctx(model, pre_rope=True)
    n_future = 7
    scores = get_scorer("expected_attention", n_future=n_future).score(ctx)
    d = ctx.keys.shape[-1]
    for b in range(B):
        last = int(ctx.query_positions[b].max())
        future = range(last + 1, last + 1 + n_future)
        basis = torch.eye(d, dtype=torch.float64)
        rotation = sum(torch.stack([rope(model, basis[c], p) for c in range(d)], 1) for p in future) / n_future
        for h in range(ctx.num_kv_heads):
            expected = torch.zeros(T, dtype=torch.float64)
            for g in range(h * ctx.group_size, (h + 1) * ctx.group_size):
                _, mean, cov = query_stats(ctx, b, g)
                mean_f = sum(rope(model, mean, p) for p in future) / n_future
                cov_f = rotation @ cov @ rotation.T
                logits = []
                for j in range(T):
                    k = ctx.keys[b, h, j].double()
                    z = ctx.scale * float(mean_f @ k) + ctx.scale**2 / 2 * float(k @ cov_f @ k)
                    logits.append(z if ctx.candidates[b, h, j] else -math.inf)
                top = max(logits)
                exps = torch.tensor([math.exp(z - top) if z > -math.inf else 0.0 for z in logits], dtype=torch.float64)
                expected += exps / exps.sum() / ctx.group_size
            expected *= ctx.values[b, h].double().norm(dim=-1)
            torch.testing.assert_close(scores[b, h].double(), expected, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_triattention(models, family):
    model = models[family]
    ctx = make_ctx(model, pre_rope=True)
    scores = get_scorer("triattention", max_offset=5).score(ctx)  # offsets 1, 2, 4
    d = ctx.keys.shape[-1]
    rotary = d if family == "llama" else d // 2
    half = rotary // 2
    for b in range(B):
        last = int(ctx.query_positions[b].max())
        for h in range(ctx.num_kv_heads):
            expected = torch.zeros(T, dtype=torch.float64)
            for g in range(h * ctx.group_size, (h + 1) * ctx.group_size):
                rows, centre, _ = query_stats(ctx, b, g)
                for j in range(T):
                    k = ctx.keys[b, h, j].double()
                    trig = sum(float(rope(model, centre, last + delta) @ k) for delta in (1, 2, 4)) / 3
                    norm = 0.0
                    for f in range(half):  # rotary pairs (f, f + r/2): complex magnitudes
                        spread = rows[:, [f, f + half]].norm(dim=-1).mean() - centre[[f, f + half]].norm()
                        norm += float(spread * k[[f, f + half]].norm())
                    for e in range(rotary, d):  # pass-through dims
                        norm += float((rows[:, e].abs().mean() - centre[e].abs()) * k[e].abs())
                    expected[j] += ctx.scale * (trig + norm) / ctx.group_size
            torch.testing.assert_close(scores[b, h].double(), expected, atol=1e-5, rtol=1e-4)


def test_compresskv_selected_heads_choose_for_every_head(models):
    ctx = make_ctx(models["llama"])
    scores = get_scorer("compresskv", heads={0: [3, 1]}, kernel_size=3).score(ctx)
    for b in range(B):
        rows = [attention_row(ctx, b, g, i) for g in (1, 3) for i in range(Q - 3, Q)]
        expected = avg_pool(sum(rows) / len(rows), 3)
        for h in range(ctx.num_kv_heads):
            torch.testing.assert_close(scores[b, h], expected, atol=1e-6, rtol=1e-4)


def test_retrieval_heads_identify_save_load(models, tmp_path):
    model = models["llama"]
    result = identify_retrieval_heads(model, samples=2, length=12, answer_length=3, heads_per_layer=2)
    again = identify_retrieval_heads(model, samples=2, length=12, answer_length=3, heads_per_layer=2)
    assert result.semantic == again.semantic  # seeded
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    for table in (result.echo, result.induction, result.semantic):
        t = torch.tensor(table)
        assert t.shape == (layers, heads) and bool(((t >= 0) & (t <= 1 + 1e-5)).all())
    assert all(len(h) == 2 for h in result.heads())
    path = tmp_path / "heads.json"
    result.save(path)
    loaded = RetrievalHeads.load(path)
    assert loaded == result
    loaded.check_model(model)
    with pytest.raises(ValueError, match="num_q_heads|num_kv_heads|head_dim|model_type"):
        loaded.check_model(models["phi3"])
    data = json.loads(path.read_text())
    data["future_field"] = 1
    with pytest.warns(UserWarning, match="future_field"):
        RetrievalHeads.from_dict(data)
    scorer = get_scorer("compresskv", heads=str(path))
    assert scorer.heads == dict(enumerate(result.heads()))


@pytest.mark.filterwarnings("ignore:tokenizer has")  # the saved tiny model has no tokenizer files
def test_retrieval_heads_cli(models, tmp_path, capsys):
    model_dir = tmp_path / "model"
    models["qwen3"].save_pretrained(model_dir)
    out = tmp_path / "heads.json"
    argv = [str(model_dir), "-o", str(out), "--samples", "1", "--length", "8", "--answer-length", "2",
            "--dtype", "float32", "--device", "cpu", "--kind", "retrieval"]
    assert main(argv) == 0
    result = RetrievalHeads.load(out)
    assert result.kind == "retrieval" and result.fingerprint.model_type == "qwen3"
    assert "layer 0: heads" in capsys.readouterr().out


def generate(model, ids, mask):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                         do_sample=False, return_dict_in_generate=True, output_logits=True)
    return out.sequences, torch.stack(out.logits, 1)


SCORERS = [
    ("defensivekv", {}),
    ("defensivekv", {"critical": True}),
    ("cake", {}),
    ("a2sf", {"gamma": 0.9}),
    ("expected_attention", {"n_future": 16}),
    ("triattention", {}),
    ("compresskv", {"heads": {0: [0], 1: [2, 3]}}),
]


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3"])
@pytest.mark.parametrize("name,options", SCORERS, ids=[f"{n}{'-' + '-'.join(o) if o else ''}" for n, o in SCORERS])
def test_inside_compress_matches_masked_reference(models, family, name, options):
    model = models[family]
    ids, mask = random_batch(2, 64, pad=[0, 9], seed=11)
    prefill = "chunked" if name in ("a2sf", "expected_attention") else "one_shot"  # state across chunks
    with compress(model, get_scorer(name, **options), "uniform", budget=0.3, prefill=prefill, chunk_size=24,
                  window=6, sinks=2, record=True) as session:
        sequences, logits = generate(model, ids, mask)
    kept = session.stats.kept_tokens
    assert int(kept.max()) <= int(session.stats.budget_tokens.max()) and int(kept.min()) < 64 - 9
    assert torch.isfinite(logits).all()
    full_mask = torch.cat([mask, torch.ones(2, NEW_TOKENS, dtype=mask.dtype)], 1)
    ref = reference_logits(model, sequences[:, :-1], full_mask[:, :-1], session.stats.events, None)
    torch.testing.assert_close(logits, ref[:, ids.shape[1] - 1 :].float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "name,options,parameter",
    [
        ("defensivekv", {"kernel_size": 0}, "kernel_size"),
        ("defensivekv", {"pooling": "median"}, "pooling"),
        ("defensivekv", {"window": 0}, "window"),
        ("defensivekv", {"critical": "yes"}, "critical"),
        ("cake", {"gamma": -1.0}, "gamma"),
        ("cake", {"gamma": float("nan")}, "gamma"),
        ("cake", {"kernel_size": 0}, "kernel_size"),
        ("a2sf", {"gamma": 0.0}, "gamma"),
        ("a2sf", {"gamma": 1.5}, "gamma"),
        ("a2sf", {"query_block": 0}, "query_block"),
        ("expected_attention", {"n_future": 0}, "n_future"),
        ("expected_attention", {"recent": 0}, "recent"),
        ("expected_attention", {"n_sink": -1}, "n_sink"),
        ("expected_attention", {"epsilon": -0.1}, "epsilon"),
        ("triattention", {"max_offset": 0}, "max_offset"),
        ("triattention", {"offsets": "random"}, "offsets"),
        ("triattention", {"aggregation": "median"}, "aggregation"),
        ("compresskv", {"heads": {0: []}}, "heads"),
        ("compresskv", {"heads": 3}, "heads"),
        ("compresskv", {"heads": {0: [1]}, "kernel_size": -2}, "kernel_size"),
    ],
)
def test_bad_hyper_parameters(name, options, parameter):
    with pytest.raises(ValueError, match=parameter):
        get_scorer(name, **options)


def test_bad_identification_parameters(models):
    model = models["llama"]
    for options, parameter in (({"samples": 0}, "samples"), ({"length": 1}, "length"), ({"fraction": 0.0}, "fraction"),
                               ({"kind": "echo"}, "kind"), ({"answer_length": 0}, "answer_length")):
        with pytest.raises(ValueError, match=parameter):
            identify_retrieval_heads(model, **options)


def test_compresskv_rejects_heads_of_another_model(models):
    result = identify_retrieval_heads(models["llama"], samples=1, length=8, answer_length=2)
    ctx = make_ctx(models["phi3"])
    with pytest.raises(ValueError, match="retrieval heads"):
        get_scorer("compresskv", heads=result).score(ctx)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_scorer("compresskv")
    assert any("no retrieval heads" in str(w.message) for w in caught)

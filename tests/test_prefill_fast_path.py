"""The one-shot prefill through compress() computes the stock model's logits (its first forward into an empty
cache attends like the model's own SDPA call, on the model's own key/value tensors), and ``gatekv bench decode``'s
rows and columns on a tiny model (never timings)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from gatekv import compress
from gatekv.bench import DECODE_COLUMNS, format_decode_table, run_decode_benchmark
from gatekv.models import cache_kwarg
from tiny_models import FAMILIES, random_batch, tiny_model

PREFILL_TOLERANCE = 1e-5  # float32 logits, compressed prefill vs stock, absolute and relative (as tests/test_compress.py)


@pytest.fixture(scope="module")
def models():
    return {family: tiny_model(family) for family in FAMILIES}


def _prefill_logits(model, ids, mask, cache):
    return model(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_kwarg(model): cache}).logits


@pytest.mark.parametrize("pad", [None, [0, 3, 9]], ids=["no_padding", "left_padding"])
@pytest.mark.parametrize("scorer", ["snapkv", "knorm"])
@pytest.mark.parametrize("family", FAMILIES)
def test_one_shot_prefill_logits_equal_stock(models, family, scorer, pad):
    model = models[family]
    ids, mask = random_batch(3, 80, pad=pad)
    with torch.no_grad():
        expected = _prefill_logits(model, ids, mask, DynamicCache(config=model.config))
        with compress(model, scorer, "adakv", budget=0.25, window=8, sinks=2) as session:
            logits = _prefill_logits(model, ids, mask, session.new_cache())
    assert session.stats.events and session.stats.events[0].kind == "prefill"  # it was compressed after the forward
    valid = mask.bool()
    torch.testing.assert_close(logits[valid], expected[valid], atol=PREFILL_TOLERANCE, rtol=PREFILL_TOLERANCE)


def test_bench_decode_rows_and_columns(models):
    model = models["llama"]
    ids, _ = random_batch(1, 96)
    lines = []
    results = run_decode_benchmark(model, ids, budgets=(0.25,), scorers=("snapkv",), allocators=("uniform", "adakv"),
                                   steps=2, warmup=1, window=8, sinks=2, chunk_size=32, log=lines.append)
    labels = [r.label for r in results]
    assert labels == ["full", "dense floor@0.25", "snapkv+uniform@0.25", "snapkv+adakv@0.25",
                      "snapkv+uniform@0.25 chunked"]
    assert [r.kind for r in results] == ["full", "floor", "one_shot", "one_shot", "chunked"]
    for r in results:  # a progress line per setting, with its decode time
        assert any(line.startswith(f"  {r.label}: prefill") and "ms/token" in line for line in lines)
    floor = results[1]
    assert floor.cache_tokens == 24 and floor.kv_bytes < results[0].kv_bytes
    for r in results[2:]:
        assert r.kv_bytes < 0.5 * results[0].kv_bytes  # 25% kept + room for the 3 decode steps
    table = format_decode_table(results, header="header")
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    header_cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert header_cells == list(DECODE_COLUMNS)
    assert {"KV MiB", "decode ms", "x full", "x floor", "prefill s", "prefill x full"} <= set(header_cells)
    body = {cells[0]: cells for cells in ([c.strip() for c in row.strip("|").split("|")] for row in rows[1:])}
    assert list(body) == labels
    x_floor = header_cells.index("x floor")
    prefill_ratio = header_cells.index("prefill x full")
    assert body["full"][x_floor] == "-" and body["dense floor@0.25"][prefill_ratio] == "-"
    for label in labels[2:]:
        float(body[label][x_floor]), float(body[label][prefill_ratio])  # measured ratios, whatever their value
    score = header_cells.index("scoring x full prefill")
    end_vs_floor = header_cells.index("KV end x floor")
    own = header_cells.index("scoring / own prefill")
    assert body["full"][score] == "-" and body["full"][end_vs_floor] == "-" and body["full"][own] == "-"
    for label, r in zip(labels[2:], results[2:]):
        assert r.score_seconds is not None and r.score_seconds <= r.prefill_seconds
        float(body[label][score]), float(body[label][end_vs_floor])
        assert 0.0 <= float(body[label][own]) <= 1.0 and float(body[label][own]) == round(
            r.score_seconds / r.prefill_seconds, 3)


def test_bench_decode_rounds_interleave_without_changing_the_decode(models):
    """Splitting the timed steps into rounds (every setting in turn, sessions re-entered) decodes the same greedy
    tokens per setting as one round, and times every step."""
    model = models["llama"]
    ids, _ = random_batch(1, 80)
    kwargs = dict(budgets=(0.3,), scorers=("snapkv",), allocators=("uniform", "adakv"), steps=5, warmup=1, window=8,
                  sinks=2, chunk_size=32)
    one = run_decode_benchmark(model, ids, rounds=1, **kwargs)
    three = run_decode_benchmark(model, ids, rounds=3, **kwargs)
    assert [r.label for r in one] == [r.label for r in three]
    for a, b in zip(one, three):
        assert a.tokens == b.tokens and len(a.tokens) == 6
        assert len(b.decode_ms_all) == 5
        assert a.kv_bytes == b.kv_bytes and a.kv_bytes_end == b.kv_bytes_end


def test_bench_decode_prefill_rounds_report_medians_and_decode_the_same(models, monkeypatch):
    """prefill_rounds = 3: every setting's prefill runs three times (fresh caches, interleaved: the full cache last in
    every round, the others starting one later each round), the reported prefill and scoring seconds are the medians
    of the three, and the decode (from the last round's caches) is unchanged."""
    import gatekv.bench as bench

    model = models["llama"]
    ids, _ = random_batch(1, 80)
    kwargs = dict(budgets=(0.3,), scorers=("snapkv",), allocators=("uniform", "adakv"), steps=3, warmup=1, window=8,
                  sinks=2, chunk_size=32, rounds=1)
    one = run_decode_benchmark(model, ids, prefill_rounds=1, **kwargs)
    measured: dict[str, list] = {}
    original = bench._Run.prefill

    def recording(run, model, input_ids):
        original(run, model, input_ids)
        stats = run.session.stats.score_seconds if run.session is not None else None
        measured.setdefault(run.label, []).append((run.prefill_seconds, stats))
        calls.append(run.label)

    calls: list[str] = []

    monkeypatch.setattr(bench._Run, "prefill", recording)
    three = run_decode_benchmark(model, ids, prefill_rounds=3, **kwargs)
    assert [r.label for r in one] == [r.label for r in three] and sorted(measured) == sorted(r.label for r in one)
    labels = [r.label for r in one]
    n = len(labels)
    others = labels[1:]
    assert labels[0] == "full"
    for round_index in range(3):  # round r: the others from the r-th on, then the full cache
        expected = others[round_index:] + others[:round_index] + ["full"]
        assert calls[round_index * n:(round_index + 1) * n] == expected
    for a, b in zip(one, three):
        assert a.tokens == b.tokens and a.kv_bytes == b.kv_bytes
        runs = measured[b.label]
        assert len(runs) == 3
        assert b.prefill_seconds == sorted(p for p, _ in runs)[1]
        if b.score_seconds is not None:
            assert b.score_seconds == sorted(s for _, s in runs)[1]
    assert sum(r.score_seconds is not None for r in three) == 3  # uniform, adakv, chunked
    with pytest.raises(ValueError, match="prefill_rounds"):
        run_decode_benchmark(model, ids, prefill_rounds=0, **kwargs)


def test_bench_decode_measures_a_saved_adapter_by_its_directory(models, tmp_path):
    from gatekv.bench import _resolve_scorers
    from gatekv.heads import Adapter, build_heads

    model = models["llama"]
    heads = build_heads("linear_gate", model, hidden=0)
    Adapter(heads, base_model="tiny:llama", target="teacher").save_pretrained(tmp_path / "my-gate")
    resolved = _resolve_scorers(["snapkv", str(tmp_path / "my-gate")], model)
    assert resolved[0] == "snapkv" and resolved[1][0] == "my-gate"
    ids, _ = random_batch(1, 64)
    results = run_decode_benchmark(model, ids, budgets=(0.25,), scorers=tuple(resolved[1:]), allocators=("adakv",),
                                   steps=1, warmup=0, window=8, sinks=2, chunk_size=None)
    assert [r.label for r in results] == ["full", "dense floor@0.25", "my-gate+adakv@0.25"]
    assert results[2].kept_per_head is not None and results[2].kv_bytes < results[0].kv_bytes


def test_bench_decode_measures_an_adapter_once_per_heads_dtype(models, tmp_path):
    from gatekv.bench import _resolve_scorers
    from gatekv.heads import Adapter, build_heads

    model = models["llama"]
    Adapter(build_heads("attention_gate", model), base_model="tiny:llama", target="cis").save_pretrained(tmp_path / "g")
    resolved = _resolve_scorers(["snapkv", str(tmp_path / "g")], model, ("float32", "bfloat16"))
    assert [r if isinstance(r, str) else r[0] for r in resolved] == ["snapkv", "g (float32)", "g (bfloat16)"]
    assert [next(r[1].parameters()).dtype for r in resolved[1:]] == [torch.float32, torch.bfloat16]
    with pytest.raises(ValueError, match="heads dtype must be one of"):
        _resolve_scorers([str(tmp_path / "g")], model, ("int4",))

"""Each scorer equals a naive loop reference on small random inputs."""

from __future__ import annotations

import math

import pytest
import torch

from gatekv.scorers import LayerContext, available_scorers, get_scorer

B, H_KV, GROUP, T, Q, D = 2, 2, 3, 12, 5, 8


def make_ctx(seed=0, window=3):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, H_KV, T, D, generator=g)
    values = torch.randn(B, H_KV, T, D, generator=g)
    positions = torch.arange(T).repeat(B, H_KV, 1)
    positions[1, :, :2] = -1  # row 1 left-padded by 2
    positions[0, 1, 3] = -1  # an empty slot in one head
    queries = torch.randn(B, H_KV * GROUP, Q, D, generator=g)
    query_positions = torch.arange(T - Q, T).repeat(B, 1)
    return LayerContext(
        layer_idx=0,
        num_layers=1,
        module=torch.nn.Identity(),
        keys=keys,
        values=values,
        positions=positions,
        candidates=positions >= 0,
        queries=queries,
        query_positions=query_positions,
        new_slots=torch.full((B, H_KV), T - Q),
        scale=D**-0.5,
        window_size=window,
    )


def naive_attention_row(ctx, b, qh, i):
    """Softmax weights (T,) of query i of query head qh in row b."""
    h = qh // GROUP
    weights = torch.zeros(T)
    logits = []
    for j in range(T):
        allowed = ctx.positions[b, h, j] >= 0 and ctx.positions[b, h, j] <= ctx.query_positions[b, i]
        logits.append(float(ctx.queries[b, qh, i] @ ctx.keys[b, h, j]) * ctx.scale if allowed else -math.inf)
    m = max(logits)
    exps = [math.exp(l - m) if l > -math.inf else 0.0 for l in logits]
    total = sum(exps)
    for j in range(T):
        weights[j] = exps[j] / total
    return weights


def test_registry_lists_builtin_scorers():
    assert {"streaming_llm", "h2o", "snapkv", "tova", "knorm", "random"} <= set(available_scorers())


@pytest.mark.parametrize("pooling", ["avg", "max"])
@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_snapkv(pooling, kernel_size):
    ctx = make_ctx(window=3)
    scores = get_scorer("snapkv", kernel_size=kernel_size, pooling=pooling).score(ctx)
    for b in range(B):
        for h in range(H_KV):
            raw = torch.zeros(T)
            for g in range(GROUP):
                for i in range(Q - 3, Q):
                    raw += naive_attention_row(ctx, b, h * GROUP + g, i)
            raw /= 3 * GROUP
            pad = kernel_size // 2
            expected = torch.zeros(T)
            for j in range(T):
                neighbours = raw[max(0, j - pad) : min(T, j + pad + 1)]
                expected[j] = neighbours.max() if pooling == "max" else neighbours.mean()
            torch.testing.assert_close(scores[b, h], expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("pooling", ["avg", "max"])
@pytest.mark.parametrize("kernel_size, length", [(2, 9), (4, 9), (5, 9), (7, 3), (5, 1), (6, 2)])
def test_pool_scores_equals_a_naive_window(pooling, kernel_size, length):
    """pool_scores = the mean / max over slots [j - k // 2, j - k // 2 + k) inside the row (even kernels, rows shorter
    than the kernel included); -inf slots stay out of a max unless the window has nothing else."""
    from gatekv.window_scores import pool_scores

    scores = torch.randn(2, 3, length, generator=torch.Generator().manual_seed(kernel_size * 10 + length))
    if pooling == "max":
        scores[0, 0, 0] = -math.inf
    pooled = pool_scores(scores, kernel_size, pooling)
    for b in range(2):
        for h in range(3):
            for j in range(length):
                window = scores[b, h, max(0, j - kernel_size // 2) : min(length, j - kernel_size // 2 + kernel_size)]
                expected = window.max() if pooling == "max" else window.mean()
                torch.testing.assert_close(pooled[b, h, j], expected, atol=1e-6, rtol=1e-6)


def test_h2o_accumulates_over_every_query_and_forwards():
    ctx = make_ctx()
    scorer = get_scorer("h2o", query_block=2)
    scores = scorer.score(ctx)
    for b in range(B):
        for h in range(H_KV):
            total = torch.zeros(T)
            seen = torch.zeros(T)
            for i in range(Q):
                for g in range(GROUP):
                    total += naive_attention_row(ctx, b, h * GROUP + g, i) / GROUP
                for j in range(T):
                    p = ctx.positions[b, h, j]
                    seen[j] += float(p >= 0 and p <= ctx.query_positions[b, i])
            torch.testing.assert_close(scores[b, h], total / seen.clamp(min=1), atol=1e-6, rtol=1e-5)
    # a second forward adds to the stored sums
    again = scorer.score(ctx)
    torch.testing.assert_close(again, scores, atol=1e-6, rtol=1e-5)  # same queries twice: same mean
    assert torch.allclose(ctx.state["h2o_count"], 2 * (ctx.state["h2o_count"] / 2))


def test_tova_last_query_mean_over_all_heads():
    ctx = make_ctx()
    scores = get_scorer("tova").score(ctx)
    for b in range(B):
        expected = sum(naive_attention_row(ctx, b, qh, Q - 1) for qh in range(H_KV * GROUP)) / (H_KV * GROUP)
        for h in range(H_KV):
            torch.testing.assert_close(scores[b, h], expected, atol=1e-6, rtol=1e-5)


def test_knorm_and_streaming_llm():
    ctx = make_ctx()
    torch.testing.assert_close(get_scorer("knorm").score(ctx), -ctx.keys.norm(dim=-1))
    assert torch.equal(get_scorer("streaming_llm").score(ctx), ctx.positions.float())


def test_random_is_reproducible_and_seed_dependent():
    ctx = make_ctx()
    a = get_scorer("random", seed=1).score(ctx)
    assert torch.equal(a, get_scorer("random", seed=1).score(ctx))
    assert not torch.equal(a, get_scorer("random", seed=2).score(ctx))
    assert a.shape == (B, H_KV, T)


def test_new_token_scores_keep_old_scores():
    ctx = make_ctx()
    ctx.state["s"] = torch.arange(B * H_KV * T, dtype=torch.float32).reshape(B, H_KV, T)
    new = torch.full((B, H_KV, Q), -7.0)
    full = ctx.new_token_scores(new, "s")
    assert torch.equal(full[..., : T - Q], torch.arange(B * H_KV * T, dtype=torch.float32).reshape(B, H_KV, T)[..., : T - Q])
    assert bool((full[..., T - Q :] == -7.0).all())

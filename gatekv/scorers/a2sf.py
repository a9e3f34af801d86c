"""A2SF: H2O's accumulated attention with a forgetting factor (older contributions decay)."""

import torch

from gatekv.kernels import window_attention
from gatekv.scorers.base import LayerContext, Scorer, register_scorer


@register_scorer("a2sf")
class A2SFScorer(Scorer):
    """A2SF (Jo & Shin, 2024): s_h[j] <- gamma * s_h[j] + mean over g in G(h) of A[g, i, j] for every query i in order.

    Over one forward with n real queries (padding queries are not steps), query i contributes
    ``gamma ** (number of real queries after i)`` times its attention, and the stored sum of earlier forwards is
    multiplied by ``gamma ** n``. The sum lives in the per-slot state ``a2sf_sum`` (B, H_kv, T) and follows
    compaction like H2O's. ``gamma = 1`` is H2O's plain sum (without its count normalisation). Queries are processed
    in blocks of ``query_block`` (memory ``O(block * T)``). Returns (B, H_kv, T) float32.
    """

    state_names = ("a2sf_sum",)

    def __init__(self, gamma: float = 0.99, query_block: int = 256):
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 < gamma <= 1.0:
            raise ValueError(f"a2sf: gamma must be in (0, 1], got {gamma!r}")
        if isinstance(query_block, bool) or not isinstance(query_block, int) or query_block < 1:
            raise ValueError(f"a2sf: query_block must be a positive int, got {query_block!r}")
        self.gamma = float(gamma)
        self.query_block = query_block

    def score(self, ctx: LayerContext) -> torch.Tensor:
        batch, heads, t = ctx.positions.shape
        real = (ctx.query_positions >= 0).float()  # (B, q)
        later = real.flip(-1).cumsum(-1).flip(-1) - real  # (B, q) real queries after each query
        decay = torch.tensor(self.gamma, dtype=torch.float64, device=real.device) ** later.double()
        total = torch.zeros(batch, heads, t, device=ctx.keys.device)
        q_len = ctx.queries.shape[2]
        for q0 in range(0, q_len, self.query_block):
            q1 = min(q_len, q0 + self.query_block)
            attention = window_attention(
                ctx.queries[:, :, q0:q1], ctx.query_positions[:, q0:q1], ctx.keys, ctx.positions, ctx.scale
            )  # (B, H_q, block, T); padding queries give zero rows
            weights = (decay[:, q0:q1] * real[:, q0:q1]).float()  # (B, block)
            summed = torch.einsum("bgqt,bq->bgt", attention, weights)
            total += summed.reshape(batch, heads, ctx.group_size, t).mean(dim=2)
        old = torch.nan_to_num(ctx.state.get("a2sf_sum", torch.zeros_like(total)), nan=0.0)
        steps = real.sum(-1).double()  # (B,)
        old_decay = (torch.tensor(self.gamma, dtype=torch.float64, device=real.device) ** steps).float()
        ctx.state["a2sf_sum"] = old * old_decay[:, None, None] + total
        return ctx.state["a2sf_sum"]

"""H2O: accumulated attention ("heavy hitters"), normalised by how many queries saw each token."""

import torch

from gatekv.kernels import window_attention
from gatekv.scorers.base import LayerContext, Scorer, register_scorer


@register_scorer("h2o")
class H2OScorer(Scorer):
    """s_h[j] = (sum over every query i that saw j, mean over g in G(h), of A[i, j]) / (number of such queries).

    Accumulated across forwards (chunks, decode steps) in the per-slot state. Queries are processed in blocks of
    ``query_block`` so memory is ``O(block * T)``, never ``T x T``. The recent window is protected by the session.
    """

    state_names = ("h2o_sum", "h2o_count")

    def __init__(self, query_block: int = 256):
        if not isinstance(query_block, int) or query_block < 1:
            raise ValueError(f"h2o: query_block must be a positive int, got {query_block!r}")
        self.query_block = query_block

    def score(self, ctx: LayerContext) -> torch.Tensor:
        batch, heads, t = ctx.positions.shape
        total = torch.zeros(batch, heads, t, device=ctx.keys.device)
        seen = torch.zeros(batch, heads, t, device=ctx.keys.device)
        q_len = ctx.queries.shape[2]
        for q0 in range(0, q_len, self.query_block):
            q1 = min(q_len, q0 + self.query_block)
            queries, query_positions = ctx.queries[:, :, q0:q1], ctx.query_positions[:, q0:q1]
            attention = window_attention(queries, query_positions, ctx.keys, ctx.positions, ctx.scale)
            total += attention.sum(dim=2).reshape(batch, heads, ctx.group_size, t).mean(dim=2)
            sees = (ctx.positions[:, :, None, :] >= 0) & (
                ctx.positions[:, :, None, :] <= query_positions[:, None, :, None]
            )
            seen += sees.sum(dim=2).float()
        old_total = torch.nan_to_num(ctx.state.get("h2o_sum", torch.zeros_like(total)), nan=0.0)
        old_seen = torch.nan_to_num(ctx.state.get("h2o_count", torch.zeros_like(seen)), nan=0.0)
        ctx.state["h2o_sum"] = old_total + total
        ctx.state["h2o_count"] = old_seen + seen
        return ctx.state["h2o_sum"] / ctx.state["h2o_count"].clamp(min=1.0)

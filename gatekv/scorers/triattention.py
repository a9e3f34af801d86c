"""TriAttention: score keys by the distance preference implied by pre-RoPE query centres, plus a norm term."""

from __future__ import annotations

import torch

from gatekv.scorers.base import LayerContext, Scorer, register_scorer
from gatekv.scorers.expected_attention import average_rotation, masked_mean, query_statistics_mask, rope_frequencies


def geometric_offsets(max_offset: int) -> torch.Tensor:
    """(n,) float64 future distances 1, 2, 4, ..., <= max_offset."""
    offsets, value = [], 1
    while value <= max_offset:
        offsets.append(value)
        value *= 2
    return torch.tensor(offsets, dtype=torch.float64)


@register_scorer("triattention")
class TriAttentionScorer(Scorer):
    """TriAttention (Mao et al., 2026), training-free: query centres from the current forward's pre-RoPE queries.

    RoPE pairs dims (f, f + r/2) of a head into complex numbers z_f = x_f + i x_{f+r/2} with frequency omega_f.
    For query head g the centre is c_f = E[q_f] over the statistics queries (:func:`query_statistics_mask`) and
    a_f = E[|q_f|]. For a post-RoPE key k_j (k_f its pre-RoPE pair, p_j its position) and a future query position p,
    the logit of the centre is the trigonometric series over the distance delta = p - p_j:

        trig_g(j, p) = sum_f s |c_f| |k_f| cos(omega_f * delta + arg c_f - arg k_f) + sum_{pass dims} c_d k_d

    (s: RoPE attention scaling; the pass-through dims of Phi-3's partial rotary are the zero-frequency terms).
    It is averaged over the future positions p = last + Delta, Delta in ``offsets`` (default 1, 2, 4, ...,
    ``max_offset``; ``"linear"``: 1 ... max_offset), which equals (R_bar c) . k_j with R_bar the mean RoPE matrix.
    The norm term credits the query spread the centre does not capture (queries off-centre can still align):

        norm_g(j) = sum_f (a_f - |c_f|) * s |k_f| + sum_{pass dims} (E|q_d| - |c_d|) |k_d|

    s_h[j] = scale * aggregate over g in G(h) (``mean`` or ``max``) of (mean_p trig_g(j, p) + norm_g(j)).
    Returns (B, H_kv, T) float32. The paper calibrates the centres offline; here they come from the prompt.
    """

    needs = frozenset({"pre_rope"})

    def __init__(
        self,
        max_offset: int = 65536,
        offsets: str = "geometric",
        recent: int | None = None,
        n_sink: int = 4,
        use_norm: bool = True,
        aggregation: str = "mean",
    ):
        if isinstance(max_offset, bool) or not isinstance(max_offset, int) or max_offset < 1:
            raise ValueError(f"triattention: max_offset must be an int >= 1, got {max_offset!r}")
        if offsets not in ("geometric", "linear"):
            raise ValueError(f"triattention: offsets must be 'geometric' or 'linear', got {offsets!r}")
        if recent is not None and (isinstance(recent, bool) or not isinstance(recent, int) or recent < 1):
            raise ValueError(f"triattention: recent must be an int >= 1 or None, got {recent!r}")
        if isinstance(n_sink, bool) or not isinstance(n_sink, int) or n_sink < 0:
            raise ValueError(f"triattention: n_sink must be an int >= 0, got {n_sink!r}")
        if not isinstance(use_norm, bool):
            raise ValueError(f"triattention: use_norm must be a bool, got {use_norm!r}")
        if aggregation not in ("mean", "max"):
            raise ValueError(f"triattention: aggregation must be 'mean' or 'max', got {aggregation!r}")
        self.max_offset = max_offset
        self.offsets = offsets
        self.recent = recent
        self.n_sink = n_sink
        self.use_norm = use_norm
        self.aggregation = aggregation

    def _offsets(self, device) -> torch.Tensor:
        if self.offsets == "linear":
            return torch.arange(1, self.max_offset + 1, dtype=torch.float64, device=device)
        return geometric_offsets(self.max_offset).to(device)

    def score(self, ctx: LayerContext) -> torch.Tensor:
        if ctx.pre_rope_queries is None:
            raise ValueError("triattention needs ctx.pre_rope_queries (the session requests them via needs)")
        queries = ctx.pre_rope_queries.float()  # (B, H_q, q, d)
        batch, num_q, _, d = queries.shape
        weights = query_statistics_mask(ctx.query_positions, self.recent, self.n_sink)
        centre = masked_mean(queries, weights)  # (B, H_q, d)
        last = ctx.query_positions.amax(-1).double()
        future = last[:, None] + self._offsets(last.device)[None]
        rotation = average_rotation(ctx.module, future, d)[:, None]  # (B, 1, d, d)
        keys = ctx.keys.float().repeat_interleave(ctx.group_size, dim=1)  # (B, H_q, T, d) post-RoPE
        scores = (keys @ (rotation @ centre[..., None])).squeeze(-1)  # (B, H_q, T): mean trig series
        if self.use_norm:
            _, _, rotary = rope_frequencies(ctx.module)
            half = rotary // 2

            def pair_abs(x):  # (..., d) -> (..., r/2 + d - r): |z_f| of rotary pairs, |x_d| of pass dims
                pairs = torch.sqrt(x[..., :half] ** 2 + x[..., half:rotary] ** 2)
                return torch.cat([pairs, x[..., rotary:].abs()], dim=-1)

            spread = masked_mean(pair_abs(queries), weights) - pair_abs(centre)  # (B, H_q, r/2 + d - r) >= 0
            scores = scores + (pair_abs(keys) @ spread[..., None]).squeeze(-1)  # post-RoPE |k_f| = s |k_f pre|
        scores = scores.reshape(batch, ctx.num_kv_heads, ctx.group_size, -1)
        scores = scores.mean(dim=2) if self.aggregation == "mean" else scores.amax(dim=2)
        return ctx.scale * scores

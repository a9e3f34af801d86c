"""ExpectedAttention: a Gaussian model of future queries; score = expected softmax weight x ||v_j||."""

from __future__ import annotations

import torch

from gatekv.scorers.base import LayerContext, Scorer, register_scorer


def rope_frequencies(module: torch.nn.Module) -> tuple[torch.Tensor, float, int]:
    """RoPE of an attention module, read from its ``config`` (transformers' rotate-half convention).

    Returns ``inv_freq`` (r/2,) float64 angular frequencies, the attention scaling that multiplies cos/sin (1 except
    for YaRN/LongRoPE) and the rotary width ``r`` (``< head_dim`` for Phi-3's partial rotary: dims ``r:`` pass through).
    """
    config = getattr(module, "config", None)
    head_dim = getattr(module, "head_dim", None)
    if config is None or head_dim is None:
        raise ValueError(f"RoPE-aware scorers need an attention module with config and head_dim, got {type(module).__name__}")
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)
        dim = int(head_dim * factor)
        inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        scaling = 1.0
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"unsupported rope_type {rope_type!r}")
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None)
    inv_freq = torch.as_tensor(inv_freq, dtype=torch.float64)
    return inv_freq, float(scaling), 2 * inv_freq.numel()


def average_rotation(module: torch.nn.Module, positions: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Mean RoPE matrix over a set of query positions: R_bar[b] = mean over n of R(positions[b, n]).

    positions: (B, n) float64 absolute positions -> (B, d, d) float32. R(p) maps a pre-RoPE query to the post-RoPE
    query at position p (scaling included, pass-through dims identity), so ``R_bar @ q`` is the query averaged over
    those positions and ``(R_bar @ q) . k_post`` the mean logit against a cached post-RoPE key.
    """
    inv_freq, scaling, rotary = rope_frequencies(module)
    inv_freq = inv_freq.to(positions.device)
    angles = positions.double()[:, :, None] * inv_freq  # (B, n, r/2)
    cos = angles.cos().mean(1) * scaling  # (B, r/2)
    sin = angles.sin().mean(1) * scaling
    half = rotary // 2
    batch = positions.shape[0]
    matrix = torch.zeros(batch, head_dim, head_dim, dtype=torch.float64, device=positions.device)
    idx = torch.arange(half, device=positions.device)
    matrix[:, idx, idx] = cos
    matrix[:, idx + half, idx + half] = cos
    matrix[:, idx, idx + half] = -sin
    matrix[:, idx + half, idx] = sin
    rest = torch.arange(rotary, head_dim, device=positions.device)
    matrix[:, rest, rest] = 1.0
    return matrix.float()


def query_statistics_mask(query_positions: torch.Tensor, recent: int | None, n_sink: int) -> torch.Tensor:
    """(B, q) float weights of the queries that define the statistics of future queries.

    Real queries (position >= 0), without the first ``n_sink`` positions of the sequence (attention-sink outliers;
    kept if nothing else is left), restricted to the last ``recent`` real ones when ``recent`` is set.
    """
    real = query_positions >= 0
    chosen = real & (query_positions >= n_sink)
    chosen = torch.where(chosen.any(-1, keepdim=True), chosen, real)
    if recent is not None:
        from_end = chosen.long().flip(-1).cumsum(-1).flip(-1)  # 1 for the last chosen query
        chosen &= from_end <= recent
    return chosen.float()


def masked_mean(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """x: (B, H, q, ...) ; weights: (B, q) -> (B, H, ...) mean over the weighted queries."""
    shape = (weights.shape[0], 1, weights.shape[1]) + (1,) * (x.dim() - 3)
    w = weights.reshape(shape)
    return (x * w).sum(2) / w.sum(2).clamp(min=1.0)


@register_scorer("expected_attention")
class ExpectedAttentionScorer(Scorer):
    """ExpectedAttention (Devoto et al., 2025): score keys by the attention that *future* queries are expected to pay.

    Pre-RoPE queries of the current forward (``ctx.pre_rope_queries``: after Qwen3's q-norm, split from Phi-3's
    fused qkv) give per query head g a mean mu_g (d,) and covariance Sigma_g (d, d) (population covariance over the
    statistics queries, see :func:`query_statistics_mask`). RoPE is averaged over the next ``n_future`` positions of
    each row (last position + 1 ... + n_future): R_bar (d, d) (partial rotary: pass-through dims identity).
    With mu' = R_bar mu_g, Sigma' = R_bar Sigma_g R_bar^T and post-RoPE keys k_j:

        z_g[j] = scale * mu'.k_j + scale^2 / 2 * k_j^T Sigma' k_j      (log E[exp(scale * q.k_j)], q ~ N(mu', Sigma'))
        s_h[j] = (mean over g in G(h) of softmax_j(z_g)[j] + epsilon) * ||v_j||

    softmax over candidate slots only. Returns (B, H_kv, T) float32.
    """

    needs = frozenset({"pre_rope"})

    def __init__(
        self,
        n_future: int = 512,
        recent: int | None = None,
        n_sink: int = 4,
        use_covariance: bool = True,
        use_vnorm: bool = True,
        epsilon: float = 0.0,
    ):
        if isinstance(n_future, bool) or not isinstance(n_future, int) or n_future < 1:
            raise ValueError(f"expected_attention: n_future must be an int >= 1, got {n_future!r}")
        if recent is not None and (isinstance(recent, bool) or not isinstance(recent, int) or recent < 1):
            raise ValueError(f"expected_attention: recent must be an int >= 1 or None, got {recent!r}")
        if isinstance(n_sink, bool) or not isinstance(n_sink, int) or n_sink < 0:
            raise ValueError(f"expected_attention: n_sink must be an int >= 0, got {n_sink!r}")
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon >= 0:
            raise ValueError(f"expected_attention: epsilon must be a number >= 0, got {epsilon!r}")
        for name, value in (("use_covariance", use_covariance), ("use_vnorm", use_vnorm)):
            if not isinstance(value, bool):
                raise ValueError(f"expected_attention: {name} must be a bool, got {value!r}")
        self.n_future = n_future
        self.recent = recent
        self.n_sink = n_sink
        self.use_covariance = use_covariance
        self.use_vnorm = use_vnorm
        self.epsilon = float(epsilon)

    def score(self, ctx: LayerContext) -> torch.Tensor:
        if ctx.pre_rope_queries is None:
            raise ValueError("expected_attention needs ctx.pre_rope_queries (the session requests them via needs)")
        queries = ctx.pre_rope_queries.float()  # (B, H_q, q, d)
        batch, num_q, _, d = queries.shape
        weights = query_statistics_mask(ctx.query_positions, self.recent, self.n_sink)  # (B, q)
        mean = masked_mean(queries, weights)  # (B, H_q, d)
        last = ctx.query_positions.amax(-1).double()  # (B,)
        future = last[:, None] + torch.arange(1, self.n_future + 1, device=last.device, dtype=torch.float64)
        rotation = average_rotation(ctx.module, future, d)[:, None]  # (B, 1, d, d)
        mean = (rotation @ mean[..., None]).squeeze(-1)  # (B, H_q, d)
        keys = ctx.keys.float().repeat_interleave(ctx.group_size, dim=1)  # (B, H_q, T, d)
        logits = ctx.scale * (keys @ mean[..., None]).squeeze(-1)  # (B, H_q, T)
        if self.use_covariance:
            centred = (queries - masked_mean(queries, weights)[:, :, None]) * weights[:, None, :, None]
            covariance = centred.transpose(-1, -2) @ centred / weights.sum(-1).clamp(min=1.0)[:, None, None, None]
            covariance = rotation @ covariance @ rotation.transpose(-1, -2)  # (B, H_q, d, d)
            logits = logits + ctx.scale**2 / 2 * ((keys @ covariance) * keys).sum(-1)
        candidates = ctx.candidates.repeat_interleave(ctx.group_size, dim=1)
        probabilities = torch.nan_to_num(torch.softmax(logits.masked_fill(~candidates, float("-inf")), dim=-1), nan=0.0)
        scores = probabilities.reshape(batch, ctx.num_kv_heads, ctx.group_size, -1).mean(dim=2)
        if self.use_vnorm:
            scores = (scores + self.epsilon) * ctx.values.float().norm(dim=-1)
        return scores

"""``HeadsScorer``: a set of small trainable per-layer modules that is also a :class:`~gatekv.scorers.Scorer`.

Each decoder layer gets one module. A module maps what it reads about the layer's *new* tokens (pre-RoPE q/k/v, or
the attention block's input hidden states) to one score per token and KV head::

    layer_scores(layer_idx, features, valid) -> (B, H_kv, q)

Training calls :meth:`HeadsScorer.layer_scores` directly (with gradients); inside ``gatekv.compress`` the same
module is a scorer: a token's score is computed once when it enters the cache and kept with its slot (Locret style),
so old tokens are never re-scored.

Adapters (``gatekv_config.json`` + ``adapter_model.safetensors`` + model card) are written and read by
:class:`gatekv.heads.adapter.Adapter` (shortcuts: ``gatekv.heads.save_adapter`` / ``load_adapter``); nothing here
does file I/O.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from gatekv.heads.config import HeadConfig, ModelFingerprint
from gatekv.registry import Registry
from gatekv.scorers.base import LayerContext, Scorer

__all__ = ["HEAD_CLASSES", "HeadsScorer", "head_class"]

# Context fields each ``needs`` entry brings (LayerContext attribute names = feature names).
FEATURES_OF_NEED = {
    "pre_rope": ("pre_rope_queries", "pre_rope_keys", "pre_rope_values"),
    "hidden_states": ("hidden_states",),
}


class HeadsScorer(nn.Module, Scorer):
    """Per-layer trainable scorers for one base model. Subclasses set ``head_type``, ``needs`` and ``build_layer``.

    config: the :class:`HeadConfig` (type, dimensions, fingerprint of the base model)
    """

    head_type: ClassVar[str] = ""
    state_names: ClassVar[tuple[str, ...]] = ("head_scores",)
    pool_kernel: int = 1
    """Inference only: max-pool width over neighbouring slots before ranking (:meth:`set_pooling`)."""
    use_recency: bool = True
    """Inference only: add the learned recency bias (with ``recency_buckets``); :meth:`set_recency`."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.head_type:
            HEAD_CLASSES.add(cls.head_type, cls, replace=True)  # a subclass may redefine a head type

    def __init__(self, config: HeadConfig):
        super().__init__()
        if config.type != self.head_type:
            raise ValueError(f"{type(self).__name__} needs a {self.head_type!r} config, got type {config.type!r}")
        self.config = config
        self.layers = nn.ModuleList(self.build_layer(i) for i in range(config.fingerprint.num_layers))
        if config.recency_buckets > 0:
            # (Ly, H_kv, n) bias on log-bucketed distance to the newest token, zero at the start (content-only)
            fp = config.fingerprint
            self.recency = nn.Parameter(torch.zeros(fp.num_layers, fp.num_kv_heads, config.recency_buckets))

    # -- to implement ----------------------------------------------------------------------------------------------
    def build_layer(self, layer_idx: int) -> nn.Module:
        """The module of one layer: ``forward(inputs: dict[str, Tensor], valid (B, q) bool) -> (B, H_kv, q)`` with
        ``inputs`` from :meth:`layer_inputs`."""
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model, **options) -> "HeadsScorer":
        """Fresh (randomly initialised) heads sized for ``model``; ``options`` are :class:`HeadConfig` fields."""
        return cls(HeadConfig.from_model(model, cls.head_type, **options))

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Names of the captured per-layer features, e.g. ``("pre_rope_queries", "pre_rope_keys", "pre_rope_values")``."""
        return tuple(name for need in sorted(self.needs) for name in FEATURES_OF_NEED[need])

    def layer_inputs(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the layer modules consume, from captured features: each entry ``(B, q, F)`` (tokens on axis 1).

        features: ``pre_rope_queries`` (B, H_q, q, d), ``pre_rope_keys`` / ``pre_rope_values`` (B, H_kv, q, d),
                  ``hidden_states`` (B, q, D), as listed in :attr:`feature_names`
        """
        return {name: features[name] for name in self.feature_names}

    def layer_scores(self, layer_idx: int, features: dict[str, torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
        """Scores of new tokens for one layer, float32 ``(B, H_kv, q)``, higher = keep (gates: keep logits).

        features: captured features (see :meth:`layer_inputs`), any float dtype (cast to the heads' dtype)
        valid:    (B, q) bool, False for padding tokens (their scores are meaningless)
        """
        param = next(self.parameters())
        inputs = {k: v.to(device=param.device, dtype=param.dtype) for k, v in self.layer_inputs(features).items()}
        return self.layers[layer_idx](inputs, valid.to(param.device)).float()

    def stacked_scores(self, inputs: dict[str, torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
        """Scores of every layer at once (training): inputs ``{name: (Ly, B, q, F)}`` (:meth:`layer_inputs` stacked
        over layers), valid (B, q) prompt mask (tokens first, padding last) -> float32 ``(Ly, B, H_kv, q)``: the
        content scores plus, with ``recency_buckets``, the recency bias of each token's distance to the row's last
        valid token (what :meth:`score` adds at inference relative to the newest cached token)."""
        scores = self.stacked_content_scores(inputs, valid)
        if self.config.recency_buckets > 0:
            steps = torch.arange(valid.shape[1], device=scores.device)
            last = valid.to(scores.device).long().sum(-1, keepdim=True) - 1  # (B, 1)
            distance = (last - steps[None]).clamp(min=0)  # (B, q); padding slots are masked by the caller
            scores = scores + self.recency_bias(distance[None, :, None, :])
        return scores

    def recency_bias(self, distance: torch.Tensor, layer_idx: int | None = None) -> torch.Tensor:
        """Learned bias of a token at ``distance`` (>= 0) tokens before the newest one, float32.

        distance: ``(Ly or 1, B, 1 or H_kv, T)`` with ``layer_idx=None`` (every layer), else ``(B, 1 or H_kv, T)``
        The distance is bucketed on a log2 scale, two buckets per octave (``u = 2 log2(1 + distance)``), and the bias
        interpolated linearly between neighbouring buckets (beyond the last bucket it stays at the last value), per
        (layer, KV head). Zero without ``recency_buckets``.
        """
        if self.config.recency_buckets == 0:
            return torch.zeros((), device=distance.device)
        table = self.recency.float()  # (Ly, H, n)
        if layer_idx is not None:
            table = table[layer_idx : layer_idx + 1]
            distance = distance[None]
        n = table.shape[-1]
        u = (2.0 * torch.log2(1.0 + distance.to(table.device).float().clamp(min=0))).clamp(max=n - 1)
        low = u.floor().long().clamp(max=n - 1)
        high = (low + 1).clamp(max=n - 1)
        frac = u - low.float()
        layers, heads = table.shape[0], table.shape[1]
        shape = (layers, distance.shape[1], heads, distance.shape[-1])
        flat = table.reshape(layers, 1, heads, n).expand(layers, shape[1], heads, n)
        low_b, high_b = low.expand(shape), high.expand(shape)
        bias = torch.gather(flat, -1, low_b) * (1 - frac.expand(shape)) + torch.gather(flat, -1, high_b) * frac.expand(shape)
        return bias if layer_idx is None else bias[0]

    def stacked_content_scores(self, inputs: dict[str, torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
        """The layer modules' scores of every layer, ``(Ly, B, H_kv, q)`` float32, before any recency bias.
        Subclasses may batch the layers."""
        param = next(self.parameters())
        out = []
        for layer, module in enumerate(self.layers):
            layer_in = {k: v[layer].to(device=param.device, dtype=param.dtype) for k, v in inputs.items()}
            out.append(module(layer_in, valid.to(param.device)).float())
        return torch.stack(out)

    def score(self, ctx: LayerContext) -> torch.Tensor:
        """Scorer interface: score the new tokens once, keep old slots' scores. Returns ``(B, H_kv, T)`` float32."""
        fp = self.config.fingerprint
        if ctx.num_layers != fp.num_layers or ctx.num_kv_heads != fp.num_kv_heads:
            raise ValueError(
                f"{self.head_type}: heads were built for {fp.num_layers} layers x {fp.num_kv_heads} KV heads, "
                f"the model has {ctx.num_layers} x {ctx.num_kv_heads}"
            )
        features = {}
        for name in self.feature_names:
            value = getattr(ctx, name)
            if value is None:
                raise ValueError(f"{self.head_type}: the layer context lacks {name} (the session did not capture it)")
            features[name] = value
        with torch.no_grad():
            new_scores = self.layer_scores(ctx.layer_idx, features, ctx.query_positions >= 0)
        scores = ctx.new_token_scores(new_scores.to(ctx.keys.device), self.state_names[0])
        if self.pool_kernel > 1:
            # keep spans whole (a number's last digit next to a kept one): max over +-k//2 neighbouring slots
            from gatekv.window_scores import pool_scores

            finite = torch.isfinite(scores)
            pooled = pool_scores(torch.where(finite, scores, float("-inf")), self.pool_kernel, "max")
            scores = torch.where(finite, pooled, scores)
        if self.config.recency_buckets > 0 and self.use_recency:  # distance to the newest token, at every scoring
            newest = torch.where(ctx.candidates, ctx.positions, torch.full_like(ctx.positions, -1)).amax(-1, keepdim=True)
            if ctx.prompt_end is not None:  # chunked prefill: to the prompt's end, as one-shot prefill measures it
                newest = torch.maximum(newest, ctx.prompt_end.to(newest.device)[:, None, None])
            bias = self.recency_bias(newest - ctx.positions, ctx.layer_idx).to(scores.device)
            scores = torch.where(torch.isfinite(scores), scores + bias, scores)
        return scores

    def set_recency(self, enabled: bool) -> "HeadsScorer":
        """Add the learned recency bias at inference (True, the default) or rank by the content scores alone.

        The bias is learned from the training contexts' distances: on SmolLM2 the shipped heads (trained mostly on
        <= 4K contexts) find 0.50 of 8K needles one-shot with it and 0.80 without, and in chunked prefill (512 per
        head, chunks of 512) 0.25 with it and 0.45 without (benchmarks/results/smollm2-chunked/), while at 2K the bias
        is what lowers the real-text KL. Heads without ``recency_buckets`` ignore this."""
        if not isinstance(enabled, bool):
            raise ValueError(f"recency must be true or false, got {enabled!r}")
        self.use_recency = enabled
        return self

    def set_pooling(self, kernel_size: int) -> "HeadsScorer":
        """Max-pool the scores over ``kernel_size`` neighbouring slots at inference (1 = off; odd, >= 1)."""
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"pool_kernel must be an odd int >= 1, got {kernel_size!r}")
        self.pool_kernel = kernel_size
        return self

    def check_model(self, model) -> None:
        """``ValueError`` naming every field in which ``model``'s fingerprint differs from the heads'."""
        self.config.fingerprint.check_matches(ModelFingerprint.from_model(model))

    def extra_repr(self) -> str:
        fp = self.config.fingerprint
        params = sum(p.numel() for p in self.parameters())
        return f"type={self.head_type}, layers={fp.num_layers}, kv_heads={fp.num_kv_heads}, params={params}"

    def __repr__(self) -> str:  # nn.Module's repr, not Scorer's field dump
        return nn.Module.__repr__(self)


HEAD_CLASSES: Registry[HeadsScorer] = Registry("head type", HeadsScorer)
"""The head types (built-ins register when ``gatekv.heads`` is imported, before any module in it)."""


def head_class(head_type: str) -> type[HeadsScorer]:
    """The :class:`HeadsScorer` subclass of ``head_type`` (``ValueError`` listing the valid types)."""
    if head_type not in HEAD_CLASSES:
        raise ValueError(f"unknown head type {head_type!r}; valid: {HEAD_CLASSES.names()}")
    return HEAD_CLASSES.cls(head_type)

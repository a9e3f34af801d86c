"""CompressKV: each layer's semantic retrieval heads choose, from their window attention, what every head keeps."""

from __future__ import annotations

import os
import warnings

import torch

from gatekv.scorers.base import LayerContext, Scorer, register_scorer
from gatekv.scorers.retrieval_heads import RetrievalHeads
from gatekv.window_scores import check_pooling, pool_scores


@register_scorer("compresskv")
class CompressKVScorer(Scorer):
    """CompressKV (token selection part): s[j] = pool(mean over the layer's selected query heads g and window queries i
    of A[g, i, j]), the same for every KV head of the layer (all heads keep the tokens the retrieval heads chose).

    heads: a :class:`RetrievalHeads` (or the path of its JSON, from ``identify_retrieval_heads``) or an explicit
    ``{layer: [query heads]}`` mapping; ``None`` uses every query head (= SnapKV shared across the layer; warns).
    kind / heads_per_layer override the result's selection. CompressKV's offline per-layer budget profile is not
    part of this scorer. Returns (B, H_kv, T) float32.
    """

    def __init__(
        self,
        heads: RetrievalHeads | str | os.PathLike | dict | None = None,
        kind: str | None = None,
        heads_per_layer: int | None = None,
        window: int | None = None,
        kernel_size: int = 5,
        pooling: str = "avg",
    ):
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"compresskv: window must be a positive int or None, got {window!r}")
        check_pooling(kernel_size, pooling, "compresskv")
        if isinstance(heads, (str, os.PathLike)):
            heads = RetrievalHeads.load(heads)
        self._fingerprint = None
        if isinstance(heads, RetrievalHeads):
            self._fingerprint = heads.fingerprint
            selected = dict(enumerate(heads.heads(kind, heads_per_layer)))
        elif isinstance(heads, dict):
            if kind is not None or heads_per_layer is not None:
                raise ValueError("compresskv: kind/heads_per_layer only apply to a RetrievalHeads result")
            selected = {}
            for layer, chosen in heads.items():
                chosen = sorted({int(h) for h in chosen})
                if not chosen or min(chosen) < 0:
                    raise ValueError(f"compresskv: heads[{layer}] must be non-empty query-head indices, got {chosen}")
                selected[int(layer)] = chosen
        elif heads is None:
            warnings.warn("compresskv: no retrieval heads given; every query head selects (layer-shared SnapKV)", stacklevel=2)
            selected = None
        else:
            raise ValueError(f"compresskv: heads must be RetrievalHeads, a JSON path, a dict or None, got {type(heads).__name__}")
        self.heads = selected
        self.window = window
        self.kernel_size = kernel_size
        self.pooling = pooling
        self._checked = False

    def _check(self, ctx: LayerContext) -> None:
        if self._fingerprint is not None:
            num_q = ctx.queries.shape[1]
            got = (ctx.num_layers, num_q, ctx.num_kv_heads)
            want = (self._fingerprint.num_layers, self._fingerprint.num_q_heads, self._fingerprint.num_kv_heads)
            if got != want:
                raise ValueError(
                    f"compresskv: retrieval heads were found on a model with (layers, q heads, kv heads) = {want}, "
                    f"this model has {got}"
                )
        self._checked = True

    def score(self, ctx: LayerContext) -> torch.Tensor:
        if not self._checked:
            self._check(ctx)
        attention = ctx.window_attention(self.window)  # (B, H_q, w, T)
        num_q = attention.shape[1]
        chosen = list(range(num_q)) if self.heads is None else self.heads.get(ctx.layer_idx, list(range(num_q)))
        if max(chosen) >= num_q:
            raise ValueError(f"compresskv: layer {ctx.layer_idx} head {max(chosen)} out of range (H_q = {num_q})")
        shared = attention[:, chosen].mean(dim=(1, 2))  # (B, T)
        shared = pool_scores(shared[:, None], self.kernel_size, self.pooling)  # (B, 1, T)
        return shared.expand(-1, ctx.num_kv_heads, -1).contiguous()

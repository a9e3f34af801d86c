"""The ``oracle`` method of the real-text tasks: the Locret CIS label of the target itself used as the eviction score.

For a real-text sample the tokens fed after the compressed prefix (``sample.rest_ids(mode)``: the continuation for
``lm``; the instruction, cue and span for query-agnostic ``recall``) are known in advance. Their queries give each
prefix token its CIS label (max pre-softmax logit over those rows and the GQA group, exactly the label the retaining
heads are trained on, :class:`gatekv.training.capture.TrainingCapture`). Keeping the label's top-k sees the future,
so it is not a method anyone can deploy: it bounds what a head trained to predict that label can reach on the same
samples and budget, through the same allocators and compacted cache. An eval config names it as
``{name: oracle, scorer: oracle, allocators: [...]}``; it applies to the real-text tasks only::

    labels = oracle_labels(model, sample, "query_agnostic")   # per layer (1, H_kv, len(prefix))
    scorer = OracleScorer().set_labels(labels)                # then compress the prefix with it
"""

from __future__ import annotations

import torch

from gatekv.scorers.base import LayerContext, Scorer

__all__ = ["ORACLE", "OracleScorer", "cis_labels", "oracle_labels"]

ORACLE = "oracle"
"""The scorer name eval configs use for this method."""


class OracleScorer(Scorer):
    """Scores given per layer (``labels[layer]``: (B, H_kv, P) over positions 0..P-1), set before each prefill.
    Slots at positions beyond the labels (tokens fed after the labelled prefix) score +inf: they are the recent
    tokens a decode step adds, never the prefix's."""

    name = ORACLE

    def __init__(self):
        self.labels: list[torch.Tensor] | None = None

    def set_labels(self, labels: list[torch.Tensor]) -> "OracleScorer":
        self.labels = labels
        return self

    def score(self, ctx: LayerContext) -> torch.Tensor:
        if self.labels is None:
            raise RuntimeError("OracleScorer: set_labels() before compressing (its scores are the target's labels)")
        label = self.labels[ctx.layer_idx].to(ctx.keys.device).float()
        length = label.shape[-1]
        batch = ctx.positions.shape[0]
        index = ctx.positions.clamp(min=0, max=length - 1)
        scores = label.expand(batch, -1, -1).gather(2, index)
        scores = scores.masked_fill(ctx.positions >= length, float("inf"))
        return scores.masked_fill(ctx.positions < 0, float("-inf"))


def oracle_labels(model, sample, mode: str) -> list[torch.Tensor]:
    """Per layer (1, H_kv, P) float32 CIS labels of ``sample.prefix_ids(mode)`` (P tokens) from the queries of every
    token fed after it (``rest_ids(mode)`` without its last token, which predicts nothing scored)."""
    prefix, rest = sample.prefix_ids(mode), sample.rest_ids(mode)
    if len(rest) < 2:
        raise ValueError(f"sample {sample.seed}: nothing follows the prefix, so the oracle has no queries")
    return cis_labels(model, prefix + rest[:-1], len(prefix))


def cis_labels(model, ids: list[int], prefix_length: int) -> list[torch.Tensor]:
    """Per layer (1, H_kv, prefix_length) float32 CIS labels of the first ``prefix_length`` of ``ids`` from the
    queries of the tokens after them: one forward of ``ids`` under
    :class:`~gatekv.training.capture.TrainingCapture` (chunked column maxima, never T x T)."""
    from gatekv.training.capture import TrainingCapture

    if not 0 < prefix_length < len(ids):
        raise ValueError(f"prefix_length must be in (0, {len(ids)}), got {prefix_length}")
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    positions = torch.arange(len(ids), device=device)[None]
    rows = torch.arange(prefix_length, len(ids), device=device)[None]
    with torch.no_grad(), TrainingCapture(model) as capture:
        capture.prepare(torch.ones(1, len(ids), dtype=torch.bool, device=device), positions,
                        label_queries=(rows, rows.clone()))
        model.get_decoder()(input_ids=input_ids, position_ids=positions, use_cache=False)
        return [label[..., :prefix_length].float() for label in capture.labels]

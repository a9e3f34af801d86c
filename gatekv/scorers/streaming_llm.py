"""StreamingLLM: attention sinks + the most recent tokens (sinks are protected by the session)."""

import torch

from gatekv.scorers.base import LayerContext, Scorer, register_scorer


@register_scorer("streaming_llm")
class StreamingLLMScorer(Scorer):
    """Score = position: the most recent tokens rank first; the first ``sinks`` tokens are protected."""

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return ctx.positions.float()

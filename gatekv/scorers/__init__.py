"""Scorers: one file per method; ``get_scorer(name)`` builds one by name."""

from gatekv.scorers import h2o, knorm, random, snapkv, streaming_llm, tova  # noqa: F401  (registration)
from gatekv.scorers import a2sf, cake, compresskv, defensivekv, expected_attention, kvzip, triattention  # noqa: F401
from gatekv.scorers import rank_mix  # noqa: F401
from gatekv.scorers.base import (LayerContext, ReplayChunk, Scorer, ScorerGroup, available_scorers, get_scorer,
                                  register_scorer)

__all__ = ["LayerContext", "ReplayChunk", "Scorer", "ScorerGroup", "available_scorers", "get_scorer", "register_scorer"]

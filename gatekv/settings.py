"""``CompressionConfig``: every compression setting in one validated type, and the one place for their defaults.

:func:`gatekv.compress`, :class:`gatekv.GateKV`, ``gatekv generate`` and :class:`gatekv.eval.EvalConfig` build or
take one; it is checked once, when it is made (``ValueError`` naming the field and the bad value)::

    config = CompressionConfig("snapkv", "adakv", budget=0.1, window=16)
    with compress(model, config) as session:           # the same as compress(model, "snapkv", "adakv", 0.1, ...)
        model.generate(input_ids, max_new_tokens=32)

Scorer, allocator and merger stay as given (a name or an instance): a name is checked against its registry here and
built fresh by every session, so one config serves any number of ``compress()`` calls.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
import torch

from gatekv.allocators.base import ALLOCATORS, Allocator, Budget
from gatekv.merge.base import MERGERS, Merger
from gatekv.scorers.base import SCORERS, Scorer

__all__ = ["CompressionConfig", "DEFAULT_CHUNK_SIZE", "DEFAULT_RESERVE", "DEFAULT_SINKS", "DEFAULT_WINDOW",
           "PREFILL_MODES", "resolve_budget"]

PREFILL_MODES = ("one_shot", "chunked")
DEFAULT_WINDOW = 32
"""Recent tokens always kept (and the scorers' observation window)."""
DEFAULT_SINKS = 4
"""First tokens always kept (attention sinks)."""
DEFAULT_CHUNK_SIZE = 512
"""Tokens per chunk of the chunked prefill."""
DEFAULT_RESERVE = 64
"""Most decode slots per (row, KV head) kept free after a compaction when the generation length is unknown."""


def resolve_budget(value, field_name: str) -> Budget:
    """``value`` (ratio, count or :class:`Budget`) as a :class:`Budget`; ``ValueError`` prefixed with ``field_name``."""
    try:
        return value if isinstance(value, Budget) else Budget(value)
    except ValueError as error:
        raise ValueError(f"{field_name}: {error}") from None


@dataclass
class CompressionConfig:
    """How one :func:`gatekv.compress` context compresses: scorer, allocator, budgets, prefill mode, protected
    tokens, decode room and merging. Validated once in ``__post_init__``."""

    scorer: str | Scorer = "snapkv"
    """Scorer name (``gatekv.available_scorers()``) or instance."""
    allocator: str | Allocator = "uniform"
    """Allocator name (``gatekv.available_allocators()``: uniform, adakv, pyramid, global, cake, ...) or instance."""
    budget: float | int | Budget = 0.1
    """Tokens kept per KV head: a ratio of the prompt (float in (0, 1]) or a count (int); protected tokens included.
    A budget covering the whole prompt is a no-op (the model runs untouched). Stored as a :class:`Budget`."""
    prefill: str = "one_shot"
    """``one_shot`` (full prefill, then compact) or ``chunked`` (evict after each ``chunk_size`` tokens)."""
    chunk_size: int = DEFAULT_CHUNK_SIZE
    """Tokens per chunk of the chunked prefill (peak KV per head <= budget + chunk_size with ``reserve`` None: each
    chunk's compaction leaves room for exactly the next chunk; an int ``reserve`` adds its room)."""
    window: int = DEFAULT_WINDOW
    """Recent tokens that are always kept; also the observation window of the scorers unless ``observe_window``."""
    sinks: int = DEFAULT_SINKS
    """First tokens that are always kept."""
    decode_budget: float | int | Budget | None = None
    """Keep the cache at this size while generating (ratio of the prompt or a count); None = grow. Stored as a
    :class:`Budget`."""
    decode_interval: int = 1
    """With ``decode_budget``: evict once every this many decode steps. Each (row, head) grows up to
    ``decode_budget + decode_interval - 1`` slots, then one eviction, scored by that step's attention, takes it back to
    ``decode_budget`` (the new tokens take the evicted slots in place). 1 = every step past the budget. Larger
    values spread the per-eviction scoring and allocation over that many tokens (kvpress's DecodingPress
    ``compression_interval``); scorers that accumulate over steps (H2O) see only the evicting steps."""
    query: torch.Tensor | None = field(default=None, compare=False)
    """Token ids (q,) or (B, q): query-aware scoring with these tokens as the observation window (they are not
    kept); None = the prompt's own last tokens observe."""
    reserve: int | None = None
    """Free slots per (row, head) after compaction, so decoding appends without copying. None: sized from
    ``model.generate``'s ``max_new_tokens`` (or ``session.expect_new_tokens``), else 1/64 of the prompt (at most
    ``DEFAULT_RESERVE``) regrown geometrically: KV bytes stay at the budget + the generated tokens + <= 2% of the full
    cache. An int: exactly that room after every compaction."""
    observe_window: int | None = None
    """The last prompt tokens whose attention the scorers and allocators observe (SnapKV, DefensiveKV, CAKE,
    ``defensive_budget``'s per-head counts); None = ``window``. Apart from ``window`` it widens what is observed without
    protecting more tokens: on SmolLM2 real text, 64 observers with 32 protected lower the heads + DefensiveKV rank mix's
    KL while a 64-token protected window costs 5% needles (benchmarks/results/smollm2-observe-window/)."""
    record: bool = False
    """Keep the kept positions of every eviction in ``stats.events`` (tests, analysis)."""
    merge: str | Merger | None = None
    """Merger name (``ems``, ``d2o``, ``kvmerger``, ``razor``; ``gatekv.merge``) or instance: dropped tokens are merged
    into kept ones at every eviction (not at a cascade allocator's inner steps)."""

    def __post_init__(self):
        self.budget = resolve_budget(self.budget, "budget")
        if self.prefill not in PREFILL_MODES:
            raise ValueError(f"prefill must be one of {list(PREFILL_MODES)}, got {self.prefill!r}")
        for name, low in (("chunk_size", 1), ("window", 0), ("sinks", 0), ("reserve", 0)):
            value = getattr(self, name)
            if name == "reserve" and value is None:
                continue  # sized from generate's max_new_tokens, or small and growing
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if self.observe_window is not None and (
                isinstance(self.observe_window, bool) or not isinstance(self.observe_window, int) or self.observe_window < 1):
            raise ValueError(f"observe_window must be None or an int >= 1, got {self.observe_window!r}")
        protected = self.sinks + self.window
        if not self.budget.is_ratio and self.budget.value < protected:
            raise ValueError(
                f"budget {self.budget.value} tokens is smaller than sinks + window = {self.sinks} + {self.window}: "
                "the protected tokens alone exceed it"
            )
        if self.decode_budget is not None:
            self.decode_budget = resolve_budget(self.decode_budget, "decode_budget")
            if not self.decode_budget.is_ratio and self.decode_budget.value < protected:
                raise ValueError(f"decode_budget {self.decode_budget.value} is smaller than sinks + window = {protected}")
        if isinstance(self.decode_interval, bool) or not isinstance(self.decode_interval, int) or self.decode_interval < 1:
            raise ValueError(f"decode_interval must be an int >= 1, got {self.decode_interval!r}")
        if self.decode_interval > 1 and self.decode_budget is None:
            raise ValueError(f"decode_interval {self.decode_interval} needs decode_budget (it spaces the decode evictions)")
        if self.query is not None:
            query = torch.as_tensor(self.query)
            if query.dtype not in (torch.int32, torch.int64) or query.dim() not in (1, 2) or query.shape[-1] == 0:
                raise ValueError(f"query must be token ids of shape (q,) or (B, q) with q >= 1, got {tuple(query.shape)} {query.dtype}")
            self.query = query
        for registry, value in ((ALLOCATORS, self.allocator), (MERGERS, self.merge)):
            if value is not None and not isinstance(value, registry.base):
                registry.cls(value)  # ValueError listing the valid names
        self._check_scorer()

    def _check_scorer(self) -> None:
        """The checks that depend on the scorer: a known name; no ``query`` with a replaying scorer."""
        scorer = self.scorer if isinstance(self.scorer, Scorer) else SCORERS.cls(self.scorer)
        if self.query is not None and scorer.replays:
            raise ValueError(f"scorer {scorer.name!r} replays the context (query-agnostic): query= is not supported")

    def replace(self, **changes) -> "CompressionConfig":
        """A copy with ``changes`` applied, validated again."""
        return dataclasses.replace(self, **changes)

    def with_scorer(self, scorer: str | Scorer) -> "CompressionConfig":
        """A copy with another scorer (e.g. an adapter's trained heads); only the scorer's checks run again."""
        config = copy.copy(self)
        config.scorer = scorer
        config._check_scorer()
        return config

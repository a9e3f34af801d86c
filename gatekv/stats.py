"""What a compression session did: :class:`CompressionEvent` (one eviction) and :class:`CompressionStats`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["CompressionEvent", "CompressionStats"]


@dataclass
class CompressionEvent:
    """One eviction: after a prefill (``prefill``), a prefill chunk (``chunk``) or a decode step (``decode``)."""

    kind: str
    kept_tokens: torch.Tensor
    """(num_layers, B, H_kv) tokens held after the eviction."""
    kv_bytes_before: int
    kv_bytes_after: int
    seconds: float
    """Allocation + compaction time."""
    last_position: torch.Tensor
    """(B,) position of the last token processed before the eviction."""
    kept_positions: list[torch.Tensor] | None = None
    """Per layer (B, H_kv, K) positions of the kept tokens (-1 padding); only with ``record=True``."""


@dataclass
class CompressionStats:
    """What a session did: prompt and budget sizes, every eviction, time spent, bytes held."""

    prompt_tokens: torch.Tensor | None = None
    """(B,) non-padding tokens of the compressed prompt."""
    budget_tokens: torch.Tensor | None = None
    """(B,) tokens per KV head the allocator targeted."""
    full_kv_bytes: int = 0
    """Bytes an uncompressed cache would hold for the prompt (same dtype)."""
    events: list[CompressionEvent] = field(default_factory=list)
    score_seconds: float = 0.0
    compact_seconds: float = 0.0
    noop: bool = False
    """True when the budget covered the whole prompt and nothing was changed."""
    cascade_peak_kv_bytes: int = 0
    """Largest KV allocation seen inside a prefill forward, before each layer's cascade re-eviction (CAKE)."""
    replay_seconds: float = 0.0
    """Time of a replaying scorer's extra forwards (KVzip's context reconstruction), their scoring included."""

    @property
    def peak_kv_bytes(self) -> int:
        """Largest KV allocation seen right before an eviction (the prefill peak, cascade steps included)."""
        return max(max((e.kv_bytes_before for e in self.events), default=0), self.cascade_peak_kv_bytes)

    @property
    def kept_tokens(self) -> torch.Tensor | None:
        """(num_layers, B, H_kv) tokens held after the last eviction."""
        return self.events[-1].kept_tokens if self.events else None

    def summary(self) -> str:
        if self.noop:
            return "budget covers the prompt: no compression"
        if not self.events:
            return "nothing compressed yet"
        last = self.events[-1]
        kept = last.kept_tokens.double()
        return (
            f"prompt {self.prompt_tokens.tolist()} tokens, budget {self.budget_tokens.tolist()} per head; "
            f"kept per head mean {kept.mean():.1f} (min {int(kept.min())}, max {int(kept.max())}); "
            f"KV {last.kv_bytes_after / 2**20:.2f} MiB vs full {self.full_kv_bytes / 2**20:.2f} MiB "
            f"({last.kv_bytes_after / max(self.full_kv_bytes, 1):.3f}x); "
            f"score {self.score_seconds:.3f}s, compact {self.compact_seconds:.3f}s, {len(self.events)} evictions"
        )

"""The Scorer interface: one importance score per cached token and KV head, higher = keep.

A scorer sees one layer at a time through a :class:`LayerContext` and returns ``(B, H_kv, T)`` float32 scores for
every slot of that layer's cache (old kept tokens and the tokens of the current forward). The session masks
non-candidate slots (padding, observer queries) and protected tokens (sinks, recent window) itself, so a scorer
only ranks. Trained modules (retaining heads, gates) are scorers too: they read ``pre_rope_*`` or
``hidden_states`` of the new tokens and keep their per-token scores in ``state``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from gatekv.registry import Registry
from gatekv.kernels import window_attention as _window_attention

__all__ = ["LayerContext", "ReplayChunk", "Scorer", "ScorerGroup", "available_scorers", "get_scorer", "register_scorer"]


@dataclass
class ReplayChunk:
    """One extra forward a replaying scorer (``Scorer.replays``, e.g. KVzip) asks the session to run after a prompt
    (chunk) was prefilled: its tokens attend to the cache, are scored like observer queries, and their KV is dropped.

    The session gives the real tokens positions that continue each row's prompt (last position + 1, + 2, ...).
    """

    input_ids: torch.Tensor
    """(B, n) int64 token ids, left-padded."""
    valid: torch.Tensor
    """(B, n) bool: False for padding."""
    span: torch.Tensor
    """(B, 2) int64 ``[start, end)`` positions of the prompt tokens this forward reconstructs (empty: start = end)."""
    row_start: torch.Tensor
    """(B,) int64 position of each row's first prompt token."""


@dataclass
class LayerContext:
    """Everything a scorer may read about one layer during a scoring forward.

    Slot axis ``T``: the layer's cache after the new tokens were appended, padded per (row, KV head). Slot ``t`` of
    head ``h`` in row ``b`` holds the token at position ``positions[b, h, t]`` (``-1``: no token).
    New-token axis ``q``: the tokens of the current forward (in query-aware mode: the observer query tokens).
    """

    layer_idx: int
    """Index of the decoder layer."""
    num_layers: int
    """Number of decoder layers of the model."""
    module: torch.nn.Module
    """The layer's attention module (e.g. ``LlamaAttention``)."""
    keys: torch.Tensor
    """(B, H_kv, T, d) post-RoPE keys of every slot (as attention sees them)."""
    values: torch.Tensor
    """(B, H_kv, T, d_v) values of every slot."""
    positions: torch.Tensor
    """(B, H_kv, T) int64 original RoPE position of every slot, -1 = no token."""
    candidates: torch.Tensor
    """(B, H_kv, T) bool: slots that may be kept (real context tokens; not padding, not observer queries)."""
    queries: torch.Tensor
    """(B, H_q, q, d) post-RoPE queries of the new tokens."""
    query_positions: torch.Tensor
    """(B, q) int64 positions of the new tokens, -1 for padding."""
    new_slots: torch.Tensor
    """(B, H_kv) int64 slot of the first new token of each head (new token i sits at ``new_slots + i``)."""
    scale: float
    """Softmax scale of the attention (usually ``d ** -0.5``)."""
    window_size: int
    """Observation window ``w``: the last ``w`` new queries are the window queries."""
    hidden_states: torch.Tensor | None = None
    """(B, q, D) input of the attention block for the new tokens (after the input norm); set if requested."""
    pre_rope_queries: torch.Tensor | None = None
    """(B, H_q, q, d) queries before RoPE (after q-norm for Qwen3); set if requested."""
    pre_rope_keys: torch.Tensor | None = None
    """(B, H_kv, q, d) keys before RoPE (after k-norm for Qwen3); set if requested."""
    pre_rope_values: torch.Tensor | None = None
    """(B, H_kv, q, d_v) values of the new tokens; set if requested."""
    replay: ReplayChunk | None = None
    """The replay forward being scored (replaying scorers only); None during the prompt's own forwards."""
    prompt_end: torch.Tensor | None = None
    """(B,) position of the prompt's last token, set while a prompt is compressed. With chunked prefill it lies
    ahead of this forward's tokens: a scorer that measures a token's distance to the newest one (the trained heads'
    recency bias) measures it to here, as one-shot prefill does, so an early chunk's eviction ranks tokens as the
    final one will. None = not known."""
    protected: torch.Tensor | None = None
    """(B, H_kv, T) bool: candidate slots the session keeps whatever the scores (the sinks and the recent window);
    None where the caller did not say."""
    budget_share: torch.Tensor | None = None
    """(B,) float: the kept tokens per KV head that this scoring step allocates, as a share of the row's tokens (the
    prompt's while it is compressed, the tokens so far at a decode eviction). None where the budget is not known yet
    (a shared prefill, whose forks take several budgets)."""
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per-slot scorer state, each (B, H_kv, T) float32 (NaN for slots never scored). Scorers may replace
    entries; the session stores them back with the cache (they follow compaction)."""
    _window_cache: dict = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA group size)."""
        return self.queries.shape[1] // self.keys.shape[1]

    def window_queries(self, window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The last ``window`` new queries ``(B, H_q, w, d)`` and their positions ``(B, w)`` (-1 = padding)."""
        w = min(self.window_size if window is None else window, self.queries.shape[2])
        return self.queries[:, :, -w:], self.query_positions[:, -w:]

    def window_attention(self, window: int | None = None) -> torch.Tensor:
        """Softmax attention of the window queries over every slot: ``(B, H_q, w, T)`` float32.

        Causal by position; padding queries give all-zero rows. Computed once per window size and reused.
        """
        w = min(self.window_size if window is None else window, self.queries.shape[2])
        if w not in self._window_cache:
            queries, query_positions = self.window_queries(w)
            self._window_cache[w] = _window_attention(queries, query_positions, self.keys, self.positions, self.scale)
        return self._window_cache[w]

    def defensive_scores(self, window: int | None = None, kernel_size: int = 5, pooling: str = "avg") -> torch.Tensor:
        """DefensiveKV's pooled window scores (:func:`gatekv.window_scores.defensive_scores`) of the candidates,
        ``(B, H_kv, T)`` float32; computed once per (window, pooling) and reused (a DefensiveKV rank-mix member and the
        ``defensive_budget`` allocator read the same ones). Treat the result as read-only."""
        from gatekv.window_scores import defensive_scores

        w = min(self.window_size if window is None else window, self.queries.shape[2])
        key = ("defensive", w, kernel_size, pooling)
        if key not in self._window_cache:
            self._window_cache[key] = defensive_scores(self.window_attention(w), self.candidates, kernel_size, pooling)
        return self._window_cache[key]

    def new_token_scores(self, new_scores: torch.Tensor, name: str) -> torch.Tensor:
        """Store per-token scores of the new tokens in ``state[name]`` and return the full slot scores.

        new_scores: (B, H_kv, q) scores computed once when a token enters (Locret style)
        returns:    (B, H_kv, T) scores of every slot (old slots keep the score they got when they entered)
        """
        batch, heads, t = self.positions.shape
        stored = self.state.get(name)
        if stored is None:
            stored = torch.full((batch, heads, t), float("nan"), device=self.keys.device)
        stored = stored.clone()
        q = new_scores.shape[-1]
        slots = self.new_slots[:, :, None] + torch.arange(q, device=stored.device)
        stored.scatter_(2, slots.clamp(max=t - 1), new_scores.float())
        self.state[name] = stored
        return stored


class Scorer:
    """Base class: implement :meth:`score`; set ``needs`` to ask for optional context fields.

    ``needs`` may contain ``"hidden_states"`` and ``"pre_rope"`` (pre-RoPE q/k/v of the new tokens);
    ``state_names`` lists the per-slot state entries the scorer keeps across forwards. A scorer with
    ``replays = True`` gets extra forwards after each prompt (chunk): :meth:`replay_inputs` says what they feed; the
    scores of the last one decide the eviction.
    """

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    state_names: ClassVar[tuple[str, ...]] = ()
    replays: ClassVar[bool] = False
    uses_tokenizer: ClassVar[bool] = False
    """Whether :meth:`bind_tokenizer` matters (KVzip builds its repeat prompt from the tokenizer); wrappers that hold
    a tokenizer (``GateKV``, ``gatekv eval``, the teacher target) bind it to such scorers."""
    needs_budget: bool = False
    """Whether the scores depend on the step's budget (``LayerContext.budget_share``): such a scorer cannot score a
    shared prefill that is forked at several budgets."""

    def bind_tokenizer(self, tokenizer) -> "Scorer":
        """Take what the scorer needs from ``tokenizer``; returns ``self``. The default needs nothing."""
        return self

    def score(self, ctx: LayerContext) -> torch.Tensor:
        """Return ``(B, H_kv, T)`` float32 importance of every slot of ``ctx``; higher = keep."""
        raise NotImplementedError

    def take_guide(self) -> torch.Tensor | None:
        """The count guide of the last :meth:`score` call, ``(B, H_kv, T)``, for an allocator that splits counts by
        it (``needs_guide``), or None: then the allocator takes the returned scores. Cleared by the call."""
        return None

    def replay_inputs(self, token_ids: torch.Tensor, token_positions: torch.Tensor, start: int,
                      end: int) -> list[ReplayChunk]:
        """Replaying scorers: the forwards to run after the prompt columns ``start:end`` were prefilled.

        token_ids: (B, L) the whole prompt (left-padded); token_positions: (B, L) int64, -1 = padding.
        """
        raise NotImplementedError(f"{type(self).__name__} does not replay")

    def __repr__(self) -> str:
        fields = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in fields.items())})"


class ScorerGroup(Scorer):
    """Several scorers scored on one forward (a shared prefill). The session trims their stored scores with
    :meth:`trim` when a replay's slots are dropped; ``members`` are checked like single scorers (trained heads)."""

    members: dict[str, Scorer]
    """label -> scorer."""

    def trim(self, layer_idx: int, width: int) -> None:
        """Drop stored scores of layer ``layer_idx`` past slot ``width``."""
        raise NotImplementedError

    def _take_members(self, members: dict[str, Scorer]) -> None:
        """Set ``members`` and the union of their ``needs`` and ``state_names``."""
        self.members = members
        self.needs = frozenset().union(*(s.needs for s in members.values()))
        self.state_names = tuple(dict.fromkeys(n for s in members.values() for n in s.state_names))


SCORERS: Registry[Scorer] = Registry("scorer", Scorer)
"""The registered scorers: ``register_*`` (class decorator), ``available_*`` (sorted names), ``get_*`` (an instance from a
name and options, or the instance itself). Built-ins register when ``gatekv.scorers`` is imported."""


register_scorer = SCORERS.register
available_scorers = SCORERS.names
get_scorer = SCORERS.get

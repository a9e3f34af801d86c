"""CompressedCache: a transformers ``Cache`` whose every (batch row, KV head) keeps its own number of tokens.

Per layer, the tokens live in flat buffers, one contiguous *segment* per (row, KV head) (layout in
``gatekv/kernels/reference.py``). Segments have preallocated growth room: a decode step writes one token per
segment in place. The room is what the caller declared it will append (``CompressedCache.expect``: generate's
``max_new_tokens``) or, when unknown, ``reserve`` slots, regrown geometrically in the appended tokens when full
(O(log n) reallocations for n tokens), so the bytes stay at the kept tokens + the generated ones + a small room.
Compaction gathers the kept slots into new, right-sized buffers and drops the old ones, so the allocated bytes
follow the budget, not the prompt. Keys are stored post-RoPE with their original positions; new tokens continue
from the true (logical) sequence length, which ``get_seq_length`` reports.
"""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from gatekv import kernels
from gatekv.kernels import torch_ragged

__all__ = ["CompressedCache", "CompressedLayer", "ForwardTokens", "full_cache_kv_bytes"]


class ForwardTokens:
    """What every layer's append shares about one forward's new tokens, computed once instead of once per layer.

    positions: (B, q) int64, -1 = padding. ``padding``: some new token is padding; ``row_min`` (B,): each row's
    smallest real position (int64 max for a row of padding only); :meth:`per_segment`: positions per segment.
    """

    def __init__(self, positions: torch.Tensor):
        self.positions = positions
        self.padding = bool((positions < 0).any())
        real = torch.where(positions >= 0, positions, torch.full_like(positions, torch.iinfo(torch.long).max))
        self.row_min = real.min(-1).values
        self._expanded: dict[int, torch.Tensor] = {}

    def per_segment(self, heads: int) -> torch.Tensor:
        """(B * heads, q) positions, segment ``b * heads + h`` = row ``b`` (cached per ``heads``)."""
        if heads not in self._expanded:
            batch, q = self.positions.shape
            self._expanded[heads] = self.positions[:, None, :].expand(batch, heads, q).reshape(batch * heads, q)
        return self._expanded[heads]


class CompressedLayer(CacheLayerMixin):
    """One layer of a :class:`CompressedCache`.

    keys (N_cap, d), values (N_cap, d_v), positions (N_cap,) int64 (-1 = no token), starts/caps/lengths (S,) int64
    with S = B * H_kv segments (s = b * H_kv + h), state: per-slot scorer state {name: (N_cap,) float32}.
    """

    is_compileable = False
    is_croppable = True  # the newest tokens can always be dropped again (assisted decoding's rejected drafts)

    def __init__(self, reserve: int = 64, growth: float = 1.5):
        super().__init__()
        self.reserve = reserve
        self.growth = growth
        self.expected = 0  # tokens the caller declared it will still append (0 = unknown)
        self.appended = 0  # tokens appended since the last compaction (the geometric growth's base)
        self.positions: torch.Tensor | None = None
        self.starts = self.caps = self.lengths = None
        self.state: dict[str, torch.Tensor] = {}
        self.batch_size = 0
        self.num_heads = 0
        self.regrow_count = 0
        self.has_padding = False  # some filled slot holds no token (left padding not yet compacted away)
        self.min_position = None  # (B,) lower bound of the positions held per row (sliding-window check)
        self._host_layout: tuple[list[int], list[int]] | None = None
        self._free: int | None = None  # free_slots(), None = not known
        self._flat_mask: torch_ragged.FlatDecodeMask | None = None  # flat_mask(), None = not built

    # -- transformers layer API --------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, head_dim = key_states.shape
        device = key_states.device
        self.batch_size, self.num_heads = batch, heads
        self.keys = key_states.new_zeros(0, head_dim)
        self.values = value_states.new_zeros(0, value_states.shape[-1])
        self.positions = torch.zeros(0, dtype=torch.long, device=device)
        zeros = torch.zeros(batch * heads, dtype=torch.long, device=device)
        self.starts, self.caps, self.lengths = zeros.clone(), zeros.clone(), zeros.clone()
        self._layout_changed()
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("CompressedLayer.update needs token positions; call CompressedCache.update")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.max_length()

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.reserve, self.growth)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep/reorder batch rows: row ``i`` of the result is old row ``indices[i]`` (beam search, batch select)."""
        if not self.is_initialized:
            return
        indices = indices.to(self.starts.device).long()
        segments = (indices[:, None] * self.num_heads + torch.arange(self.num_heads, device=indices.device)).reshape(-1)
        self._relayout(segments, self.lengths[segments], extra=self.caps[segments] - self.lengths[segments])
        self.batch_size = indices.numel()

    def batch_repeat_interleave(self, repeats: int) -> None:
        rows = torch.arange(self.batch_size, device=self.starts.device).repeat_interleave(repeats)
        self.batch_select_indices(rows)

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the ``-tokens_to_remove`` newest tokens of every row (transformers' convention: n <= 0 removes -n).

        Evicted tokens are gone, but the newest ones were appended after every eviction (they are protected by the
        recent window), so dropping them restores the cache to what it held before they came. Per row, the slots whose
        position is among the row's ``n`` newest are dropped; when they are the segments' last slots (always, unless
        ``decode_budget`` refilled evicted slots in place) this only shortens the segments.
        """
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes the number of tokens to remove as n <= 0, got {tokens_to_remove}")
        n = -tokens_to_remove
        if n == 0 or not self.is_initialized or self.lengths.numel() == 0:
            return
        t = self.max_length()
        slot = torch.arange(t, device=self.starts.device)
        filled = slot[None, :] < self.lengths[:, None]  # (S, T)
        rows = torch.where(filled, self.starts[:, None] + slot[None, :], torch.zeros_like(slot)[None, :])
        positions = torch.where(filled, self.positions[rows], torch.full_like(rows, -1))
        row_last = positions.reshape(self.batch_size, -1).amax(-1)  # (B,)
        cutoff = (row_last - n + 1).repeat_interleave(self.num_heads)[:, None]  # (S, 1)
        keep = filled & ~(positions >= cutoff)
        counts = keep.sum(-1)
        if bool((keep == (slot[None, :] < counts[:, None])).all()):  # the dropped slots are each segment's last ones
            self.lengths = counts
        else:
            order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices  # kept slots first, in order
            self._relayout(torch.arange(counts.numel(), device=counts.device), counts, extra=self.caps - counts,
                           indices=order)
        self._layout_changed()
        self.appended = max(self.appended - n, 0)
        if self.expected:
            self.expected += n

    # -- ragged storage ------------------------------------------------------------------------------------------
    def max_length(self) -> int:
        """Largest number of filled slots over segments (0 before the first token)."""
        if not self.is_initialized or self.lengths.numel() == 0:
            return 0
        return int(self.lengths.max().item())

    def kv_bytes(self) -> int:
        """Bytes allocated for keys and values (capacity included)."""
        if not self.is_initialized:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def allocated_bytes(self) -> int:
        """All bytes this layer holds: keys, values, positions, scorer state and segment tables."""
        if not self.is_initialized:
            return 0
        extra = sum(t.numel() * t.element_size() for t in (self.positions, self.starts, self.caps, self.lengths))
        extra += sum(t.numel() * t.element_size() for t in self.state.values())
        return self.kv_bytes() + extra

    def _buffers(self) -> tuple[list[torch.Tensor], list[float | int], list[str]]:
        names = list(self.state)
        return (
            [self.keys, self.values, self.positions, *(self.state[n] for n in names)],
            [0, 0, -1, *([float("nan")] * len(names))],
            names,
        )

    def _relayout(self, segments: torch.Tensor, counts: torch.Tensor, extra: torch.Tensor, indices=None) -> None:
        """Rebuild the buffers: new segment i takes old segment ``segments[i]``'s slots ``indices[i, :counts[i]]``
        (default: its first ``counts[i]`` slots) and gets capacity ``counts[i] + extra[i]``."""
        if indices is None:
            k_max = int(counts.max().item()) if counts.numel() else 0
            indices = torch.arange(k_max, device=counts.device).expand(counts.numel(), k_max)
        caps = counts + extra
        order = None
        if not caps.is_cuda:  # the CPU flat decode path reads shorter windows in this order (GPU kernels need none)
            order = torch_ragged.flat_order(caps.tolist(), counts.tolist(), self.num_heads)
        starts, rows = kernels.layout_from_caps(caps, order)
        buffers, fills, names = self._buffers()
        new = kernels.compact(buffers, self.starts[segments], indices, counts, starts, rows, fills)
        self.keys, self.values, self.positions = new[0], new[1], new[2]
        self.state = dict(zip(names, new[3:]))
        self.starts, self.caps, self.lengths = starts, caps, counts.clone()
        self._layout_changed()
        self.has_padding = self._any_padding()

    def _filled_rows(self) -> torch.Tensor:
        """Flat row index of every filled slot, segment by segment."""
        offsets = torch.arange(int(self.lengths.sum().item()), device=self.lengths.device)
        first = torch.cumsum(self.lengths, 0) - self.lengths
        return torch.repeat_interleave(self.starts - first, self.lengths) + offsets

    def _any_padding(self) -> bool:
        """True if a filled slot holds no token (position -1)."""
        if self.positions is None or self.positions.numel() == 0:
            return False
        return bool((self.positions[self._filled_rows()] < 0).any())

    def _layout_changed(self) -> None:
        """Drop what is derived from the layout (starts, caps, lengths): the host copy, the free slots, the flat mask."""
        self._host_layout = None
        self._free = None
        self._flat_mask = None

    def flat_mask(self) -> "torch_ragged.FlatDecodeMask | None":
        """The layout's :class:`~gatekv.kernels.torch_ragged.FlatDecodeMask` for the PyTorch flat decode path (built
        on first use, kept up to date by decode appends), or None where that path does not apply: a regular layout
        (one SDPA call over strided views), more than ``FLAT_MAX_HEADS`` KV heads, an empty segment, CUDA tensors."""
        if self._flat_mask is None:
            if (not self.is_initialized or self.keys.is_cuda or not 0 < self.num_heads <= torch_ragged.FLAT_MAX_HEADS
                    or self.lengths.numel() == 0):
                return None
            starts, lengths = self.host_layout()
            if min(lengths) == 0 or torch_ragged.regular_stride(starts, lengths, self.keys.shape[0]) is not None:
                return None
            self._flat_mask = torch_ragged.FlatDecodeMask.build(self.starts, self.caps, self.lengths, self.batch_size,
                                                                self.num_heads)
        return self._flat_mask

    def host_layout(self) -> tuple[list[int], list[int]]:
        """Segment starts and lengths as Python lists (cached until the layout changes)."""
        if self._host_layout is None:
            self._host_layout = (self.starts.tolist(), self.lengths.tolist())
        return self._host_layout

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor, positions: torch.Tensor,
               tokens: "ForwardTokens | None" = None) -> None:
        """Write new tokens after each segment's filled slots.

        key_states: (B, H_kv, q, d) post-RoPE; value_states: (B, H_kv, q, d_v); positions: (B, q) int64, -1 = padding
        tokens:     what every layer of the forward shares about ``positions`` (:class:`ForwardTokens`, computed once
                    per forward by :class:`CompressedCache`); None = computed here
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, heads, q, _ = key_states.shape
        if (batch, heads) != (self.batch_size, self.num_heads):
            raise ValueError(
                f"cache holds batch {self.batch_size} x {self.num_heads} KV heads, got keys of shape {tuple(key_states.shape)}"
            )
        if tokens is None:
            tokens = ForwardTokens(positions)
        remaining = max(self.expected - q, 0)
        if self.free_slots() < q:
            need = self.lengths + q
            if remaining:  # the caller said how many tokens follow: room for exactly those
                slack = torch.full_like(need, max(remaining, 1))
            elif q == 1:  # decode of unknown length: geometric in the appended tokens, O(log n) regrowths
                slack = torch.full_like(need, max(self.reserve, 1, math.ceil((self.appended + q) * (self.growth - 1))))
            else:  # prefill chunk: exact size, compaction follows
                slack = torch.full_like(need, self.reserve)
            all_segments = torch.arange(need.numel(), device=need.device)
            self._relayout(all_segments, self.lengths, extra=need - self.lengths + slack)
            self.regrow_count += 1
        free = self.free_slots()
        segments = batch * heads
        buffers, _, names = self._buffers()
        if q == 1 and not key_states.is_cuda:
            # decode on CPU: one indexed write per buffer at row starts + lengths (append_reference for q = 1, without
            # the per-call checks: the cache built these tensors); GPUs keep the one-launch Triton kernel
            rows = self.starts + self.lengths
            new = [key_states.reshape(segments, -1), value_states.reshape(segments, -1), tokens.per_segment(heads)[:, 0]]
            for buf, values in zip(buffers, new):
                buf.index_copy_(0, rows, values.to(buf.dtype))
            for buf in buffers[3:]:
                buf.index_fill_(0, rows, float("nan"))
            if self._flat_mask is not None:
                self._flat_mask.fill(rows)
        else:
            self._flat_mask = None
            new = [key_states.reshape(segments, q, -1), value_states.reshape(segments, q, -1), tokens.per_segment(heads)]
            nan = torch.full((segments, q), float("nan"), device=key_states.device)
            new += [nan] * len(names)
            kernels.append(buffers, self.starts, self.lengths, new)
        self.lengths = self.lengths + q
        self._free = free - q
        self.expected = remaining
        self.appended += q
        if self._host_layout is not None:  # every segment grew by q
            self._host_layout = (self._host_layout[0], [length + q for length in self._host_layout[1]])
        self.has_padding = self.has_padding or tokens.padding
        self.min_position = tokens.row_min if self.min_position is None else torch.minimum(self.min_position, tokens.row_min)

    def free_slots(self) -> int:
        """The fewest free slots over segments (cached until the layout changes): an append of ``q <= free_slots()``
        tokens needs no regrowth."""
        if self._free is None:
            self._free = int((self.caps - self.lengths).min().item()) if self.lengths.numel() else 0
        return self._free

    def compact(self, indices: torch.Tensor, counts: torch.Tensor, reserve: int | None = None, merge=None) -> None:
        """Keep, per (row, head), the slots ``indices[b, h, :counts[b, h]]`` (ascending); free everything else.

        indices: (B, H_kv, K_max) int64; counts: (B, H_kv) int64. New capacity = counts + ``reserve`` (default: the
        tokens declared to follow, else the layer's ``reserve``).
        merge:   optional ``(sources, targets, weights, source_counts)``: dropped slots (B, H_kv, E) merged into the
                 kept token of rank ``targets`` (B, H_kv, E) with ``weights`` (B, H_kv, E); ``source_counts``
                 (B, H_kv) valid entries (``kernels.merge``). Keys and values change; positions do not.
        """
        if reserve is None:
            reserve = self.expected if self.expected else self.reserve
        segments = self.batch_size * self.num_heads
        flat_counts = counts.reshape(segments).to(self.lengths.device)
        if bool((flat_counts > self.lengths).any()):
            raise ValueError("keep plan keeps more slots than a segment holds")
        old_keys, old_values, old_starts = self.keys, self.values, self.starts
        self._relayout(
            torch.arange(segments, device=self.lengths.device),
            flat_counts,
            extra=torch.full_like(flat_counts, reserve),
            indices=indices.reshape(segments, -1).to(self.lengths.device),
        )
        self.appended = 0
        if merge is not None:
            flat = [t.reshape(segments, *t.shape[2:]).to(self.lengths.device) for t in merge]
            kernels.merge([self.keys, self.values], self.starts, [old_keys, old_values], old_starts, *flat)

    def evict_in_place(self, indices: torch.Tensor, counts: torch.Tensor) -> None:
        """Keep, per (row, head), the slots ``indices[b, h, :counts[b, h]]``, inside the current buffers: each kept slot
        past ``counts`` moves into a dropped one (``kernels.evict_in_place``), O(dropped x d), capacity unchanged.

        The fixed-size decode eviction (``decode_budget``): the token appended at the tail takes the evicted slot,
        and the freed tail slot takes the next token. Slots stop being in position order; nothing reads them in order.
        """
        segments = self.batch_size * self.num_heads
        flat_counts = counts.reshape(segments).to(self.lengths.device)
        if bool((flat_counts > self.lengths).any()):
            raise ValueError("keep plan keeps more slots than a segment holds")
        buffers, _, _ = self._buffers()
        kernels.evict_in_place(buffers, self.starts, self.lengths, indices.reshape(segments, -1).to(self.lengths.device),
                               flat_counts)
        self.lengths = flat_counts.clone()
        self._layout_changed()
        self.appended = 0  # the size is fixed now: a regrowth (uneven per-head counts) adds the small reserve only

    def dense_view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Padded copies for scoring: keys (B, H, T, d), values (B, H, T, d_v), positions (B, H, T) (-1 pad), state.

        T = the longest segment. When every segment holds T slots at one stride (a uniform allocation, a
        ``decode_budget`` step) keys and values are views of the flat buffers (no copy: read them, do not keep or
        modify them across cache changes); otherwise padded copies. Positions and state are always copies.
        """
        t = self.max_length()
        batch, heads = self.batch_size, self.num_heads
        views = self._regular_views(t)
        if views is not None:
            return views
        slot = torch.arange(t, device=self.starts.device)
        valid = slot[None, :] < self.lengths[:, None]  # (S, T)
        rows = torch.where(valid, self.starts[:, None] + slot[None, :], torch.zeros_like(slot)[None, :])
        keys = self.keys[rows].reshape(batch, heads, t, -1)
        values = self.values[rows].reshape(batch, heads, t, -1)
        positions = torch.where(valid, self.positions[rows], torch.full_like(rows, -1)).reshape(batch, heads, t)
        state = {
            name: torch.where(valid, buf[rows], torch.full_like(buf[rows], float("nan"))).reshape(batch, heads, t)
            for name, buf in self.state.items()
        }
        return keys, values, positions, state

    def _regular_views(self, t: int):
        """``dense_view()`` as views when every segment holds exactly ``t`` slots at one stride, else None."""
        if t == 0 or self.positions is None:
            return None
        starts, lengths = self.host_layout()
        if min(lengths) != t:
            return None
        stride = torch_ragged.regular_stride(starts, lengths, self.keys.shape[0])
        if stride is None:
            return None
        batch, heads = self.batch_size, self.num_heads

        def view(buffer: torch.Tensor) -> torch.Tensor:
            if buffer.dim() == 1:
                return buffer.as_strided((batch, heads, t), (heads * stride, stride, 1), buffer.storage_offset())
            return torch_ragged.segments_view(buffer, batch, heads, stride, t)

        # keys/values (the bulk) as views; positions and state (one number per slot) copied, as callers may keep them
        return (view(self.keys), view(self.values), view(self.positions).clone(),
                {n: view(b).clone() for n, b in self.state.items()})

    def write_state(self, state: dict[str, torch.Tensor]) -> None:
        """Store dense per-slot state (B, H, T) back into the flat buffers (new names are allocated)."""
        t = self.max_length()
        slot = torch.arange(t, device=self.starts.device)
        valid = (slot[None, :] < self.lengths[:, None]).reshape(-1)
        rows = (self.starts[:, None] + slot[None, :]).reshape(-1)[valid]
        for name, dense in state.items():
            if name not in self.state:
                self.state[name] = torch.full((self.keys.shape[0],), float("nan"), device=self.keys.device)
            self.state[name][rows] = dense.reshape(-1)[valid].float()


class CompressedCache(Cache):
    """A transformers cache with per-(row, KV head) lengths, physically compacted by ``compress()``.

    num_layers: decoder layers; reserve: free slots given to every segment after compaction (decode room);
    growth: capacity factor when a segment fills up during decoding.
    """

    def __init__(self, num_layers: int, reserve: int = 64, growth: float = 1.5):
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if reserve < 0:
            raise ValueError(f"reserve must be >= 0, got {reserve}")
        if not growth > 1:
            raise ValueError(f"growth must be > 1, got {growth}")
        super().__init__(layers=[CompressedLayer(reserve, growth) for _ in range(num_layers)])
        self.pending_positions: torch.Tensor | None = None
        self._pending_tokens: ForwardTokens | None = None
        self.logical_length = 0
        self.forwards = 0
        self.compressions = 0

    def begin_forward(self, positions: torch.Tensor, advance: bool = True) -> None:
        """Declare the new tokens of the next forward: ``positions`` (B, q) int64, -1 for padding.

        ``advance=False`` for observer tokens that will not stay in the cache (query-aware scoring).
        """
        self.pending_positions = positions
        self._pending_tokens = ForwardTokens(positions)
        if advance:
            self.logical_length += positions.shape[1]
        self.forwards += 1

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if self.pending_positions is None:
            raise RuntimeError(
                "CompressedCache used outside gatekv.compress(): this cache belongs to a finished (or never started) "
                "compression session; run the forward inside the same `with compress(...)` block, or start a new one"
            )
        tokens = self._pending_tokens
        if tokens is None or tokens.positions is not self.pending_positions:  # set directly, not by begin_forward
            tokens = self._pending_tokens = ForwardTokens(self.pending_positions)
        self.layers[layer_idx].append(key_states, value_states, self.pending_positions, tokens)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Logical tokens processed (pads included), not the physical slots: new positions continue from here."""
        return self.logical_length

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the ``-tokens_to_remove`` newest tokens (n <= 0, transformers 5.2x), e.g. assisted decoding's rejected
        draft tokens; see :meth:`CompressedLayer.crop`."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes the number of tokens to remove as n <= 0, got {tokens_to_remove}")
        if -tokens_to_remove > self.logical_length:
            raise ValueError(f"cannot crop {-tokens_to_remove} tokens: the cache holds {self.logical_length}")
        for layer in self.layers:
            layer.crop(tokens_to_remove)
        self.logical_length += tokens_to_remove

    def expect(self, tokens: int, reserve: int | None = None) -> None:
        """Declare that about ``tokens`` more tokens will be appended (0 = unknown): the next compaction or regrowth
        leaves room for exactly them instead of regrowing as they come. ``reserve``: the room given when the
        count is unknown or exceeded (smallest regrowth step)."""
        for layer in self.layers:
            layer.expected = max(int(tokens), 0)
            if reserve is not None:
                layer.reserve = reserve

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].max_length() if layer_idx < len(self.layers) else 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.layers[layer_idx].get_mask_sizes(query_length)

    @property
    def is_compileable(self) -> bool:
        return False

    def kv_bytes(self) -> int:
        """Bytes allocated for keys and values over all layers (capacity included)."""
        return sum(layer.kv_bytes() for layer in self.layers)

    def allocated_bytes(self) -> int:
        """All bytes held, including positions, scorer state and segment tables."""
        return sum(layer.allocated_bytes() for layer in self.layers)

    def kept_tokens(self) -> torch.Tensor:
        """(num_layers, B, H_kv) int64 tokens held per layer, row and KV head."""
        return torch.stack(
            [layer.lengths.reshape(layer.batch_size, layer.num_heads).cpu() for layer in self.layers]
        )


def full_cache_kv_bytes(config, batch: int, tokens: int, dtype: torch.dtype) -> int:
    """Bytes of an uncompressed cache for ``tokens`` tokens: layers x 2 x B x H_kv x tokens x d."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = torch.empty(0, dtype=dtype).element_size()
    return config.num_hidden_layers * 2 * batch * config.num_key_value_heads * tokens * head_dim * element


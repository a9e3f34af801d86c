"""KVzip: score each cached token by the attention it gets while the model reconstructs the context.

Query-agnostic (Kim et al., 2025, "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction").
"""

from __future__ import annotations

from typing import Sequence

import torch

from gatekv.scorers.base import LayerContext, ReplayChunk, Scorer, register_scorer

REPEAT_PROMPT = "\n\nRepeat the previous context exactly."
CONTINUE_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"


def _token_list(value, name: str) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.flatten().tolist()
    if isinstance(value, (str, bytes)) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise ValueError(f"kvzip: {name} must be a list of token ids (ints >= 0), got {value!r}")
    return list(value)


def _chat_parts(tokenizer) -> tuple[str, str]:
    """Text of the tokenizer's chat template before and after one user turn (('', '\\n') without a template)."""
    if not getattr(tokenizer, "chat_template", None):
        return "", "\n"
    marker = "\x00gatekv-kvzip\x00"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                             add_generation_prompt=True)
    if rendered.count(marker) != 1:
        raise ValueError("kvzip: the tokenizer's chat template does not render the user content verbatim")
    head, tail = rendered.split(marker)
    return head, tail


@register_scorer("kvzip")
class KVzipScorer(Scorer):
    """KVzip context reconstruction, replayed in chunks so memory stays bounded (no T x T buffer).

    After a prompt (chunk) is prefilled, the session runs replay forwards (``replays = True``): for each piece of at
    most ``chunk_size`` prompt tokens (each row's own tokens, in order), the input is::

        first piece:  prompt_ids + suffix_ids + piece           ("Repeat the previous context exactly." + chat tail)
        later pieces: continue_ids + the 8 tokens before the piece + suffix_ids + piece

    attending to the whole cache, with positions continuing the prompt; its KV is dropped afterwards. Per layer, with
    post-RoPE replay queries q_i and keys k_j, a replayed piece covering positions [s, e) of a row gives

        A_g[i, j] = softmax over j' in S(i) of (q_{g,i} . k_j' * scale),  S(i) = {sinks} U [s, e) U {replay keys <= i}
        s_h[j]    = max over replay queries i and g in G(h) of A_g[i, j]        for every cached j in [s, e)

    (the keyset S is KVzip's: the first ``n_sink`` tokens, the piece's own context span and the replay's causal part;
    the model's own forward still attends to the whole cache). Each token is scored once, by the replay of the piece
    that contains it. Leading tokens equal to ``prefix_ids`` (the chat template head) are not reconstructed and score 0,
    as in the peer library; the session protects its sinks and recent window as for every scorer.

    Prefill modes: ``one_shot`` replays the whole prompt after the prefill (the KVzip algorithm). ``chunked`` replays
    each prefill chunk right after it is prefilled, against the kept cache (earlier chunks' kept tokens + this chunk),
    and evicts; earlier tokens keep the score their own chunk's replay gave them (per-slot state ``kvzip``). Tokens
    added while decoding are never replayed: they score 1 (the maximum), so a ``decode_budget`` evicts context first.

    chunk_size:  prompt tokens per replay forward (KVzip: 2048); peak extra memory ~ chunk x cache per layer
    n_sink:      first tokens of each row inside every replay's softmax (attention sinks; KVzip/kvpress: 4)
    prev_tokens: tokens before a later piece quoted after ``continue_ids`` (KVzip: 8)
    query_block: replay queries per block of the score computation (memory only; result unchanged)
    prompt_ids, continue_ids, suffix_ids, prefix_ids: token ids of the repeat prompts, the chat tail that follows
                 them and the chat head not to reconstruct; built from ``tokenizer`` (or :meth:`bind_tokenizer`) when
                 not given; without either the replay is the context alone, right after itself.
    tokenizer:   a tokenizer (optional): the ids above from the default English prompts and its chat template.
    """

    replays = True
    uses_tokenizer = True
    state_names = ("kvzip",)

    def __init__(
        self,
        chunk_size: int = 2048,
        n_sink: int = 4,
        prev_tokens: int = 8,
        query_block: int = 256,
        prompt_ids: Sequence[int] | None = None,
        continue_ids: Sequence[int] | None = None,
        suffix_ids: Sequence[int] | None = None,
        prefix_ids: Sequence[int] | None = None,
        tokenizer=None,
    ):
        for name, value, low in (("chunk_size", chunk_size, 1), ("n_sink", n_sink, 0), ("prev_tokens", prev_tokens, 0),
                                 ("query_block", query_block, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"kvzip: {name} must be an int >= {low}, got {value!r}")
        self.chunk_size, self.n_sink, self.prev_tokens, self.query_block = chunk_size, n_sink, prev_tokens, query_block
        self.prompt_ids = _token_list(prompt_ids, "prompt_ids")
        self.continue_ids = _token_list(continue_ids, "continue_ids")
        self.suffix_ids = _token_list(suffix_ids, "suffix_ids")
        self.prefix_ids = _token_list(prefix_ids, "prefix_ids")
        if tokenizer is not None:
            self.bind_tokenizer(tokenizer)

    def bind_tokenizer(self, tokenizer) -> "KVzipScorer":
        """Fill the token ids not given explicitly from ``tokenizer`` (default prompts, its chat template)."""
        if not hasattr(tokenizer, "encode"):
            raise ValueError(f"kvzip: tokenizer must have an encode() method, got {type(tokenizer).__name__}")
        head, tail = _chat_parts(tokenizer)

        def encode(text: str) -> list[int]:
            return list(tokenizer.encode(text, add_special_tokens=False)) if text else []

        self.prompt_ids = encode(REPEAT_PROMPT) if self.prompt_ids is None else self.prompt_ids
        self.continue_ids = encode(CONTINUE_PROMPT) if self.continue_ids is None else self.continue_ids
        self.suffix_ids = encode(tail) if self.suffix_ids is None else self.suffix_ids
        self.prefix_ids = encode(head) if self.prefix_ids is None else self.prefix_ids
        return self

    # -- replay inputs -------------------------------------------------------------------------------------------
    def replay_inputs(self, token_ids: torch.Tensor, token_positions: torch.Tensor, start: int,
                      end: int) -> list[ReplayChunk]:
        """The replay forwards reconstructing prompt columns ``start:end`` (the chunk just prefilled).

        token_ids: (B, L) whole prompt, left-padded; token_positions: (B, L) int64, -1 = padding.
        Returns one :class:`ReplayChunk` per piece index (rows with fewer pieces are all padding there).
        """
        device = token_ids.device
        prompt, cont = self.prompt_ids or [], self.continue_ids or []
        suffix, prefix = self.suffix_ids or [], self.prefix_ids or []
        rows: list[list[tuple[list[int], int, int]]] = []
        row_starts = []
        for b in range(token_ids.shape[0]):
            real = (token_positions[b, :end] >= 0).nonzero().flatten()
            ids = token_ids[b, real].tolist()
            positions = token_positions[b, real].tolist()
            row_starts.append(positions[0] if positions else 0)
            skip = len(prefix) if prefix and ids[: len(prefix)] == prefix else 0
            first_new = int((real < start).sum())  # index (in the row's real tokens) of the chunk's first token
            begin = max(first_new, skip)
            pieces = []
            for lo in range(begin, len(ids), self.chunk_size):
                hi = min(lo + self.chunk_size, len(ids))
                head = prompt if lo == skip else cont + ids[max(skip, lo - self.prev_tokens) : lo]
                pieces.append((head + suffix + ids[lo:hi], positions[lo], positions[hi - 1] + 1))
            rows.append(pieces)
        chunks = []
        for k in range(max((len(p) for p in rows), default=0)):
            width = max(len(p[k][0]) for p in rows if len(p) > k)
            input_ids = torch.zeros(len(rows), width, dtype=torch.long)
            valid = torch.zeros(len(rows), width, dtype=torch.bool)
            span = torch.zeros(len(rows), 2, dtype=torch.long)
            for b, pieces in enumerate(rows):
                if len(pieces) > k:
                    ids, lo, hi = pieces[k]
                    input_ids[b, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                    valid[b, width - len(ids) :] = True
                    span[b] = torch.tensor([lo, hi])
            chunks.append(ReplayChunk(input_ids.to(device), valid.to(device), span.to(device),
                                      torch.tensor(row_starts, dtype=torch.long, device=device)))
        return chunks

    # -- scores --------------------------------------------------------------------------------------------------
    def score(self, ctx: LayerContext) -> torch.Tensor:
        stored = ctx.state.get("kvzip")
        if stored is None:
            stored = torch.full(ctx.positions.shape, float("nan"), device=ctx.keys.device)
        if ctx.replay is not None:
            stored = self._replay_scores(ctx, stored)
            ctx.state["kvzip"] = stored
        return torch.nan_to_num(stored, nan=1.0)  # never replayed (prompt forward, decode tokens): keep

    def _replay_scores(self, ctx: LayerContext, stored: torch.Tensor) -> torch.Tensor:
        """(B, H_kv, T): ``stored`` with the slots of the replayed span set to their max attention weight."""
        replay = ctx.replay
        positions = ctx.positions  # (B, H_kv, T)
        span = replay.span.to(positions.device)
        row_start = replay.row_start.to(positions.device)[:, None, None]
        lo, hi = span[:, 0, None, None], span[:, 1, None, None]
        in_span = ctx.candidates & (positions >= lo) & (positions < hi)
        replay_slots = (positions >= 0) & ~ctx.candidates
        keyset = in_span | replay_slots | (ctx.candidates & (positions - row_start < self.n_sink))
        batch, heads, t, d = ctx.keys.shape
        group = ctx.group_size
        keys = ctx.keys.float()
        queries = ctx.queries.float().reshape(batch, heads, group, -1, d)  # (B, H_kv, G, n, d)
        keys_t = keys[:, :, None].transpose(-1, -2)  # (B, H_kv, 1, d, T): every query of a group on the same keys
        best = torch.zeros(batch, heads, t, device=keys.device)
        for first in range(0, queries.shape[3], self.query_block):
            q = queries[:, :, :, first : first + self.query_block]
            q_pos = ctx.query_positions[:, first : first + self.query_block].to(positions.device)  # (B, n)
            padded = q_pos < 0
            # an additive 0 / -inf bias over (B, H_kv, n, T), broadcast over the G query heads of a group: one in-place
            # add on the logits instead of a masked copy of them (~3x faster on CPU for the whole block)
            blocked = ~keyset[:, :, None, :] | (positions[:, :, None, :] > q_pos[:, None, :, None])
            blocked |= padded[:, None, :, None]
            bias = torch.zeros(blocked.shape, device=keys.device).masked_fill_(blocked, float("-inf"))
            logits = torch.matmul(q, keys_t).mul_(ctx.scale).add_(bias[:, :, None])
            weights = torch.softmax(logits, dim=-1)
            if bool(padded.any()):  # a padding query has no key (its row is NaN); a real one always sees itself
                weights.nan_to_num_(0.0)
            best = torch.maximum(best, weights.amax(dim=(2, 3)))
        out = torch.where(in_span, best, stored)
        # leading prompt tokens that no replay reconstructs (the chat head): KVzip gives them 0
        before = ctx.candidates & (positions < lo) & torch.isnan(out)
        return out.masked_fill(before, 0.0)

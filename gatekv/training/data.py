"""Training data: load (``datasets``), format (ShareGPT / Alpaca / plain), tokenize with the chat template, split
into prompt (context to evict) and response (future queries), batch by length, iterate resumably.

A tokenized sample is ``Sample(input_ids (L,) int64, prompt_length P)``: tokens ``[0, P)`` are the prompt, ``[P, L)``
the response. Batches (:func:`collate`) are right-padded::

    input_ids (B, L_max) int64, attention_mask (B, L_max) int64, prompt_lengths (B,), lengths (B,)

No Lightning here: :class:`StatefulBatchLoader` is a plain ``DataLoader`` with ``state_dict``/``load_state_dict``
(Lightning stores that state in its checkpoints, so a resumed run continues with the very next batch).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from gatekv.training.config import DataConfig

__all__ = [
    "DataStats",
    "Sample",
    "StatefulBatchLoader",
    "collate",
    "length_sorted_batches",
    "load_records",
    "prepare_samples",
    "split_train_val",
    "tokenize_record",
]

log = logging.getLogger("gatekv.training")

_ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
               "model": "assistant", "system": "system"}


@dataclass
class Sample:
    """One tokenized training sample."""

    input_ids: torch.Tensor
    """(L,) int64 token ids: prompt then response."""
    prompt_length: int
    """P: tokens [0, P) are the prompt (evicted context), [P, L) the response (future queries)."""

    @property
    def length(self) -> int:
        return int(self.input_ids.numel())


@dataclass
class DataStats:
    """Counts of what happened to the dataset's records (logged, saved in summary.json)."""

    records: int = 0
    """Records read."""
    used: int = 0
    """Samples kept."""
    truncated: int = 0
    """Kept after truncation to max_length."""
    skipped_overlong: int = 0
    """Dropped because longer than max_length (overlong: skip)."""
    skipped_no_response: int = 0
    """Dropped because fewer than min_response_tokens response tokens remained."""
    skipped_malformed: int = 0
    """Dropped because the record had no usable user/assistant turns or text."""
    problems: list[str] = field(default_factory=list)
    """The first few reasons for malformed records."""

    def summary(self) -> str:
        return (
            f"{self.records} records: {self.used} used ({self.truncated} truncated), skipped {self.skipped_overlong} "
            f"overlong, {self.skipped_no_response} without response, {self.skipped_malformed} malformed"
        )

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


# ----------------------------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------------------------


def load_records(config: DataConfig):
    """The dataset as a ``datasets.Dataset`` (local json/jsonl/parquet file or directory, or a Hub id)."""
    import datasets

    if config.hub_id is not None:
        try:
            return datasets.load_dataset(config.hub_id, config.hub_config, split=config.split)
        except Exception as error:  # network, unknown id, unknown split: say which
            raise ValueError(f"data.hub_id: could not load {config.hub_id!r} (split {config.split!r}): {error}") from None
    path = Path(config.path)
    if path.is_dir():
        # a mix summary (prepare_data.py --mix writes <out>.mix.json next to its data) is metadata, not records
        files = sorted(p for p in path.iterdir()
                       if p.suffix in (".json", ".jsonl", ".parquet") and not p.name.endswith(".mix.json"))
        if not files:
            raise ValueError(f"data.path: directory {path} holds no .json/.jsonl/.parquet files")
    elif path.is_file():
        files = [path]
    else:
        raise ValueError(f"data.path: {path} does not exist")
    kinds = {"parquet" if p.suffix == ".parquet" else "json" for p in files}
    if len(kinds) > 1:
        raise ValueError(f"data.path: {path} mixes parquet and json files")
    try:
        return datasets.load_dataset(kinds.pop(), data_files=[str(p) for p in files], split="train")
    except Exception as error:
        reason = " ".join(str(error).split()) or f"{type(error).__name__} (is the file empty or not JSON lines?)"
        raise ValueError(f"data.path: could not read {path}: {reason}") from None


def detect_format(columns: list[str], config: DataConfig) -> str:
    """The record format from the dataset's columns (``ValueError`` naming the missing columns)."""
    if config.format == "sharegpt":
        if not {"messages", "conversations"} & set(columns):
            raise ValueError(f"data.format sharegpt: no 'messages' or 'conversations' column (columns: {columns})")
        return "sharegpt"
    if config.format == "alpaca":
        missing = [c for c in ("instruction", "output") if c not in columns]
        if missing:
            raise ValueError(f"data.format alpaca: column(s) {missing} missing (columns: {columns})")
        return "alpaca"
    if config.format == "plain":
        if config.text_column not in columns:
            raise ValueError(f"data.text_column: column {config.text_column!r} missing (columns: {columns})")
        return "plain"
    if {"messages", "conversations"} & set(columns):
        # a mix of chats and plain documents (one JSONL, e.g. train/prepare_data.py --mix): decided per record
        return "mixed" if config.text_column in columns else "sharegpt"
    if {"instruction", "output"} <= set(columns):
        return "alpaca"
    if config.text_column in columns:
        return "plain"
    raise ValueError(
        f"data: cannot tell the format from the columns {columns}; expected 'messages'/'conversations' (sharegpt), "
        f"'instruction'+'output' (alpaca) or {config.text_column!r} (plain)"
    )


def record_messages(record: dict, kind: str) -> list[dict[str, str]]:
    """Chat messages ``[{"role", "content"}]`` of a ShareGPT or Alpaca record (``ValueError`` if malformed)."""
    if kind == "alpaca":
        instruction, extra = record.get("instruction") or "", record.get("input") or ""
        output = record.get("output") or ""
        if not isinstance(instruction, str) or not isinstance(output, str) or not instruction.strip() or not output.strip():
            raise ValueError("empty instruction or output")
        # the context (input) first, the question (instruction) last: it is then a future query of the prompt
        user = f"{extra}\n\n{instruction}" if isinstance(extra, str) and extra.strip() else instruction
        return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    turns = record.get("messages") if record.get("messages") is not None else record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError("no turns")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise ValueError("a turn is not a mapping")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in _ROLE_NAMES or not isinstance(content, str):
            raise ValueError(f"turn with role {role!r} and content of type {type(content).__name__}")
        messages.append({"role": _ROLE_NAMES[role], "content": content})
    if not any(m["role"] == "user" for m in messages) or not any(m["role"] == "assistant" for m in messages):
        raise ValueError("needs a user and an assistant turn")
    return messages


# ----------------------------------------------------------------------------------------------------------------------
# tokenizing
# ----------------------------------------------------------------------------------------------------------------------


def tokenize_record(record: dict, kind: str, tokenizer, config: DataConfig) -> tuple[list[int], int]:
    """``(token ids, prompt length)`` of one record, before any truncation (``ValueError`` if malformed).

    A plain record may carry ``prompt_chars`` (int): the prompt is then its first ``prompt_chars`` characters (a
    document's context; the rest, its continuation, is the response). Without it, ``plain_prompt_fraction`` splits.
    """
    if kind == "mixed":
        kind = "sharegpt" if record.get("messages") is not None or record.get("conversations") is not None else "plain"
    if kind == "plain":
        text = record.get(config.text_column)
        if not isinstance(text, str) or not text.strip():
            raise ValueError("empty text")
        prompt_chars = record.get("prompt_chars")
        if prompt_chars is None:
            ids = tokenizer(text, add_special_tokens=True)["input_ids"]
            return ids, -1  # split after truncation (a fraction of the kept tokens)
        if isinstance(prompt_chars, bool) or not isinstance(prompt_chars, int) or not 0 < prompt_chars < len(text):
            raise ValueError(f"prompt_chars must be an integer in (0, {len(text)}), got {prompt_chars!r}")
        return _split_tokens(tokenizer, text, prompt_chars, add_special_tokens=True)
    messages = record_messages(record, kind)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template (use data.format: plain)")
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    first_user = next(m["content"] for m in messages if m["role"] == "user")
    start = rendered.find(first_user)
    if start < 0:
        raise ValueError("the chat template does not render the first user message verbatim")
    cut = len(first_user)
    if config.prompt_split == "last_paragraph" and "\n\n" in first_user.strip():
        cut = first_user.rstrip().rfind("\n\n")
    ids, prompt_length = _split_tokens(tokenizer, rendered, start + cut, add_special_tokens=False)
    first_index = next(i for i, m in enumerate(messages) if m["role"] == "user")
    later = [m["content"] for m in messages[first_index + 1:] if m["role"] != "system"]
    if not first_user[cut:].strip() and not any(text.strip() for text in later):
        # only chat-template tokens would follow the prompt: an empty response ("without response"), not a sample
        prompt_length = len(ids)
    return ids, prompt_length


def _split_tokens(tokenizer, text: str, split_char: int, add_special_tokens: bool) -> tuple[list[int], int]:
    """Token ids of ``text`` and how many of them end at or before character ``split_char`` (the prompt)."""
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        ids = encoded["input_ids"]
        # the prompt is a prefix: it ends before the first token that ends after split_char (special tokens
        # added at the end have (0, 0) offsets and must not count)
        ends = [end for _, end in encoded["offset_mapping"]]
        prompt_length = next((i for i, end in enumerate(ends) if end > split_char), len(ids))
    else:
        ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        prompt_length = len(tokenizer(text[:split_char], add_special_tokens=add_special_tokens)["input_ids"])
    return ids, prompt_length


def prepare_samples(dataset, tokenizer, config: DataConfig) -> tuple[list[Sample], DataStats]:
    """Tokenize, split and length-check every record. ``ValueError`` if none is usable (the counts say why)."""
    columns = list(dataset.column_names)
    kind = detect_format(columns, config)
    stats = DataStats()
    samples: list[Sample] = []
    for record in dataset:
        stats.records += 1
        try:
            ids, prompt_length = tokenize_record(record, kind, tokenizer, config)
        except ValueError as error:
            stats.skipped_malformed += 1
            if len(stats.problems) < 5:
                stats.problems.append(f"record {stats.records - 1}: {error}")
            continue
        truncated = False
        if len(ids) > config.max_length:
            if config.overlong == "skip":
                stats.skipped_overlong += 1
                continue
            ids, truncated = ids[: config.max_length], True
        if prompt_length < 0:  # plain text: the first fraction is the prompt
            prompt_length = max(1, int(len(ids) * config.plain_prompt_fraction))
        prompt_length = min(prompt_length, len(ids))
        if prompt_length < 1 or len(ids) - prompt_length < config.min_response_tokens:
            stats.skipped_no_response += 1
            continue
        stats.truncated += truncated
        samples.append(Sample(torch.tensor(ids, dtype=torch.int64), prompt_length))
    stats.used = len(samples)
    source = config.path or config.hub_id
    if not samples:
        detail = f"; e.g. {stats.problems[0]}" if stats.problems else ""
        raise ValueError(f"data: no usable samples in {source} ({stats.summary()}){detail}")
    log.info("data %s (%s format): %s", source, kind, stats.summary())
    return samples, stats


def split_train_val(samples: list[Sample], config: DataConfig, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Shuffle with ``seed``, cap at ``max_samples``, then hold out ``val_fraction`` (at most ``val_max_samples``)."""
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = [samples[i] for i in order]
    if config.max_samples is not None:
        chosen = chosen[: config.max_samples]
    n_val = 0
    if config.val_fraction > 0 and len(chosen) >= 2:
        n_val = max(1, round(config.val_fraction * len(chosen)))
        if config.val_max_samples is not None:
            n_val = min(n_val, config.val_max_samples)
        n_val = min(n_val, len(chosen) - 1)
    return chosen[n_val:], chosen[:n_val]


# ----------------------------------------------------------------------------------------------------------------------
# batching
# ----------------------------------------------------------------------------------------------------------------------


def length_sorted_batches(samples: list[Sample], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (sorted by length, ties by index)."""
    order = sorted(range(len(samples)), key=lambda i: (samples[i].length, i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def collate(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch (see the module docstring)."""
    width = max(s.length for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.int64)
    mask = torch.zeros(len(samples), width, dtype=torch.int64)
    for b, sample in enumerate(samples):
        ids[b, : sample.length] = sample.input_ids
        mask[b, : sample.length] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "prompt_lengths": torch.tensor([s.prompt_length for s in samples], dtype=torch.int64),
        "lengths": torch.tensor([s.length for s in samples], dtype=torch.int64),
    }


class _Collator:
    def __init__(self, samples: list[Sample], pad_id: int):
        self.samples, self.pad_id = samples, pad_id

    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return collate([self.samples[i] for i in indices], self.pad_id)


class _IndexDataset(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class EpochBatchSampler:
    """Yields fixed length-sorted batches in a seeded order per epoch and remembers how far it got.

    State ``{"epoch", "consumed"}``: batches of the current epoch already handed out. A state saved after an epoch's
    last batch resumes at the start of the next epoch.
    """

    def __init__(self, batches: list[list[int]], seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if world_size > 1 and len(batches) < world_size:
            raise ValueError(f"data: {len(batches)} batches per epoch cannot be shared by {world_size} processes")
        self.batches, self.seed, self.shuffle = batches, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.batch_size = max((len(b) for b in batches), default=1)  # read by Lightning's DeepSpeed strategy
        self.epoch, self.consumed = 0, 0
        self._next_epoch = 0
        self._resume: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.batches) // self.world_size

    def order(self, epoch: int) -> list[int]:
        """Batch indices this process takes in ``epoch``: one seeded permutation, every ``world_size``-th entry from
        ``rank`` (the remainder is dropped so that every process runs the same number of steps)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(len(self.batches), generator=generator).tolist()
        else:
            order = list(range(len(self.batches)))
        return order[self.rank :: self.world_size][: len(self)]

    def __iter__(self):
        if self._resume is not None:
            epoch, consumed = self._resume
            self._resume = None
            if consumed >= len(self):
                epoch, consumed = epoch + 1, 0
        else:
            epoch, consumed = self._next_epoch, 0
        self.epoch, self.consumed, self._next_epoch = epoch, consumed, epoch + 1
        order = self.order(epoch)
        for i in range(consumed, len(order)):
            self.consumed = i + 1  # counted when handed out: a checkpoint after this step resumes after it
            yield self.batches[order[i]]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "num_batches": len(self)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_batches", len(self)) != len(self):
            raise ValueError(
                f"the checkpoint's data had {state['num_batches']} batches per epoch, this run has {len(self)}: "
                "the data, batch size or number of processes changed since the checkpoint"
            )
        self._resume = (int(state["epoch"]), int(state["consumed"]))
        self.epoch, self.consumed = self._resume


class StatefulBatchLoader(DataLoader):
    """A single-process DataLoader over length-sorted batches with ``state_dict``/``load_state_dict`` (exact resume).

    With ``world_size > 1`` each process (``rank``) takes its own share of every epoch's batches (no
    DistributedSampler: Lightning is told not to inject one).
    """

    def __init__(self, samples: list[Sample], batch_size: int, pad_id: int, seed: int, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        sampler = EpochBatchSampler(length_sorted_batches(samples, batch_size), seed, shuffle, rank, world_size)
        super().__init__(_IndexDataset(len(samples)), batch_sampler=sampler, collate_fn=_Collator(samples, pad_id), num_workers=0)

    def state_dict(self) -> dict:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.load_state_dict(state)


def tokens_in(batch: dict) -> int:
    """Real (non-padding) tokens of a batch."""
    return int(batch["lengths"].sum())


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its eos id, else 0 (padding is masked everywhere)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(candidate, int):
            return candidate
        if isinstance(candidate, list) and candidate:
            return int(candidate[0])
    return 0



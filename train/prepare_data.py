#!/usr/bin/env python
"""Build long-context SFT data for ``gatekv train`` (JSONL of chat samples).

Offline (default): synthetic retrieval / QA over the interpreter's own documentation (``pydoc_data.topics``), see
``gatekv.training.synthetic``: contexts of 512-2000 tokens with 1-4 inserted facts, multi-turn questions and answers.
Training text = the first 70% of the sorted topics, seeds from 1_000_000 up; evaluation uses the other 30% and seeds
below 1_000_000, so the two never share text or seeds.

    python train/prepare_data.py --out data/smollm2-train.jsonl --num-samples 160
    python train/prepare_data.py --tokenizer char --out tests_data.jsonl --num-samples 8 --min-tokens 100 --max-tokens 200

The mix of issue 14 (``--mix``, see ``gatekv.training.mix``): real documents of the training corpus whose
continuation is the response (python-docs; evaluation uses the GNU Info manuals), the synthetic retrieval chats and
multi-needle chats, contexts log-uniform in [--min-tokens, --max-tokens]; a ``<out>.mix.json`` summary is written
next to the data (the training run copies it into the adapter card)::

    python train/prepare_data.py --mix docs=0.5,qa=0.43,multi=0.07 --num-samples 84 --max-tokens 7936 \
        --part-max-tokens docs=4096,qa=2400 --out runs/data/smollm2-mix.jsonl

A RULER-style task of ``gatekv eval`` as fine-tuning data (``--task``: niah_multikey, vt, qa, ...): the task's
training split (seeds from 1_000_000 up, haystack = the training part of the documentation; ``gatekv eval`` uses
seeds below it and the held-out part), one user turn ``context + "\n\n" + question`` and the answer as the
assistant turn, the prompt format ``gatekv eval`` asks in (``data.prompt_split: last_paragraph`` makes the context
the evictable prompt). Context lengths are uniform in [--min-tokens, --max-tokens]::

    python train/prepare_data.py --task niah_multikey --num-samples 400 --min-tokens 512 --max-tokens 1024 \
        --out runs/data/smollm2-multikey.jsonl

Online: convert a Hub dataset (e.g. LongAlpaca) into the same JSONL (Alpaca records become user/assistant chats) in
the columns of the ``--mix`` records, so that a converted file and a mix file load together from one directory
(``data.path: DIR``); ``--max-tokens`` skips longer chats (counted with ``--tokenizer``)::

    python train/prepare_data.py --hub-id Yukang/LongAlpaca-12k --out data/longalpaca.jsonl --num-samples 3000
    python train/prepare_data.py --hub-id Yukang/LongAlpaca-12k --tokenizer meta-llama/Llama-3.1-8B-Instruct \
        --max-tokens 10000 --num-samples 3000 --out runs/data/llama-3.1-8b-instruct/longalpaca.jsonl
"""

from __future__ import annotations

import argparse
import sys
import time


def _counter(name: str):
    from gatekv.training import synthetic

    if name == "none":
        return synthetic.char_estimate
    return synthetic.tokenizer_counter(_tokenizer(name))


def _from_hub(args) -> tuple[list[dict], int]:
    """``(records, skipped_long)``: the first ``--num-samples`` usable records of a Hub dataset as chats, in the
    columns of the ``--mix`` records (:func:`hub_record`), so that both files load from one directory."""
    import datasets

    from gatekv.training.config import DataConfig
    from gatekv.training.data import detect_format, record_messages

    dataset = datasets.load_dataset(args.hub_id, args.hub_config, split=args.hub_split)
    kind = detect_format(list(dataset.column_names), DataConfig(hub_id=args.hub_id))
    count = _counter(args.tokenizer)
    records, skipped_long = [], 0
    for row, record in enumerate(dataset):
        if len(records) >= args.num_samples:
            break
        try:
            messages = record_messages(record, kind)
        except ValueError:
            continue
        user_tokens, all_tokens = _chat_tokens(messages, count)
        if args.max_tokens is not None and all_tokens > args.max_tokens:
            skipped_long += 1  # truncating would cut the question and answer at the end away
            continue
        records.append(hub_record(messages, args.hub_id, user_tokens, row))
    return records, skipped_long


def _chat_tokens(messages: list[dict], count) -> tuple[int, int]:
    """Tokens of the user turns (the context) and of every turn (chat-template tokens not counted)."""
    sizes = count([m["content"] for m in messages])
    return sum(n for n, m in zip(sizes, messages) if m["role"] == "user"), sum(sizes)


def hub_record(messages: list[dict], source: str, context_tokens: int, row: int) -> dict:
    """A converted Hub chat in the columns (and JSON types) of the ``--mix`` records: messages, text, prompt_chars,
    meta {part, source, context_tokens, seed}. ``datasets`` types a column from the first file it reads, and a column
    that is null throughout a file becomes type null, which a later file's strings or ints cannot be cast to: so
    text is "" and prompt_chars 0 here (chats ignore both), and meta.seed holds the row index in the Hub split."""
    return {"messages": messages, "text": "", "prompt_chars": 0,
            "meta": {"part": "sft", "source": source, "context_tokens": context_tokens, "seed": row}}


def _tokenizer(name: str):
    from transformers import AutoTokenizer

    if name == "smollm2":
        from gatekv.smollm2 import find_smollm2_gguf

        path = find_smollm2_gguf()
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if name == "char":
        from gatekv.models import char_tokenizer

        return char_tokenizer()
    return AutoTokenizer.from_pretrained(name)


def _parse_mix(text: str) -> tuple[float, float, float]:
    shares = {"docs": 0.0, "qa": 0.0, "multi": 0.0}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name.strip() not in shares:
            raise ValueError(f"--mix: unknown part {name.strip()!r} (parts: docs, qa, multi)")
        try:
            shares[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--mix: {part!r} is not part=fraction") from None
    return shares["docs"], shares["qa"], shares["multi"]


def _parse_part_max(text: str) -> tuple[int | None, int | None, int | None]:
    limits: dict[str, int | None] = {"docs": None, "qa": None, "multi": None}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        if name.strip() not in limits or not value.strip().isdigit():
            raise ValueError(f"--part-max-tokens: {part!r} is not docs|qa|multi=TOKENS")
        limits[name.strip()] = int(value)
    return limits["docs"], limits["qa"], limits["multi"]


def _write_mix(args) -> int:
    import json

    from gatekv.training import synthetic
    from gatekv.training.mix import MixConfig, make_mix

    config = MixConfig(num_samples=args.num_samples, shares=_parse_mix(args.mix), min_tokens=args.min_tokens,
                       max_tokens=args.max_tokens, part_max_tokens=_parse_part_max(args.part_max_tokens),
                       continuation=args.continuation, corpus=args.corpus,
                       seed=args.seed_base)
    records, summary = make_mix(_tokenizer(args.tokenizer), config)
    path = synthetic.write_jsonl(records, args.out)
    from gatekv.io import atomic_write_text

    atomic_write_text(str(path) + ".mix.json", json.dumps(summary, indent=2) + "\n")
    print(f"wrote {len(records)} samples to {path} (docs {summary['docs']}, qa {summary['qa']}, multi "
          f"{summary['multi']}; {summary['total_context_tokens']:,} context tokens)")
    return 0


def _task_records(args) -> list[dict]:
    """``--task``: chats of a ``gatekv.eval`` task's training split (see the module docstring)."""
    import random

    from gatekv.eval.tasks import make_task_sample
    from gatekv.inference import prompt_ids

    tokenizer = _tokenizer(args.tokenizer)
    head_tokens = prompt_ids(tokenizer, "", "")[0].shape[1]  # what gatekv eval subtracts from the context budget
    rng = random.Random(args.seed_base)
    records = []
    for i in range(args.num_samples):
        length = rng.randint(args.min_tokens, args.max_tokens)
        sample = make_task_sample(args.task, tokenizer, length, args.seed_base + i, head_tokens=head_tokens,
                                  split="train")
        answer = sample.answers[0] if sample.metric != "all" else ", ".join(sample.answers)
        records.append({
            "messages": [{"role": "user", "content": sample.context + "\n\n" + sample.question},
                         {"role": "assistant", "content": answer}],
            "text": None, "prompt_chars": None,
            "meta": {"part": args.task, "source": sample.meta["haystack"], "context_tokens": sample.context_tokens,
                     "seed": sample.seed, "answers": sample.answers, "metric": sample.metric},
        })
    return records


def main(argv: list[str] | None = None) -> int:
    from gatekv.training import synthetic

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output .jsonl path")
    parser.add_argument("--num-samples", type=int, default=160, help="samples to write (default 160)")
    parser.add_argument("--min-tokens", type=int, default=512, help="shortest context in tokens (default 512)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="longest context in tokens (default 2000); --hub-id: skip chats longer than this (default: "
                        "no limit)")
    parser.add_argument("--seed-base", type=int, default=synthetic.TRAIN_SEED_BASE,
                        help=f"first seed (default {synthetic.TRAIN_SEED_BASE}; must stay >= it for training data)")
    parser.add_argument("--tokenizer", default="smollm2",
                        help="token counting: smollm2 (default), char (the tiny test tokenizer), none (4 chars/token), "
                        "or a Hub tokenizer id")
    parser.add_argument("--mix", help="docs=F,qa=F,multi=F: the real-document + synthetic mix (gatekv.training.mix)")
    parser.add_argument("--corpus", default="python-docs", help="--mix: training corpus of the docs part")
    parser.add_argument("--continuation", type=int, default=256, help="--mix: response tokens of a docs sample")
    parser.add_argument("--part-max-tokens", default="qa=4096",
                        help="--mix: longest context per part, e.g. docs=4096,qa=2400 (others: --max-tokens)")
    parser.add_argument("--task", help="a gatekv eval task (niah_multikey, vt, qa, ...): its training split as chats")
    parser.add_argument("--hub-id", help="convert this Hub dataset instead of generating (needs network)")
    parser.add_argument("--hub-config", default=None, help="Hub dataset configuration")
    parser.add_argument("--hub-split", default="train", help="Hub dataset split (default train)")
    args = parser.parse_args(argv)
    if args.max_tokens is None and not args.hub_id:
        args.max_tokens = 2000
    if args.num_samples < 1 or args.min_tokens < 16 or (args.max_tokens is not None and args.max_tokens < args.min_tokens):
        parser.error("need --num-samples >= 1 and 16 <= --min-tokens <= --max-tokens")
    start = time.perf_counter()
    if args.mix:
        if args.tokenizer == "none":
            parser.error("--mix needs a tokenizer (document windows are cut at token offsets)")
        try:
            return _write_mix(args)
        except ValueError as error:
            print(f"prepare_data: {error}", file=sys.stderr)
            return 2
    if args.task:
        if args.tokenizer == "none":
            parser.error("--task needs a tokenizer (contexts are cut at token counts)")
        try:
            records = _task_records(args)
        except ValueError as error:
            print(f"prepare_data: {error}", file=sys.stderr)
            return 2
        path = synthetic.write_jsonl(records, args.out)
        print(f"wrote {len(records)} {args.task} chats to {path} in {time.perf_counter() - start:.1f} s")
        return 0
    if args.hub_id:
        records, skipped_long = _from_hub(args)
        if not records:
            print(f"prepare_data: no usable records in {args.hub_id} ({skipped_long} longer than --max-tokens)",
                  file=sys.stderr)
            return 2
        if skipped_long:
            print(f"skipped {skipped_long} chats longer than {args.max_tokens} tokens")
    else:
        count = _counter(args.tokenizer)
        samples = synthetic.make_samples(
            args.num_samples, count, seed_base=args.seed_base, min_tokens=args.min_tokens, max_tokens=args.max_tokens
        )
        records = [s.to_record() for s in samples]
    path = synthetic.write_jsonl(records, args.out)
    print(f"wrote {len(records)} samples to {path} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

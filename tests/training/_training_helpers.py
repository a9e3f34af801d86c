"""Shared helpers of the training tests: tiny configs and batches, no downloads."""

from __future__ import annotations

from pathlib import Path

import torch

from gatekv.config import from_dict
from gatekv.training.config import TrainConfig
from gatekv.training.data import Sample, collate

HERE = Path(__file__).parent
REPO = HERE.parent.parent
TINY_DATA = HERE / "data" / "tiny_chat.jsonl"


def tiny_config(out_dir, **sections) -> TrainConfig:
    """A TrainConfig for the tiny Llama + tiny chat data; ``sections`` override whole-section keys."""
    base = {
        "model": {"name": "tiny:llama"},
        "heads": {"type": "retaining_head", "hidden": 16},
        "target": {"kind": "cis"},
        "data": {"path": str(TINY_DATA), "max_length": 512, "batch_size": 2, "val_fraction": 0.2},
        "optim": {"lr": 5e-3, "warmup_steps": 2},
        "trainer": {"max_steps": 8, "log_every_n_steps": 2, "val_every_n_steps": 4, "checkpoint_every_n_steps": 4,
                    "threads": 1, "progress_bar": False},
        "output": {"dir": str(out_dir)},
        "seed": 0,
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            base.setdefault(section, {}).update(values)
        else:
            base[section] = values
    return from_dict(TrainConfig, base)


def random_samples(shapes=((90, 70), (60, 40), (120, 100)), seed=0, vocab=100) -> list[Sample]:
    """Samples of random tokens with (length, prompt length) ``shapes``."""
    generator = torch.Generator().manual_seed(seed)
    return [Sample(torch.randint(4, vocab, (length,), generator=generator), prompt) for length, prompt in shapes]


def batch_of(samples) -> dict:
    return collate(samples, pad_id=0)

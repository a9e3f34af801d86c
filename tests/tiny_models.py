"""Tiny deterministic models of every supported family, built from configs (no downloads).

The models are ``gatekv.models``' (one definition for the library's ``tiny:<family>`` and the tests), with a
512-position config.
"""

from __future__ import annotations

import torch

from gatekv import models as _models

FAMILIES = _models.TINY_FAMILIES


def tiny_config(family: str):
    return _models.tiny_config(family, max_position_embeddings=512)


def tiny_model(family: str, seed: int = 0, attn_implementation: str = "sdpa"):
    model = _models.tiny_model(family, seed, max_position_embeddings=512, attn_implementation=attn_implementation)
    model.config._attn_implementation = attn_implementation
    return model


def random_batch(batch: int, length: int, pad: list[int] | None = None, seed: int = 0, vocab: int = 128):
    """Left-padded token batch: ids (B, length) and a 2-D attention mask; row b has ``pad[b]`` pads."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b, p in enumerate(pad or [0] * batch):
        ids[b, :p] = 0
        mask[b, :p] = 0
    return ids, mask

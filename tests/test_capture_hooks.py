"""The session's input-capture hooks (hidden states, pre-RoPE q/k/v for trained scorers) copy only in scored
forwards."""

from __future__ import annotations

import torch

from gatekv import compress
from gatekv.heads.retaining_head import RetainingHead
from tiny_models import random_batch, tiny_model


def test_decode_steps_that_score_nothing_capture_nothing():
    """The heads' input hooks copy pre-RoPE q/k/v only in scored forwards: after a one-shot prefill and plain decode
    steps (no decode_budget) nothing is left captured, and with a fixed decode budget every step is scored (a
    missing capture would raise: the heads read the new tokens' pre-RoPE q/k/v)."""
    llama = tiny_model("llama")
    torch.manual_seed(2)
    heads = RetainingHead.from_model(llama, hidden=8, recency_buckets=4)
    ids, mask = random_batch(2, 40, pad=[0, 5], seed=3)
    with compress(llama, heads, "adakv", budget=12, window=4, sinks=2) as session:
        llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert all(not captured for captured in session._attention.captured)
    with compress(llama, heads, "adakv", budget=12, window=4, sinks=2, decode_budget=14) as session:
        llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert any(event.kind == "decode" for event in session.stats.events)

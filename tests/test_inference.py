"""GateKV wrapper and the ``gatekv generate`` / ``gatekv export`` commands on tiny models."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from gatekv import GateKV
from gatekv.heads import Adapter, build_heads
from gatekv.models import char_tokenizer, tiny_model


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama")
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _left_padded(pads=(0, 5), length=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 120, (len(pads), length), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        ids[row, :pad], mask[row, :pad] = 0, 0
    return ids, mask


@pytest.mark.parametrize("scorer", ["snapkv", "adapter"])
def test_budget_covering_the_prompt_equals_plain_generate(llama, scorer):
    ids, mask = _left_padded()
    options = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = llama.generate(ids, **options)
    if scorer == "adapter":
        kv = GateKV(llama, adapter=Adapter(build_heads("retaining_head", llama, hidden=8)), budget=1.0)
    else:
        kv = GateKV(llama, scorer=scorer, budget=64)
    out = kv.generate(ids, **options)
    assert torch.equal(out, expected)
    assert kv.last_stats.noop


def test_generate_batch_compresses_and_leaves_the_model_unchanged(llama):
    before = _state(llama)
    attn = llama.config._attn_implementation
    ids, mask = _left_padded(pads=(0, 7, 3))
    kv = GateKV(llama, scorer="snapkv", allocator="adakv", budget=0.25, window=4, sinks=2)
    out = kv.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert out.shape == (3, 44)
    kept = kv.last_stats.kept_tokens.float()
    assert kept.mean(dim=(-1, -2)).max() <= 0.25 * 40 + 1e-6  # Ada-KV: the mean per row stays within the budget
    assert llama.config._attn_implementation == attn
    assert all(torch.equal(v, before[k]) for k, v in llama.state_dict().items())
    plain = llama.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=0)
    assert plain.shape == (3, 41)  # the model still runs its own attention afterwards


def test_generate_accepts_a_streamer_and_per_call_budget(llama, tokenizer):
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.clone())

        def end(self):
            self.chunks.append(None)

    ids, _ = _left_padded(pads=(0,))
    streamer = Collect()
    kv = GateKV(llama, tokenizer, scorer="tova", budget=0.5, window=4, sinks=2)
    out = kv.generate(ids, max_new_tokens=5, do_sample=False, streamer=streamer, budget=16)
    assert streamer.chunks[-1] is None
    streamed = torch.cat([c.reshape(-1) for c in streamer.chunks[1:-1]])
    assert torch.equal(streamed, out[0, ids.shape[1]:])
    assert int(kv.last_stats.budget_tokens.max()) == 16
    with pytest.raises(ValueError, match="past_key_values"):
        kv.generate(ids, past_key_values=object())


@pytest.mark.parametrize("query_aware", [True, False])
def test_answer_query_aware_and_agnostic(llama, tokenizer, query_aware):
    before = _state(llama)
    context = "The access code for the blue door is 48213. " * 6
    kv = GateKV(llama, tokenizer, scorer="snapkv", budget=0.3, window=8, sinks=2)
    result = kv.answer(context, "What is the access code?", query_aware=query_aware, max_new_tokens=5)
    assert isinstance(result.text, str) and 1 <= result.new_tokens <= 5
    assert result.stats is not None and result.stats.events
    assert 0 < result.kv_bytes < result.full_kv_bytes
    assert "KV" in result.stats_line() and "kept" in result.stats_line()
    full = GateKV(llama, tokenizer, scorer=None).answer(context, "What is the access code?", max_new_tokens=5)
    assert full.stats is None and full.kv_bytes >= full.full_kv_bytes > result.kv_bytes
    assert all(torch.equal(v, before[k]) for k, v in llama.state_dict().items())


def test_answer_with_a_full_budget_equals_the_full_cache(llama, tokenizer):
    context = "alpha beta gamma delta " * 4
    full = GateKV(llama, tokenizer).answer(context, "which?", max_new_tokens=6)
    heads = Adapter(build_heads("linear_gate", llama))
    same = GateKV(llama, tokenizer, adapter=heads, budget=1.0).answer(context, "which?", max_new_tokens=6)
    assert same.text == full.text and same.new_tokens == full.new_tokens


def test_lora_adapter_changes_outputs_only_inside_calls(llama, tokenizer):
    from test_adapter import _lora

    adapter = Adapter(build_heads("linear_gate", llama), lora=_lora(llama, seed=5))
    before = _state(llama)
    ids, _ = _left_padded(pads=(0,))
    plain = llama.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    kv = GateKV(llama, adapter=adapter, budget=1.0)
    with adapter.lora.applied(llama):
        merged = llama.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(kv.generate(ids, max_new_tokens=6, do_sample=False), merged)
    assert not torch.equal(plain, merged)
    assert all(torch.equal(v, before[k]) for k, v in llama.state_dict().items())


def test_bad_arguments_are_named(llama):
    with pytest.raises(ValueError, match="budget"):
        GateKV(llama, scorer="snapkv", budget=1.5)
    with pytest.raises(ValueError, match="unknown scorer"):
        GateKV(llama, scorer="nope")
    with pytest.raises(ValueError, match="prefill"):
        GateKV(llama, scorer="snapkv", prefill="sideways")
    with pytest.raises(TypeError, match="loaded transformers model"):
        GateKV("llama", scorer="snapkv")
    with pytest.raises(ValueError, match="different base model"):
        GateKV(tiny_model("qwen3"), adapter=Adapter(build_heads("retaining_head", llama, hidden=4)))
    with pytest.raises(ValueError, match="needs a tokenizer"):
        GateKV(llama, scorer="snapkv").answer("a", "b")


# -- CLI --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, llama, tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama")
    llama.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _gatekv(*args):
    return subprocess.run([sys.executable, "-m", "gatekv.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_generate_end_to_end_with_scorer_and_adapter(saved_model, llama, tmp_path):
    prompt = tmp_path / "doc.txt"
    prompt.write_text("The meeting is on Tuesday in room 12. " * 8)
    run = _gatekv("generate", "--model", str(saved_model), "--scorer", "snapkv", "--budget", "0.25", "--window", "4",
                  "--prompt-file", str(prompt), "--question", "When?", "--max-new-tokens", "4", "--query-agnostic")
    assert run.returncode == 0, run.stderr
    assert "[gatekv] snapkv; uniform budget 0.25:" in run.stderr and "kept" in run.stderr and "MiB" in run.stderr
    adapter_dir = tmp_path / "adapter"
    Adapter(build_heads("retaining_head", llama, hidden=8), base_model=str(saved_model)).save_pretrained(adapter_dir)
    run = _gatekv("generate", "--adapter", str(adapter_dir), "--budget", "0.3", "--window", "4", "--allocator", "adakv",
                  "--prompt", "x y z " * 30, "--question", "Q?", "--max-new-tokens", "3")
    assert run.returncode == 0, run.stderr
    assert "retaining_head adapter" in run.stderr and "adakv budget 0.3" in run.stderr
    run = _gatekv("generate", "--model", str(saved_model), "--adapter", str(tmp_path / "missing"), "--prompt", "hi")
    assert run.returncode == 2 and "adapter directory not found" in run.stderr

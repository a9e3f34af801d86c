"""Every bad input gets a clear error naming the value (or is a documented no-op)."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from gatekv import Budget, compress, get_allocator, get_scorer
from tiny_models import random_batch, tiny_config, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.mark.parametrize("budget", [0, -3, 0.0, -0.5])
def test_budget_not_positive(model, budget):
    with pytest.raises(ValueError, match="budget"):
        with compress(model, budget=budget):
            pass


def test_ratio_above_one(model):
    with pytest.raises(ValueError, match=r"budget ratio must be <= 1.*1\.5"):
        Budget(1.5)
    with pytest.raises(ValueError, match="budget"):
        with compress(model, budget=1.5):
            pass


@pytest.mark.parametrize("budget", ["10%", True, None])
def test_budget_wrong_type(budget):
    with pytest.raises(ValueError, match="budget"):
        Budget(budget)


def test_budget_below_protected_tokens(model):
    with pytest.raises(ValueError, match=r"budget 10 tokens is smaller than sinks \+ window = 4 \+ 32"):
        with compress(model, budget=10):
            pass
    with pytest.raises(ValueError, match="decode_budget 7"):
        with compress(model, budget=40, window=4, decode_budget=7):
            pass
    # a ratio is checked when the prompt length is known, naming the rows
    ids, mask = random_batch(2, 100, pad=[0, 60])
    with compress(model, budget=0.3, window=16, sinks=4) as session:
        with pytest.raises(ValueError, match=r"gives \[12\] tokens for row\(s\) \[1\], fewer than sinks \+ window = 20"):
            model.generate(ids, attention_mask=mask, max_new_tokens=1)
    assert session.cache is None or session.cache.compressions == 0


def test_unknown_names_list_available():
    with pytest.raises(ValueError, match=r"unknown scorer 'snapvk'; available: .*snapkv"):
        get_scorer("snapvk")
    with pytest.raises(ValueError, match=r"unknown allocator 'ada'; available: adakv, .*pyramid.*uniform"):
        get_allocator("ada")


def test_empty_prompt(model):
    with compress(model, budget=0.5, window=2):
        with pytest.raises(ValueError, match="empty prompt"):
            model(input_ids=torch.zeros(1, 0, dtype=torch.long))


def test_all_padding_row(model):
    ids, mask = random_batch(2, 50, pad=[0, 50])
    with compress(model, budget=0.5, window=2):
        with pytest.raises(ValueError, match=r"batch row\(s\) \[1\] are all padding"):
            model(input_ids=ids, attention_mask=mask)


def test_mismatched_attention_mask(model):
    ids, mask = random_batch(2, 50)
    with compress(model, budget=0.5, window=2):
        with pytest.raises(ValueError, match=r"attention_mask shape \(3, 50\) does not match the input: expected \(2, >= 50\)"):
            model(input_ids=ids, attention_mask=torch.ones(3, 50, dtype=torch.long))
        with pytest.raises(ValueError, match=r"attention_mask shape \(2, 20\)"):
            model(input_ids=ids, attention_mask=torch.ones(2, 20, dtype=torch.long))
        with pytest.raises(ValueError, match=r"2-D \(batch, length\) padding mask, got \(2, 1, 50, 50\)"):
            model(input_ids=ids, attention_mask=torch.ones(2, 1, 50, 50))


@pytest.mark.parametrize("name,value", [("chunk_size", 0), ("chunk_size", -4), ("window", -1), ("sinks", -2), ("reserve", -1), ("chunk_size", 2.5)])
def test_bad_integers(model, name, value):
    with pytest.raises(ValueError, match=f"{name} must be an int"):
        with compress(model, budget=0.5, **{name: value}):
            pass


def test_bad_prefill_mode(model):
    with pytest.raises(ValueError, match=r"prefill must be one of \['one_shot', 'chunked'\], got 'streaming'"):
        with compress(model, prefill="streaming"):
            pass


def test_bad_query(model):
    with pytest.raises(ValueError, match="query must be token ids"):
        with compress(model, query=torch.zeros(1, 0, dtype=torch.long)):
            pass
    with pytest.raises(ValueError, match="query must be token ids"):
        with compress(model, query=torch.zeros(2, 3)):
            pass
    ids, mask = random_batch(2, 60)
    with compress(model, budget=0.5, window=2, query=torch.ones(3, 4, dtype=torch.long)):
        with pytest.raises(ValueError, match="query has 3 rows but the batch has 2"):
            model(input_ids=ids, attention_mask=mask)


def test_unsupported_architecture():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50))
    with pytest.raises(ValueError, match=r"unsupported architecture GPT2LMHeadModel \(model_type='gpt2'\); gatekv supports .*'llama'.*'qwen3'"):
        with compress(gpt2):
            pass


def test_attention_implementation_not_switchable():
    class FrozenAttention(LlamaForCausalLM):
        @classmethod
        def _can_set_attn_implementation(cls):
            return False

    model = FrozenAttention(tiny_config("llama"))
    with pytest.raises(ValueError, match="attention implementation cannot be switched"):
        with compress(model):
            pass


def test_nested_sessions_refused(model):
    with compress(model, budget=0.5, window=2):
        with pytest.raises(RuntimeError, match="already inside a gatekv.compress"):
            with compress(model, budget=0.5, window=2):
                pass


def test_allocator_and_scorer_hyperparameters():
    with pytest.raises(ValueError, match=r"adakv: alpha \(safeguard\) must be in \[0, 1\], got 1.5"):
        get_allocator("adakv", alpha=1.5)
    with pytest.raises(ValueError, match="pyramid: beta must be a number >= 1, got 0"):
        get_allocator("pyramid", beta=0)
    with pytest.raises(ValueError, match="snapkv: kernel_size must be a positive int, got 0"):
        get_scorer("snapkv", kernel_size=0)
    with pytest.raises(ValueError, match="snapkv: pooling must be 'avg' or 'max', got 'min'"):
        get_scorer("snapkv", pooling="min")

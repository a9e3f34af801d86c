"""Heads on every supported family: shapes, scoring inside compress(), adapter save/load and its errors."""

from __future__ import annotations

import json

import pytest
import torch

from gatekv import compress
from gatekv.heads import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    HEAD_TYPES,
    AttentionGate,
    HeadConfig,
    ModelFingerprint,
    RetainingHead,
    build_heads,
    load_adapter,
    save_adapter,
    ste_flags,
)
from gatekv.models import TINY_FAMILIES, tiny_model

from gatekv.models import capture_layer_inputs, inspect_model


@pytest.fixture(scope="module")
def models():
    return {family: tiny_model(family) for family in TINY_FAMILIES}


def _captured(model, ids):
    spec = inspect_model(model)
    sinks = [{} for _ in range(spec.num_layers)]
    handles = []
    for layer in range(spec.num_layers):
        handles += capture_layer_inputs(spec, layer, sinks[layer], hidden=True, pre_rope=True)
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return sinks


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_layer_scores_shapes_and_stacked_equals_per_layer(models, family, head_type):
    model = models[family]
    heads = build_heads(head_type, model, hidden=8)
    ids = torch.randint(3, 120, (2, 17))
    sinks = _captured(model, ids)
    valid = torch.ones(2, 17, dtype=torch.bool)
    per_layer = torch.stack([heads.layer_scores(l, sink, valid) for l, sink in enumerate(sinks)])
    assert per_layer.shape == (2, 2, model.config.num_key_value_heads, 17)
    assert per_layer.dtype == torch.float32
    stacked_inputs = {}
    for sink in sinks:
        for name, tensor in heads.layer_inputs(sink).items():
            stacked_inputs.setdefault(name, []).append(tensor)
    stacked = heads.stacked_scores({k: torch.stack(v) for k, v in stacked_inputs.items()}, valid)
    torch.testing.assert_close(stacked, per_layer, rtol=1e-5, atol=1e-5)


def test_retaining_head_matches_locret_definition(models):
    """s = W2 act(W1 concat(q, k, v)) per token, no biases, the model's activation."""
    model = models["llama"]
    heads = build_heads("retaining_head", model, hidden=8)
    layer = heads.layers[0]
    assert layer.up.bias is None and layer.down.bias is None
    assert heads.config.act == model.config.hidden_act
    q, k, v = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    scores = heads.layer_scores(0, {"pre_rope_queries": q, "pre_rope_keys": k, "pre_rope_values": v}, torch.ones(1, 5, dtype=torch.bool))
    token = 3
    x = torch.cat([q[0, :, token].flatten(), k[0, :, token].flatten(), v[0, :, token].flatten()])
    expected = layer.down.weight @ torch.nn.functional.silu(layer.up.weight @ x)
    torch.testing.assert_close(scores[0, :, token], expected, rtol=1e-5, atol=1e-5)


def test_attention_gate_is_causal_and_ignores_padding(models):
    model = models["llama"]
    gate = build_heads("attention_gate", model)
    h = torch.randn(1, 10, 64)
    valid = torch.ones(1, 10, dtype=torch.bool)
    full = gate.layer_scores(0, {"hidden_states": h}, valid)
    prefix = gate.layer_scores(0, {"hidden_states": h[:, :6]}, valid[:, :6])
    torch.testing.assert_close(full[..., :6], prefix, rtol=1e-5, atol=1e-6)  # later tokens do not change earlier ones
    padded = torch.cat([h[:, :6], torch.randn(1, 3, 64)], 1)
    mask = torch.tensor([[True] * 6 + [False] * 3])
    torch.testing.assert_close(gate.layer_scores(0, {"hidden_states": padded}, mask)[..., :6], prefix, rtol=1e-5, atol=1e-6)


def _band_reference(q, k, v, window, key_valid):
    """Plain masked SDPA over the whole T x T band (what windowed_causal_attention computes in blocks)."""
    length = q.shape[2]
    i, j = torch.arange(length)[:, None], torch.arange(length)[None]
    allowed = ((j <= i) & (j > i - window))[None] & key_valid[:, None, :]
    allowed = (allowed | torch.eye(length, dtype=torch.bool))[:, None]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


@pytest.mark.parametrize("length,window", [(1, 4), (7, 4), (8, 4), (29, 8), (33, 1), (12, 64)])
def test_windowed_causal_attention_matches_band_reference(length, window):
    from gatekv.heads.attention_gate import windowed_causal_attention

    torch.manual_seed(length * 100 + window)
    q, k, v = (torch.randn(2, 3, length, 5) for _ in range(3))
    key_valid = torch.ones(2, length, dtype=torch.bool)
    key_valid[1, : length // 3] = False  # left padding in row 1
    for valid in (None, key_valid):
        expected = _band_reference(q, k, v, window, key_valid if valid is not None else torch.ones_like(key_valid))
        got = windowed_causal_attention(q, k, v, window, valid)
        assert not got.isnan().any()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_windowed_attention_gate_sees_only_its_window(models):
    """gate_window = W: a token's logit depends on itself and the W - 1 tokens before it, nothing earlier; left
    padding changes nothing; W >= T equals the full causal gate."""
    model = models["llama"]
    gate = build_heads("attention_gate", model, gate_window=4)
    assert gate.layers[0].window == 4
    h = torch.randn(1, 12, 64)
    valid = torch.ones(1, 12, dtype=torch.bool)
    base = gate.layer_scores(0, {"hidden_states": h}, valid)
    changed = h.clone()
    changed[:, 2] += 5.0  # token 2 lies in the windows of tokens 2..5 only
    moved = (gate.layer_scores(0, {"hidden_states": changed}, valid) - base).abs().amax(dim=(0, 1))
    assert bool((moved[2:6] > 1e-4).all()) and bool((moved[[0, 1, 6, 7, 8, 9, 10, 11]] == 0).all())
    padded = torch.cat([torch.randn(1, 3, 64), h], 1)
    mask = torch.tensor([[False] * 3 + [True] * 12])
    torch.testing.assert_close(gate.layer_scores(0, {"hidden_states": padded}, mask)[..., 3:], base, rtol=1e-5, atol=1e-6)
    wide = build_heads("attention_gate", model, gate_window=64)
    full = build_heads("attention_gate", model)
    full.load_state_dict(wide.state_dict())
    torch.testing.assert_close(wide.layer_scores(0, {"hidden_states": h}, valid),
                               full.layer_scores(0, {"hidden_states": h}, valid), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="gate_window must be an int >= 0"):
        build_heads("attention_gate", model, gate_window=-1)


def test_ste_flags_hard_forward_soft_backward():
    logits = torch.tensor([-2.0, 0.5, 3.0], requires_grad=True)
    flags = ste_flags(logits)
    assert flags.tolist() == [0.0, 1.0, 1.0]
    flags.sum().backward()
    p = torch.sigmoid(logits.detach())
    torch.testing.assert_close(logits.grad, p * (1 - p))


# every family and every head type at least once (all 15 pairs are covered by the layer-level test above)
COMPRESS_CASES = [("llama", "retaining_head"), ("qwen2", "attention_gate"), ("qwen3", "linear_gate"),
                  ("mistral", "retaining_head"), ("phi3", "attention_gate")]


@pytest.mark.parametrize("family,head_type", COMPRESS_CASES)
def test_heads_score_inside_compress(models, family, head_type, tmp_path):
    """A (random) head is a Scorer: compress() runs one-shot and chunked prefill and keeps the budget; scores of
    tokens are computed once when they enter (chunked prefill keeps them in the per-slot state)."""
    model = models[family]
    heads = build_heads(head_type, model, hidden=8)
    save_adapter(heads, tmp_path / "adapter")
    heads = load_adapter(tmp_path / "adapter", model=model)
    ids = torch.randint(3, 120, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    for prefill in ("one_shot", "chunked"):
        with compress(model, heads, "uniform", budget=12, prefill=prefill, chunk_size=16, window=4, sinks=2) as session:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
        assert out.shape == (2, 42)
        assert int(session.stats.kept_tokens.max()) <= 12


def test_adapter_round_trip_is_exact(models, tmp_path):
    model = models["qwen3"]
    heads = build_heads("attention_gate", model, gate_heads=3, gate_head_dim=4, gate_window=5)
    save_adapter(heads, tmp_path, base_model="tiny:qwen3", training={"x": 1})
    document = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert document["format"] == "gatekv-adapter" and document["base_model"] == "tiny:qwen3"
    assert document["training"] == {"x": 1}
    assert document["head"]["fingerprint"]["model_type"] == "qwen3"
    loaded = load_adapter(tmp_path, model=model)
    assert isinstance(loaded, AttentionGate)
    assert loaded.config.gate_heads == 3 and loaded.config.gate_window == 5 and loaded.layers[0].window == 5
    for (name, a), (_, b) in zip(heads.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert not any(p.requires_grad for p in loaded.parameters())
    assert not list(tmp_path.glob(".*tmp*"))


def test_adapter_refuses_other_base_model(models, tmp_path):
    save_adapter(build_heads("retaining_head", models["llama"]), tmp_path)
    with pytest.raises(ValueError, match="different base model.*num_kv_heads: 2 \\(adapter\\) vs 1 \\(model\\)"):
        load_adapter(tmp_path, model=models["phi3"])


def test_adapter_bad_files(models, tmp_path):
    with pytest.raises(FileNotFoundError, match=ADAPTER_CONFIG):
        load_adapter(tmp_path)
    save_adapter(build_heads("linear_gate", models["llama"]), tmp_path)
    (tmp_path / ADAPTER_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="could not be read as safetensors"):
        load_adapter(tmp_path)
    (tmp_path / ADAPTER_CONFIG).write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_adapter(tmp_path)


def test_adapter_weights_of_other_dims_are_refused(models, tmp_path):
    save_adapter(build_heads("retaining_head", models["llama"], hidden=8), tmp_path / "a")
    save_adapter(build_heads("retaining_head", models["llama"], hidden=4), tmp_path / "b")
    (tmp_path / "a" / ADAPTER_WEIGHTS).write_bytes((tmp_path / "b" / ADAPTER_WEIGHTS).read_bytes())
    with pytest.raises(ValueError, match="shape"):
        load_adapter(tmp_path / "a")


def test_unsupported_base_model_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="unsupported base model.*gpt2"):
        RetainingHead.from_model(model)


def test_head_config_validation():
    fp = ModelFingerprint("llama", 2, 4, 2, 16, 64, "{}")
    with pytest.raises(ValueError, match="unknown head type 'mlp'"):
        HeadConfig(type="mlp", fingerprint=fp)
    with pytest.raises(ValueError, match="hidden must be >= 1 for a retaining head"):
        HeadConfig(type="retaining_head", fingerprint=fp, hidden=0)
    with pytest.raises(ValueError, match="lacks"):
        HeadConfig.from_dict({"type": "linear_gate"})
    with pytest.warns(UserWarning, match="ignoring unknown head config keys"):
        HeadConfig.from_dict({"type": "linear_gate", "fingerprint": fp.__dict__, "future_field": 1})

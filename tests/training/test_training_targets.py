"""Targets and losses: the chunked CIS label equals a naive T x T reference, batch 1 vs batch 3, no gradient into the
backbone, the distill student shortcut equals the full student, the feature cache changes nothing."""

from __future__ import annotations

import sys

import pytest
import torch

from _training_helpers import batch_of, random_samples
from gatekv.heads import build_heads
from gatekv.kernels.reference import column_max_logits_reference
from gatekv.models import capture_layer_inputs, inspect_model
from gatekv.training.capture import TrainingCapture
from gatekv.training.config import LoraConfig, TargetConfig
from gatekv.training.losses import cis_loss, gate_log_mask, listwise_kl, topk_overlap
from gatekv.models import TINY_FAMILIES, tiny_model
from gatekv.training.objective import FeatureCache, HeadObjective, _response_rows


@pytest.fixture(scope="module")
def models():
    return {family: tiny_model(family) for family in TINY_FAMILIES}


def naive_cis(model, batch):
    """Per layer (B, H_kv, T): max over response queries i and group heads of q_i . k_j * scale, with q, k made
    post-RoPE here by the model's own rotary embedding from hooked pre-RoPE projections (full T x T logits)."""
    spec = inspect_model(model)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    prompt_lengths, lengths = batch["prompt_lengths"], batch["lengths"]
    batch_size, length = ids.shape
    sinks = [{} for _ in range(spec.num_layers)]
    handles = [h for l in range(spec.num_layers) for h in capture_layer_inputs(spec, l, sinks[l], False, True)]
    positions = torch.arange(length)[None].expand(batch_size, -1)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, position_ids=positions)
    finally:
        for h in handles:
            h.remove()
    modeling = sys.modules[type(model).__module__]
    decoder = model.get_decoder()
    out = []
    for layer, sink in enumerate(sinks):
        q, k = sink["pre_rope_queries"], sink["pre_rope_keys"]
        cos, sin = decoder.rotary_emb(q, positions)
        q, k = modeling.apply_rotary_pos_emb(q, k, cos, sin)
        group = q.shape[1] // k.shape[1]
        logits = torch.einsum("bhid,bhjd->bhij", q.double(), k.repeat_interleave(group, 1).double())
        logits = logits * spec.attention_modules[layer].scaling
        i = torch.arange(length)[:, None]
        j = torch.arange(length)[None, :]
        response = (i >= prompt_lengths[:, None, None]) & (i < lengths[:, None, None])  # (B, T, 1)
        allowed = response & (j <= i) & mask.bool()[:, None, :]
        logits = logits.masked_fill(~allowed[:, None], float("-inf"))
        per_q_head = logits.amax(dim=2)  # (B, H_q, T)
        out.append(per_q_head.reshape(batch_size, k.shape[1], group, length).amax(2))
    return out


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_chunked_cis_label_equals_naive_reference(models, family):
    model = models[family]
    batch = batch_of(random_samples())
    positions = torch.arange(batch["input_ids"].shape[1])[None].expand(3, -1)
    with torch.no_grad(), TrainingCapture(model) as capture:
        capture.prepare(batch["attention_mask"].bool(), positions,
                        label_queries=_response_rows(batch["prompt_lengths"], batch["lengths"]))
        model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=positions)
        labels = list(capture.labels)
    assert model.config._attn_implementation == "sdpa"  # restored on exit
    expected = naive_cis(model, batch)
    for b, prompt in enumerate(batch["prompt_lengths"].tolist()):
        for got, want in zip(labels, expected):
            torch.testing.assert_close(got[b, :, :prompt].double(), want[b, :, :prompt], rtol=1e-4, atol=1e-4)


def test_column_max_in_small_query_blocks_equals_one_block():
    generator = torch.Generator().manual_seed(1)
    queries, keys = torch.randn(2, 6, 23, 8, generator=generator), torch.randn(2, 3, 40, 8, generator=generator)
    positions = torch.randint(0, 40, (2, 23), generator=generator)
    positions[0, -4:] = -1
    key_positions = torch.arange(40)[None].expand(2, -1).clone()
    key_positions[1, 30:] = -1
    blocked = column_max_logits_reference(queries, positions, keys, key_positions, 0.3, query_block=5)
    whole = column_max_logits_reference(queries, positions, keys, key_positions, 0.3, query_block=1000)
    assert torch.equal(blocked, whole)


@pytest.mark.parametrize(
    "family,head_type,kind",
    [("llama", "retaining_head", "cis"), ("qwen3", "attention_gate", "cis"), ("phi3", "linear_gate", "distill"),
     ("mistral", "attention_gate", "distill"), ("qwen2", "retaining_head", "distill"), ("llama", "attention_gate", "lm"),
     ("phi3", "linear_gate", "lm")],
)
def test_batch_of_three_equals_mean_of_single_samples(models, family, head_type, kind):
    model = models[family]
    heads = build_heads(head_type, model, hidden=8)
    objective = HeadObjective(model, heads, TargetConfig(kind=kind, window=4, mask="soft")).eval()
    samples = random_samples()
    loss3, metrics3 = objective(batch_of(samples), step=3)
    singles = [objective(batch_of([s]), step=3) for s in samples]
    torch.testing.assert_close(loss3, torch.stack([loss for loss, _ in singles]).mean(), rtol=1e-5, atol=1e-6)
    for name, values in metrics3.items():
        torch.testing.assert_close(values, torch.cat([m[name] for _, m in singles]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind,head_type", [("cis", "retaining_head"), ("distill", "attention_gate")])
def test_no_gradient_reaches_the_backbone(models, kind, head_type):
    model = models["llama"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    heads = build_heads(head_type, model, hidden=8)
    objective = HeadObjective(model, heads, TargetConfig(kind=kind, window=4))
    loss, _ = objective(batch_of(random_samples()), step=10)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert all(p.grad is not None for p in heads.parameters())
    assert any(p.grad.abs().sum() > 0 for p in heads.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_lora_parameters_are_the_only_backbone_gradients(models):
    pytest.importorskip("peft", reason="needs the train extra: pip install 'gatekv[train]'")
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    import copy

    model = copy.deepcopy(models["llama"])
    wrapped = get_peft_model(model, PeftLoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    wrapped.eval()
    heads = build_heads("attention_gate", model)
    objective = HeadObjective(wrapped, heads, TargetConfig(kind="distill", window=4, lora=LoraConfig(enabled=False)), lora=True)
    # a non-zero LoRA B so that the student differs from the teacher and LoRA A gets a gradient too
    for name, p in wrapped.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    loss, metrics = objective(batch_of(random_samples()), step=10)
    loss.backward()
    graded = {n for n, p in wrapped.named_parameters() if p.grad is not None}
    assert graded and all("lora_" in n for n in graded)
    assert all(p.grad is None for n, p in wrapped.named_parameters() if "lora_" not in n)
    assert float(metrics["kl"].mean()) > 0


@pytest.mark.parametrize("family", ["llama", "mistral", "phi3"])
def test_distill_response_only_student_equals_full_student(models, family):
    """The shortcut (re-run only the tokens after the shortest prompt on the teacher's keys/values) is exact."""
    model = models[family]
    heads = build_heads("attention_gate", model, init_keep_logit=0.0)
    objective = HeadObjective(model, heads, TargetConfig(kind="distill", window=4, mask="soft", temperature=1.0))
    results = []
    for split in (True, False):
        objective.split_student = split
        heads.zero_grad()
        loss, metrics = objective(batch_of(random_samples()), step=50)
        loss.backward()
        results.append((loss.detach(), metrics["kl"], torch.cat([p.grad.flatten() for p in heads.parameters()])))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(results[0][2], results[1][2], rtol=1e-3, atol=1e-8)
    assert float(results[0][1].min()) > 0  # gates at p = 0.5 really change the student


def test_gates_keeping_everything_give_zero_kl(models):
    heads = build_heads("linear_gate", models["qwen2"], init_keep_logit=30.0)
    objective = HeadObjective(models["qwen2"], heads, TargetConfig(kind="distill", mask="soft", temperature=1.0))
    _, metrics = objective(batch_of(random_samples()), step=0)
    assert float(metrics["kl"].abs().max()) < 1e-6
    assert float(metrics["eviction_rate"].max()) < 1e-6


def test_feature_cache_hit_equals_miss(models, tmp_path):
    model = models["qwen3"]
    heads = build_heads("retaining_head", model, hidden=8)
    cache = FeatureCache(tmp_path, heads.config.fingerprint, "tiny:qwen3", heads.feature_names, torch.bfloat16)
    objective = HeadObjective(model, heads, TargetConfig(), feature_cache=cache)
    batch = batch_of(random_samples())
    first, _ = objective(batch)
    assert (cache.hits, cache.misses) == (0, 3)
    second, _ = objective(batch)
    assert (cache.hits, cache.misses) == (3, 3)
    assert torch.equal(first, second)
    files = list(cache.directory.iterdir())
    assert len(files) == 3 and all(f.suffix == ".safetensors" for f in files)  # no temp files left behind
    live = HeadObjective(model, heads, TargetConfig())(batch)[0]
    torch.testing.assert_close(first, live, rtol=2e-2, atol=1e-3)  # bf16 features vs float32: close, not equal


def test_feature_cache_is_shared_by_heads_reading_the_same_features(models, tmp_path):
    """The attention gate reuses the linear gate's cached hidden states (same features, same labels): all hits, the
    same loss as computing them; the retaining head (pre-RoPE q/k/v) gets a cache of its own."""
    model = models["qwen3"]
    linear = build_heads("linear_gate", model, hidden=0)
    attention = build_heads("attention_gate", model, gate_window=4)
    retaining = build_heads("retaining_head", model, hidden=8)
    caches = {name: FeatureCache(tmp_path, h.config.fingerprint, "tiny:qwen3", h.feature_names, torch.float32)
              for name, h in (("linear", linear), ("attention", attention), ("retaining", retaining))}
    assert caches["linear"].directory == caches["attention"].directory != caches["retaining"].directory
    batch = batch_of(random_samples())
    HeadObjective(model, linear, TargetConfig(), feature_cache=caches["linear"])(batch)
    cached, _ = HeadObjective(model, attention, TargetConfig(), feature_cache=caches["attention"])(batch)
    assert (caches["attention"].hits, caches["attention"].misses) == (3, 0)
    live, _ = HeadObjective(model, attention, TargetConfig())(batch)
    torch.testing.assert_close(cached, live, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="feature_names"):
        FeatureCache(tmp_path, linear.config.fingerprint, "tiny:qwen3", "hidden_states", torch.float32)


def test_cis_loss_ignores_padding_and_unseen_keys():
    scores = torch.zeros(2, 1, 1, 5)
    labels = torch.tensor([1.0, 2.0, float("-inf"), 4.0, 100.0]).expand(2, 1, 1, 5).clone()
    mask = torch.tensor([[True, True, True, True, False]])
    loss, parts = cis_loss(scores, labels, mask, beta=1.0, smoothness=0.0)
    expected = (0.5 + 1.5 + 3.5) / 3  # SmoothL1 of 1, 2, 4; the -inf label and the padded 100 are ignored
    torch.testing.assert_close(loss, torch.tensor(expected))


def test_listwise_kl_is_shift_invariant_and_ignores_masked_tokens():
    torch.manual_seed(0)
    labels = torch.randn(2, 3, 2, 12) * 3
    labels[0, 1, 0, 5] = float("-inf")  # a key no query sees
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[2, 9:] = False  # padding of the third sample
    shifted = torch.where(torch.isfinite(labels), labels + 7.0, torch.zeros_like(labels))
    torch.testing.assert_close(listwise_kl(shifted, labels, mask), torch.zeros(3), atol=1e-5, rtol=0)
    scores = torch.randn(2, 3, 2, 12)
    base = listwise_kl(scores, labels, mask)
    assert (base > 0).all()
    moved = scores.clone()
    moved[..., 2, :, 9:] += 50.0  # masked tokens of sample 2
    moved[0, 1, 0, 5] += 50.0  # the -inf label's token
    torch.testing.assert_close(listwise_kl(moved, labels, mask), base)


def test_listwise_kl_weighs_the_top_of_the_label_order():
    labels = torch.arange(10.0).reshape(1, 1, 1, 10)
    mask = torch.ones(1, 10, dtype=torch.bool)
    top_wrong, bottom_wrong = labels.clone(), labels.clone()
    top_wrong[..., 9] -= 3.0  # the label's best token scored lower
    bottom_wrong[..., 0] -= 3.0  # the label's worst token scored lower
    assert float(listwise_kl(top_wrong, labels, mask)) > 100 * float(listwise_kl(bottom_wrong, labels, mask))
    # the regression part alone cannot tell the two apart
    reg_top = cis_loss(top_wrong, labels, mask, smoothness=0.0)[0]
    reg_bottom = cis_loss(bottom_wrong, labels, mask, smoothness=0.0)[0]
    torch.testing.assert_close(reg_top, reg_bottom)


def test_cis_loss_rank_term_adds_the_weighted_kl_over_its_mask():
    torch.manual_seed(1)
    scores, labels = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8)
    mask = torch.ones(2, 8, dtype=torch.bool)
    rank_mask = torch.zeros(2, 8, dtype=torch.bool)
    rank_mask[:, 2:6] = True
    plain, _ = cis_loss(scores, labels, mask, smoothness=0.0)
    ranked, parts = cis_loss(scores, labels, mask, smoothness=0.0, rank_weight=0.5, rank_mask=rank_mask)
    expected = plain + 0.5 * listwise_kl(scores, labels, rank_mask).mean()
    torch.testing.assert_close(ranked, expected)
    torch.testing.assert_close(parts["rank"], listwise_kl(scores, labels, rank_mask))


def test_rank_objective_batch_of_three_equals_mean_of_single_samples(models):
    model = models["qwen3"]
    heads = build_heads("retaining_head", model, hidden=8)
    objective = HeadObjective(model, heads, TargetConfig(rank_weight=1.0, sinks=1, window=2)).eval()
    samples = random_samples()
    loss3, metrics3 = objective(batch_of(samples))
    singles = [objective(batch_of([s])) for s in samples]
    assert "rank" in metrics3 and (metrics3["rank"] > 0).all()
    torch.testing.assert_close(loss3, torch.stack([loss for loss, _ in singles]).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics3["rank"], torch.cat([m["rank"] for _, m in singles]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fields,message", [
    ({"rank_weight": -1.0}, "target.rank_weight must be >= 0"),
    ({"rank_temperature": 0.0}, "target.rank_temperature must be > 0"),
    ({"rank_weight": 1.0, "kind": "distill"}, "applies to kinds 'cis' and 'teacher' only"),
])
def test_rank_settings_are_validated(fields, message):
    with pytest.raises(ValueError, match=message):
        TargetConfig(**fields)


def test_objective_summary_names_the_rank_term_only_when_on():
    plain = TargetConfig().summary()
    assert plain["kind"] == "cis" and "rank_weight" not in plain
    ranked = TargetConfig(rank_weight=2.0, sinks=2, window=8).summary()
    assert ranked["rank_weight"] == 2.0 and ranked["rank_excludes"] == {"sinks": 2, "window": 8}
    assert TargetConfig(kind="distill").summary()["kind"] == "distill"


def test_topk_overlap_bounds():
    labels = torch.arange(20.0).reshape(1, 1, 1, 20)
    lengths = torch.tensor([20])
    assert float(topk_overlap(labels, labels, lengths, 0.1)) == 1.0
    assert float(topk_overlap(-labels, labels, lengths, 0.1)) == 0.0
    assert float(topk_overlap(labels, labels, torch.tensor([10]), 0.25)) == 1.0  # only the prompt counts


def test_ste_mask_values_and_finite_gradient():
    logits = torch.tensor([-1.0, 2.0], requires_grad=True)
    bias = gate_log_mask(logits, "ste", 0.5, training=True)
    assert bias[0].item() == pytest.approx(-1e4) and bias[1].item() == pytest.approx(0.0, abs=1e-6)
    bias.sum().backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad > 0).all()


def _plain_response_ce(model, batch):
    """Per sample: mean cross-entropy of the response tokens P .. L-1 from a plain forward of ``model``."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    positions = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()
    out = []
    for b, (p, n) in enumerate(zip(batch["prompt_lengths"].tolist(), batch["lengths"].tolist())):
        out.append(torch.nn.functional.cross_entropy(logits[b, p - 1 : n - 1], ids[b, p:n]))
    return torch.stack(out)


def _with_lora(model, std=0.1):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    import copy

    wrapped = get_peft_model(copy.deepcopy(model), PeftLoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    wrapped.eval()
    for name, p in wrapped.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=std)  # LoRA that changes the model, so that LoRA A gets a gradient too
    return wrapped


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_lm_without_gates_is_the_plain_response_cross_entropy(models, family):
    """``gates: false`` (the LoRA-only baseline): the loss is the LoRA'd model's own cross-entropy on the response
    tokens, the first one predicted by the prompt's last token; only LoRA weights get gradients."""
    pytest.importorskip("peft", reason="needs the train extra: pip install 'gatekv[train]'")
    wrapped = _with_lora(models[family])
    heads = build_heads("attention_gate", wrapped.get_base_model())
    target = TargetConfig(kind="lm", gates=False, lora=LoraConfig(enabled=True))
    objective = HeadObjective(wrapped, heads, target, lora=True)
    batch = batch_of(random_samples())
    loss, metrics = objective(batch, step=5)
    with torch.no_grad():
        expected = _plain_response_ce(wrapped, batch)
    torch.testing.assert_close(metrics["ce"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.detach(), expected.mean(), rtol=1e-5, atol=1e-5)
    assert float(metrics["eviction_rate"].abs().max()) == 0.0
    loss.backward()
    graded = {n for n, p in wrapped.named_parameters() if p.grad is not None}
    assert graded and all("lora_" in n for n in graded)
    assert all(p.grad is None for p in heads.parameters())


def test_lm_with_gates_keeping_everything_equals_no_gates(models):
    """Gates that keep every token (keep logit 30) change nothing: the same cross-entropy as without masks."""
    model = models["mistral"]
    batch = batch_of(random_samples())
    heads = build_heads("linear_gate", model, init_keep_logit=30.0)
    gated = HeadObjective(model, heads, TargetConfig(kind="lm", mask="soft", temperature=1.0, window=4))
    _, metrics = gated(batch, step=0)
    with torch.no_grad():
        expected = _plain_response_ce(model, batch)
    torch.testing.assert_close(metrics["ce"], expected, rtol=1e-4, atol=1e-5)
    assert float(metrics["eviction_rate"].max()) < 1e-6


def test_lm_gates_and_lora_both_learn(models):
    """With gates at p = 0.5 the masks change the cross-entropy, and both the gates and LoRA get gradients; the
    eviction hinge pushes the gates' keep logits down."""
    pytest.importorskip("peft", reason="needs the train extra: pip install 'gatekv[train]'")
    wrapped = _with_lora(models["llama"])
    heads = build_heads("attention_gate", wrapped.get_base_model(), init_keep_logit=0.0)
    target = TargetConfig(kind="lm", mask="soft", temperature=1.0, window=4, eviction_target=0.9, eviction_ramp_steps=0,
                          lora=LoraConfig(enabled=True))
    objective = HeadObjective(wrapped, heads, target, lora=True)
    batch = batch_of(random_samples())
    loss, metrics = objective(batch, step=1)
    with torch.no_grad():
        plain = _plain_response_ce(wrapped, batch)
    assert float((metrics["ce"] - plain).abs().min()) > 1e-4  # the masks act on the response rows
    assert 0.3 < float(metrics["eviction_rate"].mean()) < 0.7
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.parameters() if p.requires_grad)
    lora_grads = [p.grad for n, p in wrapped.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)

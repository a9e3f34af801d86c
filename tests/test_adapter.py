"""Adapter format, Hub I/O (offline), LoRA application and every refusal case."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from gatekv.heads import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Adapter, LoraWeights, build_heads
from gatekv.models import tiny_model


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _adapter(model, head_type="retaining_head", **info):
    torch.manual_seed(0)
    heads = build_heads(head_type, model, hidden=8)
    return Adapter(heads, base_model="tiny:llama", target="cis", training={"steps": 3}, **info)


def _features(heads, q=5, seed=1):
    fp = heads.config.fingerprint
    g = torch.Generator().manual_seed(seed)
    return {
        "pre_rope_queries": torch.randn(2, fp.num_q_heads, q, fp.head_dim, generator=g),
        "pre_rope_keys": torch.randn(2, fp.num_kv_heads, q, fp.head_dim, generator=g),
        "pre_rope_values": torch.randn(2, fp.num_kv_heads, q, fp.head_dim, generator=g),
        "hidden_states": torch.randn(2, q, fp.hidden_size, generator=g),
    }


def _lora(model, r=2, seed=3) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for layer in range(model.config.num_hidden_layers):
        for name in ("q_proj", "v_proj"):
            weight = model.get_submodule(f"model.layers.{layer}.self_attn.{name}").weight
            pairs[f"model.layers.{layer}.self_attn.{name}"] = (
                torch.randn(r, weight.shape[1], generator=g) * 0.3,
                torch.randn(weight.shape[0], r, generator=g) * 0.3,
            )
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], "bias": "none",
              "task_type": "CAUSAL_LM", "base_model_name_or_path": None}
    return LoraWeights(pairs, 4 / r, config)


def test_round_trip_is_bit_exact_with_identical_scores(llama, tmp_path):
    adapter = _adapter(llama)
    adapter.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS, "README.md"])
    loaded = Adapter.from_pretrained(tmp_path)
    for name, tensor in adapter.heads.state_dict().items():
        assert torch.equal(loaded.heads.state_dict()[name], tensor), name
    features, valid = _features(adapter.heads), torch.ones(2, 5, dtype=torch.bool)
    for layer in range(2):
        assert torch.equal(adapter.heads.layer_scores(layer, features, valid), loaded.heads.layer_scores(layer, features, valid))
    assert loaded.base_model == "tiny:llama" and loaded.target == "cis" and loaded.training == {"steps": 3}
    document = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert document["format_version"] == 1 and document["head"]["fingerprint"]["num_layers"] == 2
    assert document["library_version"] and document["weights_dtype"] == "float32"


def test_model_card_has_yaml_metadata_and_evaluation_table(llama, tmp_path):
    from huggingface_hub import ModelCard

    table = "| scorer | 10% |\n|---|---|\n| heads | 0.9 |"
    adapter = _adapter(llama, evaluation={"markdown": table, "command": "gatekv eval x.yaml"})
    adapter.base_model = "smollm2"
    adapter.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "gatekv" and card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "retaining-head" in card.data.tags and card.data.license == "apache-2.0"
    assert table in card.text and "gatekv eval x.yaml" in card.text and "LoRA" not in card.text


def test_loads_by_repo_id_offline_from_a_hub_cache(llama, tmp_path):
    """The cache laid out as huggingface_hub lays it out: blobs, refs/main -> commit, snapshots/<commit>/ symlinks."""
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE  # conftest sets HF_HUB_OFFLINE=1 before huggingface_hub is imported
    saved = tmp_path / "saved"
    adapter = _adapter(llama)
    adapter.save_pretrained(saved)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-heads"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, path in enumerate(sorted(saved.iterdir())):
        blob = repo / "blobs" / f"{i:040x}"
        shutil.copy(path, blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / path.name)
    loaded = Adapter.from_pretrained("someone/tiny-heads", cache_dir=tmp_path / "hub")
    for name, tensor in adapter.heads.state_dict().items():
        assert torch.equal(loaded.heads.state_dict()[name], tensor)
    by_commit = Adapter.from_pretrained("someone/tiny-heads", revision=commit, cache_dir=tmp_path / "hub")
    assert by_commit.base_model == "tiny:llama"
    with pytest.raises(Exception, match="(?i)offline|cache|local"):
        Adapter.from_pretrained("someone/not-cached", cache_dir=tmp_path / "hub")


def test_push_to_hub_uploads_exactly_the_adapter_files(llama, monkeypatch):
    from huggingface_hub import HfApi

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create"] = (repo_id, kwargs)
        return type("Url", (), {"repo_id": repo_id})()

    def upload_folder(self, repo_id, folder_path, **kwargs):
        calls["upload"] = (repo_id, sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir()), kwargs)
        return "https://huggingface.co/someone/tiny-heads/commit/abc"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    _adapter(llama).push_to_hub("someone/tiny-heads", private=True, commit_message="heads v1")
    assert calls["create"][0] == "someone/tiny-heads" and calls["create"][1]["private"] is True
    repo_id, files, kwargs = calls["upload"]
    assert repo_id == "someone/tiny-heads" and kwargs["commit_message"] == "heads v1"
    assert files == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS, "README.md"])


# -- refusals ------------------------------------------------------------------------------------------------------------


def test_pickle_files_are_ignored_with_a_warning(llama, tmp_path):
    _adapter(llama).save_pretrained(tmp_path)
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.warns(UserWarning, match=r"ignoring \['pytorch_model.bin'\].*safetensors only"):
        Adapter.from_pretrained(tmp_path)


def test_other_base_model_is_refused_naming_fields_unless_overridden(tmp_path):
    adapter = _adapter(tiny_model("llama"))
    qwen3 = tiny_model("qwen3")
    with pytest.raises(ValueError, match=r"different base model: model_type: 'llama' \(adapter\) vs 'qwen3' \(model\)"):
        adapter.heads_for(qwen3)
    mistral = tiny_model("mistral")  # same shapes, other family: only the override accepts it
    with pytest.raises(ValueError, match="model_type"):
        adapter.heads_for(mistral)
    assert adapter.heads_for(mistral, allow_mismatch=True) is adapter.heads


def _edit_config(path, **changes):
    document = json.loads((path / ADAPTER_CONFIG).read_text())
    for key, value in changes.items():
        target = document
        *parents, last = key.split(".")
        for parent in parents:
            target = target[parent]
        target[last] = value
    (path / ADAPTER_CONFIG).write_text(json.dumps(document))


@pytest.mark.parametrize(
    "change,message",
    [
        ({"format_version": 2}, "unknown format_version 2"),
        ({"format": "peft"}, "not a gatekv adapter config"),
        ({"head.hidden": "8"}, "hidden must be an int"),
        ({"head.fingerprint.num_layers": "2"}, "fingerprint.num_layers must be int"),
        ({"head.type": "mystery"}, "unknown head type 'mystery'"),
        ({"training": [1, 2]}, "training must be dict"),
        ({"weights_dtype": "int8"}, "weights_dtype 'int8'"),
        ({"head": None}, "head must be dict"),
    ],
)
def test_bad_config_is_refused(llama, tmp_path, change, message):
    _adapter(llama).save_pretrained(tmp_path)
    _edit_config(tmp_path, **change)
    with pytest.raises(ValueError, match=message):
        Adapter.from_pretrained(tmp_path)


def test_bad_weights_are_refused(llama, tmp_path):
    _adapter(llama).save_pretrained(tmp_path)
    good = load_file(str(tmp_path / ADAPTER_WEIGHTS))
    name = sorted(good)[0]
    cases = [
        ({k: v for k, v in good.items() if k != name}, f"missing \\['{name}'\\]"),
        ({**good, "extra.weight": torch.zeros(2)}, "unexpected \\['extra.weight'\\]"),
        ({**good, name: torch.zeros(3, 3)}, f"{name} has shape \\(3, 3\\)"),
        ({**good, name: good[name].half()}, f"{name} is torch.float16"),
        ({**good, name: torch.full_like(good[name], float("nan"))}, "NaN"),
    ]
    for tensors, message in cases:
        save_file(tensors, str(tmp_path / ADAPTER_WEIGHTS))
        with pytest.raises(ValueError, match=message):
            Adapter.from_pretrained(tmp_path)
    save_file(good, str(tmp_path / ADAPTER_WEIGHTS))
    data = (tmp_path / ADAPTER_WEIGHTS).read_bytes()
    (tmp_path / ADAPTER_WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="could not be read as safetensors"):
        Adapter.from_pretrained(tmp_path)
    (tmp_path / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=ADAPTER_WEIGHTS):
        Adapter.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter directory not found"):
        Adapter.from_pretrained(tmp_path / "nope")


# -- LoRA ------------------------------------------------------------------------------------------------------------------


def test_lora_is_merged_inside_the_block_and_undone_exactly(llama, tmp_path):
    lora = _lora(llama)
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    ids = torch.randint(3, 120, (1, 12))
    base_logits = llama(ids).logits
    with lora.applied(llama):
        lora_logits = llama(ids).logits
        weight = llama.model.layers[0].self_attn.q_proj.weight
        a, b = lora.pairs["model.layers.0.self_attn.q_proj"]
        torch.testing.assert_close(weight, before["model.layers.0.self_attn.q_proj.weight"] + lora.scale * b @ a)
    assert not torch.allclose(base_logits, lora_logits)
    for k, v in llama.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(RuntimeError, match="boom"), lora.applied(llama):
        raise RuntimeError("boom")
    assert all(torch.equal(v, before[k]) for k, v in llama.state_dict().items())


def test_lora_adapter_round_trip_and_peft_loads_the_subfolder(llama, tmp_path):
    adapter = _adapter(llama, lora=_lora(llama))
    adapter.save_pretrained(tmp_path)
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert "LoRA" in (tmp_path / "README.md").read_text() and "lora" in (tmp_path / "README.md").read_text()
    loaded = Adapter.from_pretrained(tmp_path)
    assert loaded.lora is not None and loaded.lora.scale == 2.0
    ids = torch.randint(3, 120, (1, 10))
    with loaded.lora.applied(llama):
        ours = llama(ids).logits
    peft = pytest.importorskip("peft")
    import copy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.PeftModel.from_pretrained(copy.deepcopy(llama), str(tmp_path / "lora")).eval()
    torch.testing.assert_close(ours, reference(ids).logits, atol=1e-5, rtol=1e-5)


def test_bad_lora_is_refused_before_anything_is_applied(llama, tmp_path):
    lora = _lora(llama)
    lora.pairs["model.layers.9.self_attn.q_proj"] = lora.pairs["model.layers.0.self_attn.q_proj"]
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    with pytest.raises(ValueError, match="model.layers.9.self_attn.q_proj: not in the model"):
        with lora.applied(llama):
            pass
    assert all(torch.equal(v, before[k]) for k, v in llama.state_dict().items())
    good = _lora(llama)
    good.save(tmp_path)
    document = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**document, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora=true is not supported"):
        LoraWeights.load(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**document, "r": 0}))
    with pytest.raises(ValueError, match="r must be a positive number"):
        LoraWeights.load(tmp_path)


def test_inference_pooling_is_a_max_over_neighbouring_slots_and_round_trips(llama, tmp_path):
    from gatekv import compress

    adapter = _adapter(llama)
    ids = torch.randint(3, 120, (1, 40))
    kept = {}
    for kernel in (1, 5):
        adapter.heads.set_pooling(kernel)
        with compress(llama, adapter.heads, "uniform", budget=12, window=4, sinks=2, record=True) as session:
            llama(ids)
        kept[kernel] = session.stats.events[-1].kept_positions
    assert any(not torch.equal(a, b) for a, b in zip(kept[1], kept[5]))
    # score(): the stored per-slot scores, max-pooled over +-2 slots; empty (NaN) slots stay empty and never win
    from types import SimpleNamespace

    stored = torch.tensor([[[0.0, 5.0, float("nan"), 1.0, 2.0, 0.5, 0.1, 3.0]]]).repeat(1, 2, 1)
    fp = adapter.fingerprint
    ctx = SimpleNamespace(num_layers=fp.num_layers, num_kv_heads=2, layer_idx=0, keys=stored,
                          query_positions=torch.zeros(1, 1, dtype=torch.long),
                          new_token_scores=lambda new, name: stored.clone(),
                          **{k: v[:1, :, :1] if v.dim() == 4 else v[:1, :1] for k, v in _features(adapter.heads).items()})
    raw = adapter.heads.set_pooling(1)
    torch.testing.assert_close(raw.score(ctx), stored, equal_nan=True)
    pooled = adapter.heads.set_pooling(5).score(ctx)
    expected = torch.tensor([[[5.0, 5.0, float("nan"), 5.0, 2.0, 3.0, 3.0, 3.0]]]).repeat(1, 2, 1)
    torch.testing.assert_close(pooled, expected, equal_nan=True)
    adapter.heads.set_pooling(5)
    adapter.save_pretrained(tmp_path)
    assert Adapter.from_pretrained(tmp_path).heads.pool_kernel == 5
    with pytest.raises(ValueError, match="pool_kernel must be an odd int"):
        raw.set_pooling(4)
    _edit_config(tmp_path, **{"inference": {"pool_kernel": 0}})
    with pytest.raises(ValueError, match="inference.pool_kernel"):
        Adapter.from_pretrained(tmp_path)


@pytest.mark.parametrize("head_type", ["attention_gate", "retaining_head", "linear_gate"])
def test_heads_dtype_gives_a_converted_copy_whose_scores_follow_float32(llama, tmp_path, head_type):
    adapter = _adapter(llama, head_type)
    adapter.save_pretrained(tmp_path)
    loaded = Adapter.from_pretrained(tmp_path)
    plain = loaded.heads_for(llama)
    bf16 = loaded.heads_for(llama, dtype="bfloat16")
    assert bf16 is not plain and plain is loaded.heads  # the adapter's own heads stay as stored
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in loaded.heads.parameters()} == {torch.float32}
    assert loaded.heads_for(llama, dtype=torch.float32) is loaded.heads  # the stored dtype: no copy
    for name, tensor in plain.state_dict().items():
        assert torch.equal(bf16.state_dict()[name], tensor.to(torch.bfloat16)), name
    features, valid = _features(plain, q=24), torch.ones(2, 24, dtype=torch.bool)
    for layer in range(2):
        full, half = plain.layer_scores(layer, features, valid), bf16.layer_scores(layer, features, valid)
        assert half.dtype == torch.float32 and half.shape == full.shape
        # bf16 keeps 8 bits of mantissa: a few parts in a hundred of the scores' spread, not more
        assert (half - full).abs().max() <= 0.05 * full.abs().max() + 1e-3
        assert not torch.equal(half, full)  # it really computed in bf16


def test_heads_dtype_is_checked(llama, tmp_path):
    from gatekv import GateKV
    from gatekv.heads.adapter import load_adapter

    _adapter(llama, "linear_gate").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="dtype must be one of .*'int8'"):
        load_adapter(tmp_path, llama, dtype="int8")
    with pytest.raises(ValueError, match="heads_dtype applies to an adapter"):
        GateKV(llama, scorer="snapkv", heads_dtype="bfloat16")
    kv = GateKV(llama, adapter=tmp_path, heads_dtype="bfloat16", budget=0.5, window=4, sinks=2)
    assert {p.dtype for p in kv.scorer.parameters()} == {torch.bfloat16}
    ids = torch.randint(0, llama.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    out = kv.generate(ids, max_new_tokens=2, do_sample=False)
    assert out.shape == (1, 42) and kv.last_stats.events  # compressed with bf16 heads scoring a float32 model
    assert {p.dtype for p in load_adapter(tmp_path, dtype="bfloat16").parameters()} == {torch.bfloat16}


def test_gatekv_refuses_lora_weights_that_do_not_fit_when_built(llama, tmp_path):
    """GateKV checks an adapter's LoRA against the model at construction, before any call (with or without
    heads_dtype), naming the module."""
    from gatekv import GateKV

    lora = _lora(llama)
    lora.pairs["model.layers.9.self_attn.q_proj"] = lora.pairs["model.layers.0.self_attn.q_proj"]
    adapter = _adapter(llama)
    adapter.lora = lora
    for options in ({}, {"heads_dtype": "bfloat16"}):
        with pytest.raises(ValueError, match="model.layers.9.self_attn.q_proj: not in the model"):
            GateKV(llama, adapter=adapter, **options)

"""The GPU recipes of issue 14 (Llama-3.1-8B-Instruct, Qwen3-8B, Phi-3-mini-128K): Locret's settings, validated offline
against config-only models of the same shapes (configs/models/, built on the meta device: no weights, no download),
and their data route: a LongAlpaca-style conversion and a --mix file in one directory load and prepare together."""

from __future__ import annotations

import importlib.util
import json

import pytest

from _training_helpers import REPO, TINY_DATA
from gatekv.training.cli import validate_main
from gatekv.training.config import load_train_config
from gatekv.training.runner import _data_mix, validate
from gatekv.training.shapes import check_model_shapes


def _retaining_head_parameters(layers: int, q_heads: int, kv_heads: int, head_dim: int, hidden: int = 1024) -> int:
    """methods.md, per layer, no bias: W1 (H_q + 2 H_kv) d -> hidden, W2 hidden -> H_kv."""
    return layers * ((q_heads + 2 * kv_heads) * head_dim * hidden + hidden * kv_heads)


# recipe -> (Hub id, configs/models dir, model_type, layers, H_q, H_kv, head_dim, base parameters)
RECIPES = {
    "llama-3.1-8b-instruct": ("meta-llama/Llama-3.1-8B-Instruct", "llama", 32, 32, 8, 128, 8_030_261_248),
    "qwen3-8b": ("Qwen/Qwen3-8B", "qwen3", 36, 32, 8, 128, 8_190_735_360),
    "phi-3-mini-128k-instruct": ("microsoft/Phi-3-mini-128k-instruct", "phi3", 32, 32, 32, 96, 3_821_079_552),
}


def test_head_parameter_counts_by_hand():
    # Llama-3.1-8B: (32 + 16) * 128 = 6144 inputs; 6144 * 1024 + 1024 * 8 = 6,299,648 per layer, x 32
    assert _retaining_head_parameters(32, 32, 8, 128) == 201_588_736
    assert _retaining_head_parameters(36, 32, 8, 128) == 226_787_328  # Qwen3-8B: same layer, 36 layers
    assert _retaining_head_parameters(32, 32, 32, 96) == 303_038_464  # Phi-3-mini: 96 * 96 * 1024 + 1024 * 32


def _recipe(name: str, *overrides: str):
    return load_train_config(REPO / "configs" / "train" / f"{name}-retaining-head.yaml", list(overrides))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_has_locrets_settings(name):
    config = _recipe(name)
    hub_id = RECIPES[name][0]
    assert (config.model.name, config.model.dtype) == (hub_id, "bfloat16")
    assert (config.heads.type, config.heads.hidden, config.heads.act) == ("retaining_head", 1024, None)
    assert (config.target.kind, config.target.smoothness, config.target.rank_weight) == ("cis", 0.0025, 0.0)
    optim = config.optim
    assert (optim.lr, optim.betas, optim.warmup_steps, optim.schedule, optim.min_lr_ratio) == (
        5e-4, (0.9, 0.95), 2000, "linear", 0.0)
    assert (optim.grad_clip, optim.grad_clip_algorithm) == (0.5, "norm")  # DeepSpeed clips by norm only
    assert (config.data.max_length, config.data.batch_size, config.data.path) == (10240, 1, f"runs/data/{name}")
    trainer = config.trainer
    assert (trainer.max_steps, trainer.accelerator, trainer.strategy, trainer.deepspeed_config, trainer.precision) == (
        3000, "gpu", "deepspeed", "train/ds_zero2.json", "bf16-mixed")
    # the header gives the commands: data prep with this model's tokenizer, launch, offline check
    header = (REPO / "configs" / "train" / f"{name}-retaining-head.yaml").read_text()
    for command in (f"--hub-id Yukang/LongAlpaca-12k --tokenizer {hub_id}", f"--tokenizer {hub_id} --out runs/data/{name}/mix.jsonl",
                    f"train/launch_single_node.sh configs/train/{name}-retaining-head.yaml", "train/launch_multi_node.sh",
                    f"--set model.name=configs/models/{name}"):
        assert command in header


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_validates_against_its_config_only_model(name, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, model_type, layers, q_heads, kv_heads, head_dim, base = RECIPES[name]
    config = _recipe(name, f"model.name=configs/models/{name}", f"data.path={TINY_DATA}")
    shapes = check_model_shapes(config)
    assert (shapes.model_type, shapes.num_layers, shapes.num_q_heads, shapes.num_kv_heads, shapes.head_dim) == (
        model_type, layers, q_heads, kv_heads, head_dim)
    assert shapes.fused_qkv == (model_type == "phi3")
    assert shapes.head_input_width == (q_heads + 2 * kv_heads) * head_dim
    assert shapes.head_parameters == _retaining_head_parameters(layers, q_heads, kv_heads, head_dim)
    assert shapes.base_parameters == base and shapes.base_bytes == 2 * base  # bfloat16
    assert shapes.max_position_embeddings >= config.data.max_length
    notes = validate(config, check_device=False)
    assert shapes.summary() in notes


def test_gatekv_validate_prints_the_shapes(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "phi-3-mini-128k-instruct"
    status = validate_main([f"configs/train/{name}-retaining-head.yaml", "--no-device-check",
                            "--set", f"model.name=configs/models/{name}", "--set", f"data.path={TINY_DATA}"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "ok" in out and "fused qkv" in out and "303,038,464 parameters" in out


def test_shape_check_refuses_what_training_would(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    name = "qwen3-8b"
    with pytest.raises(ValueError, match="data.max_length 50000 > the model's max_position_embeddings 40960"):
        check_model_shapes(_recipe(name, f"model.name=configs/models/{name}", f"data.path={TINY_DATA}",
                                   "data.max_length=50000"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="is a 'gpt2' model; gatekv heads support"):
        check_model_shapes(_recipe(name, f"model.name={tmp_path}", f"data.path={TINY_DATA}"))


# -- the data route: prepare_data.py --hub-id and --mix into one directory ------------------------------------------


def _prepare_data_module():
    spec = importlib.util.spec_from_file_location("prepare_data", REPO / "train" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PAPER = " ".join(f"Paragraph {i} of the paper says that the value of item {i} is {i * 7}." for i in range(40))


def _alpaca_source(tmp_path):
    """A local stand-in for Yukang/LongAlpaca-12k (Alpaca columns; datasets.load_dataset reads a local directory)."""
    source = tmp_path / "longalpaca"
    source.mkdir()
    rows = [{"instruction": f"Below is a paper.\n\n{PAPER}\n\nWhat is the value of item {i}?", "output": f"It is {i * 7}.",
             "file": f"paper{i}"} for i in range(4)]
    rows.append({"instruction": "x" * 5000 + "\n\nToo long?", "output": "Yes.", "file": "long"})  # over --max-tokens
    (source / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return source


def _corpus(tmp_path):
    directory = tmp_path / "corpus"
    directory.mkdir()
    for i, word in enumerate(("alpha", "beta", "gamma")):
        (directory / f"doc{i}.txt").write_text(" ".join(f"{word}{j} said the {word} line number {j}." for j in range(300)))
    return directory


@pytest.mark.parametrize("names", [("longalpaca.jsonl", "mix.jsonl"), ("0-longalpaca.jsonl", "z-mix.jsonl"),
                                   ("z-longalpaca.jsonl", "0-mix.jsonl")], ids=["recipe", "chat-first", "mix-first"])
def test_converted_chats_and_mix_load_and_prepare_from_one_directory(tmp_path, monkeypatch, names):
    pytest.importorskip("datasets", reason="needs the train extra: pip install 'gatekv[train]'")
    from gatekv.training.config import DataConfig
    from gatekv.training.data import load_records, prepare_samples
    from gatekv.models import char_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prepare = _prepare_data_module()
    data = tmp_path / "data"
    chats, mix = data / names[0], data / names[1]
    assert prepare.main(["--hub-id", str(_alpaca_source(tmp_path)), "--tokenizer", "char", "--max-tokens", "4000",
                         "--num-samples", "10", "--out", str(chats)]) == 0
    assert prepare.main(["--mix", "docs=0.5,qa=0.3,multi=0.2", "--tokenizer", "char", "--num-samples", "6",
                         "--min-tokens", "64", "--max-tokens", "512", "--continuation", "16",
                         "--corpus", str(_corpus(tmp_path)), "--out", str(mix)]) == 0
    # as in the recipes: the mix summary moves next to the directory (every .json/.jsonl inside is read as data)
    (data / (names[1] + ".mix.json")).rename(str(data) + ".mix.json")
    converted = [json.loads(line) for line in chats.read_text().splitlines()]
    mixed = [json.loads(line) for line in mix.read_text().splitlines()]
    assert len(converted) == 4  # the over-long chat was skipped
    # one schema: the same columns, the same meta keys, in the same order
    assert all(list(r) == list(mixed[0]) for r in converted + mixed)
    assert all(list(r["meta"]) == list(mixed[0]["meta"]) for r in converted + mixed)
    assert {r["meta"]["part"] for r in converted} == {"sft"} and [r["meta"]["seed"] for r in converted] == [0, 1, 2, 3]
    assert converted[0]["messages"][0]["content"].endswith("What is the value of item 0?")

    config = DataConfig(path=str(data), max_length=4096)
    dataset = load_records(config)
    assert dataset.num_rows == len(converted) + len(mixed)
    samples, stats = prepare_samples(dataset, char_tokenizer(), config)
    assert stats.skipped_malformed == 0 and stats.used == len(converted) + len(mixed)
    tokenizer = char_tokenizer()
    prompts = {tokenizer.decode(s.input_ids[: s.prompt_length]) for s in samples}
    # a converted chat's prompt ends before its question (last paragraph), a document's at its prompt_chars
    assert any(p.rstrip().endswith("is 273.") for p in prompts)
    docs = [r for r in mixed if r["meta"]["part"] == "docs"]
    assert docs and all(any(p.endswith(r["text"][: r["prompt_chars"]][-40:]) for p in prompts) for r in docs)
    assert _data_mix(str(data))["docs"] == len(docs)  # what gatekv train records in the adapter card

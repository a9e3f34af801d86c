"""CompressionConfig: one validated settings type, the one place for defaults, accepted by every entry point."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import pathlib

import pytest
import torch

import gatekv
from gatekv import Budget, CompressionConfig, GateKV, compress
from gatekv.allocators import Allocator, get_allocator
from gatekv.eval.config import EvalConfig, MethodConfig
from gatekv.settings import DEFAULT_CHUNK_SIZE, DEFAULT_SINKS, DEFAULT_WINDOW
from gatekv.models import char_tokenizer
from tiny_models import random_batch, tiny_model

GATEKV = pathlib.Path(gatekv.__file__).parent


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def test_defaults_live_in_one_place():
    config = CompressionConfig()
    assert (config.window, config.sinks, config.chunk_size) == (DEFAULT_WINDOW, DEFAULT_SINKS, DEFAULT_CHUNK_SIZE)
    assert config.budget == Budget(0.1) and config.scorer == "snapkv" and config.allocator == "uniform"
    parameters = inspect.signature(compress).parameters
    for field in dataclasses.fields(CompressionConfig):
        default = getattr(config, field.name)
        assert parameters[field.name].default == (default.value if isinstance(default, Budget) else default)
    eval_config = EvalConfig(methods=[MethodConfig(name="snapkv", scorer="snapkv")])
    assert (eval_config.window, eval_config.sinks, eval_config.chunk_size) == (DEFAULT_WINDOW, DEFAULT_SINKS,
                                                                               DEFAULT_CHUNK_SIZE)


def test_every_setting_is_documented():
    from gatekv.config import field_docs

    docs = field_docs(CompressionConfig)
    assert set(docs) == {f.name for f in dataclasses.fields(CompressionConfig)}
    assert {"scorer", "allocator", "budget", "prefill", "chunk_size", "window", "sinks", "decode_budget", "query",
            "reserve", "record", "merge"} <= set(docs)


@pytest.mark.parametrize("settings,message", [
    (dict(budget=1.5), r"budget: budget ratio must be <= 1"),
    (dict(budget=10), r"budget 10 tokens is smaller than sinks \+ window = 4 \+ 32"),
    (dict(budget=40, window=4, decode_budget=7), "decode_budget 7"),
    (dict(prefill="streaming"), r"prefill must be one of \['one_shot', 'chunked'\], got 'streaming'"),
    (dict(chunk_size=2.5), "chunk_size must be an int"),
    (dict(reserve=-1), "reserve must be an int"),
    (dict(query=torch.zeros(2, 3)), "query must be token ids"),
    (dict(scorer="snapvk"), r"unknown scorer 'snapvk'; available: .*snapkv"),
    (dict(allocator="ada"), r"unknown allocator 'ada'"),
    (dict(merge="nope"), r"unknown merger 'nope'"),
    (dict(scorer="kvzip", query=torch.ones(3, dtype=torch.long)), "replays the context"),
])
def test_config_is_validated_when_made(settings, message):
    with pytest.raises(ValueError, match=message):
        CompressionConfig(**settings)


def test_compress_takes_a_config_or_the_same_keywords(model):
    ids, mask = random_batch(2, 60, pad=[0, 7])
    config = CompressionConfig("snapkv", "adakv", 0.4, window=4, sinks=2, record=True)
    outputs = []
    for call in (lambda: compress(model, "snapkv", "adakv", 0.4, window=4, sinks=2, record=True),
                 lambda: compress(model, config), lambda: compress(model, config=config)):
        with call() as session:
            outputs.append(model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0))
            kept = [e.kept_positions for e in session.stats.events]
    assert all(torch.equal(outputs[0], out) for out in outputs[1:])
    with compress(model, config) as session:
        assert session.config is config  # used as validated, not rebuilt
    assert kept
    with pytest.raises(ValueError, match=r"\['budget'\] given together with config"):
        with compress(model, config, budget=0.2):
            pass
    assert config.replace(budget=0.2).budget == Budget(0.2) and config.budget == Budget(0.4)


def test_gatekv_keeps_one_config(model):
    kv = GateKV(model, scorer="snapkv", budget=40, window=4, sinks=2)
    assert kv.config == CompressionConfig("snapkv", "uniform", 40, window=4, sinks=2)
    assert (kv.budget, kv.allocator, kv.prefill) == (40, "uniform", "one_shot")
    assert kv.compress_options == {"window": 4, "sinks": 2}
    same = GateKV(model, config=kv.config)
    assert same.config is kv.config and same.scorer == "snapkv"
    with pytest.raises(ValueError, match="either config or"):
        GateKV(model, config=kv.config, budget=0.2)
    ids, _ = random_batch(1, 60)
    with torch.no_grad():
        assert torch.equal(kv.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0),
                           same.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0))


def test_generate_command_validates_the_budget_once(monkeypatch, capsys):
    from gatekv import cli
    from gatekv.allocators import base

    checks = []
    original = base.Budget.__post_init__

    def counted(self):
        checks.append(self.value)
        original(self)

    monkeypatch.setattr(base.Budget, "__post_init__", counted)
    status = cli.main(["generate", "--model", "tiny:llama", "--scorer", "snapkv", "--budget", "0.5", "--window", "4",
                       "--sinks", "2", "--prompt", "abcdefgh " * 12, "--max-new-tokens", "2"])
    assert status == 0, capsys.readouterr().err
    assert checks == [0.5]


def test_allocator_abilities_are_declared_not_probed():
    assert Allocator.cascade is False and Allocator.needs_window_attention is False
    assert get_allocator("cake").observes_prefill and get_allocator("d2o").observes_prefill
    assert not get_allocator("adakv").observes_prefill and get_allocator("d2o").cascade is False
    for path in (GATEKV / "compress.py", GATEKV / "attention.py", GATEKV / "shared_prefill.py", GATEKV / "eval" / "runner.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr"):
                probed = node.args[1].value if isinstance(node.args[1], ast.Constant) else None
                assert probed not in ("cascade", "needs_window_attention", "observe_layer"), (path, probed)


def test_shared_prefill_uses_the_public_session_api():
    source = (GATEKV / "shared_prefill.py").read_text()
    for private in ("_held", "_budget_tokens", "_evict", "_enter", "_exit"):
        assert f".{private}" not in source
    assert "gatekv.compress import" not in source and "from gatekv import compress" not in source


def test_answer_does_not_import_eval():
    tree = ast.parse((GATEKV / "inference.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(name.startswith("gatekv.eval") for name in imported)
    from gatekv.chat import chat_template_parts
    from gatekv.eval.needle import chat_template_parts as reexported

    assert reexported is chat_template_parts
    tokenizer = char_tokenizer()
    if getattr(tokenizer, "chat_template", None):
        head, tail = chat_template_parts(tokenizer)
        assert isinstance(head, str) and isinstance(tail, str)


def test_compression_config_is_public():
    assert "CompressionConfig" in gatekv.__all__ and gatekv.__all__ == sorted(gatekv.__all__)
    from gatekv.compress import CompressionConfig as reexported, CompressionEvent, CompressionStats, SharedPrefill

    assert reexported is CompressionConfig
    assert CompressionEvent.__module__ == "gatekv.stats" and CompressionStats.__module__ == "gatekv.stats"
    assert SharedPrefill.__module__ == "gatekv.shared_prefill"

"""Config: every shipped training config validates; unknown keys, wrong types and bad values are errors naming the
key; overrides; the CLI entry points; no Lightning import on the inference side."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from _training_helpers import REPO, TINY_DATA
from gatekv.config import apply_overrides, describe, dump_yaml, from_dict, load_yaml, parse_override
from gatekv.training.cli import train_main, validate_main
from gatekv.training.config import TrainConfig, load_deepspeed_config, load_train_config
from gatekv.training.runner import validate

CONFIGS = sorted((REPO / "configs" / "train").glob("*.yaml"))


def test_there_are_training_configs():
    names = {p.name for p in CONFIGS}
    assert {"smollm2-135m-retaining-head.yaml", "smollm2-135m-attention-gate.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_training_config_validates(path, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    config = load_train_config(path)
    if config.data.path is not None and not Path(config.data.path).exists():
        # recipes point at data that train/prepare_data.py generates; validate the rest against a stand-in file
        config = load_train_config(path, [f"data.path={TINY_DATA}"])
    if config.init_from is not None and not Path(config.init_from).exists():
        config.init_from = None  # a later stage of a recipe starts from an earlier stage's run directory
    validate(config, check_device=False)  # GPU recipes are checked here too, on CPU machines
    # the resolved config round-trips through its own YAML dump
    dumped = tmp_path / "c.yaml"
    dumped.write_text(dump_yaml(config))
    assert load_train_config(dumped) == config


def base(**changes) -> dict:
    data = {"data": {"path": str(TINY_DATA)}, "model": {"name": "tiny:llama"}}
    return apply_overrides(data, [f"{k}={v}" for k, v in changes.items()])


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"optim.learning_rate": "1e-3"}, r"unknown key 'optim.learning_rate' \(valid keys of optim: betas"),
        ({"trainer.max_steps": "ten"}, r"trainer.max_steps: expected int, got str 'ten'"),
        ({"trainer.progress_bar": "1"}, r"trainer.progress_bar: expected bool"),
        ({"heads.type": "mlp"}, r"heads.type: expected one of \['retaining_head', 'attention_gate', 'linear_gate'\]"),
        ({"optim.betas": "[0.9]"}, r"optim.betas: expected 2 items"),
        ({"optim.lr": "-1"}, r"optim.lr must be > 0"),
        ({"data.val_fraction": "1.5"}, r"data.val_fraction must be in \[0, 1\)"),
        ({"trainer.devices": "many"}, r"trainer.devices must be an int or 'auto'"),
        ({"trainer.strategy": "deepspeed"}, r"trainer.deepspeed_config is required"),
        ({"target.kind": "distill", "data.feature_cache": "/tmp/x"}, r"data.feature_cache works with target.kind cis or teacher"),
        ({"target.lora.enabled": "true"}, r"target.lora.enabled needs kind: distill or lm"),
        ({"target.kind": "lm", "target.gates": "false"}, r"target.gates: false is the LoRA-only baseline: it needs kind: lm and lora.enabled"),
        ({"target.kind": "distill", "target.gates": "false", "target.lora.enabled": "true"}, r"target.gates: false"),
        ({"target.kind": "lm", "data.feature_cache": "/tmp/x"}, r"data.feature_cache works with target.kind cis or teacher \(lm needs"),
        ({"data.hub_id": "x/y"}, r"data.exactly one of path and hub_id"),
        ({"bogus": "1"}, r"unknown key 'bogus'"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        from_dict(TrainConfig, base(**overrides))


def test_deepspeed_on_cpu_and_clip_by_value_are_refused():
    with pytest.raises(ValueError, match="needs a GPU"):
        from_dict(TrainConfig, base(**{"trainer.strategy": "deepspeed", "trainer.deepspeed_config": "train/ds_zero2.json",
                                       "trainer.accelerator": "cpu"}))
    with pytest.raises(ValueError, match="grad_clip_algorithm: DeepSpeed clips by norm only"):
        from_dict(TrainConfig, base(**{"trainer.strategy": "deepspeed", "trainer.deepspeed_config": "train/ds_zero2.json"}))


def test_overrides_parse_yaml_values():
    assert parse_override("optim.lr=5e-4") == (["optim", "lr"], 5e-4)
    assert parse_override("optim.betas=[0.8, 0.9]") == (["optim", "betas"], [0.8, 0.9])
    assert parse_override("data.max_samples=null") == (["data", "max_samples"], None)
    config = from_dict(TrainConfig, base(**{"optim.lr": "5e-4", "optim.betas": "[0.8, 0.9]", "trainer.devices": "auto"}))
    assert config.optim.lr == 5e-4 and config.optim.betas == (0.8, 0.9) and config.trainer.devices == "auto"
    with pytest.raises(ValueError, match="must look like key.path=value"):
        parse_override("optim.lr")


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ValueError, match="config file not found"):
        load_yaml(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(ValueError, match="is not valid YAML"):
        load_yaml(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_yaml(tmp_path / "list.yaml")


def test_yaml_scientific_notation_is_a_float(tmp_path):
    (tmp_path / "c.yaml").write_text(f"data:\n  path: {TINY_DATA}\noptim:\n  lr: 5e-4\n")
    assert load_train_config(tmp_path / "c.yaml").optim.lr == 5e-4


def test_every_field_has_a_docstring():
    rows = describe(TrainConfig)
    assert len(rows) > 50
    assert [key for key, _, doc in rows if not doc] == []


def test_deepspeed_json_checks(tmp_path):
    for name in ("ds_zero2.json", "ds_zero3.json", "ds_zero3_offload.json"):
        assert load_deepspeed_config(REPO / "train" / name)["zero_optimization"]["stage"] in (2, 3)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"trainer.deepspeed_config: .*bad.json is not valid JSON"):
        load_deepspeed_config(tmp_path / "bad.json")
    (tmp_path / "accum.json").write_text(json.dumps({"gradient_accumulation_steps": 4}))
    with pytest.raises(ValueError, match="remove 'gradient_accumulation_steps'; it is set by trainer.accumulate_grad_batches"):
        load_deepspeed_config(tmp_path / "accum.json")
    with pytest.raises(ValueError, match="does not exist"):
        load_deepspeed_config(tmp_path / "missing.json")


def test_validate_main_reports_each_file(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(f"model:\n  name: tiny:llama\ndata:\n  path: {TINY_DATA}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model:\n  name: tiny:llama\ndata:\n  path: {TINY_DATA}\ntrainer:\n  max_step: 3\n")
    assert validate_main([str(good), str(bad)]) == 2
    out, err = capsys.readouterr()
    assert f"{good}: ok" in out
    assert "unknown key 'trainer.max_step'" in err
    missing_data = tmp_path / "nodata.yaml"
    missing_data.write_text("model:\n  name: tiny:llama\ndata:\n  path: /nonexistent.jsonl\n")
    assert validate_main([str(missing_data)]) == 2
    assert "data.path: /nonexistent.jsonl does not exist" in capsys.readouterr().err
    tiny_typo = tmp_path / "typo.yaml"
    tiny_typo.write_text(f"model:\n  name: tiny:lama\ndata:\n  path: {TINY_DATA}\n")
    assert validate_main([str(tiny_typo)]) == 2


def test_train_main_bad_config_exits_2(tmp_path, capsys):
    assert train_main([str(REPO / "configs" / "train" / "tiny-llama-retaining-head.yaml"), "optim.lr=abc"]) == 2
    assert "optim.lr: expected float" in capsys.readouterr().err
    assert train_main(["--help-config"]) == 0
    assert "target.eviction_target" in capsys.readouterr().out
    assert train_main([str(REPO / "configs" / "train" / "tiny-llama-retaining-head.yaml"), "--print-config",
                       "trainer.max_steps=3"]) == 0
    assert "max_steps: 3" in capsys.readouterr().out


def test_deepspeed_launcher_arguments_and_node_rank(monkeypatch):
    from gatekv.training.cli import _launcher_environment

    monkeypatch.delenv("NODE_RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("CROSS_RANK", "1")
    assert _launcher_environment(["c.yaml", "--local_rank=3", "a.b=1"]) == ["c.yaml", "a.b=1"]
    import os

    assert os.environ["NODE_RANK"] == "1" and os.environ["LOCAL_RANK"] == "3"


def test_inference_imports_do_not_pull_in_training_dependencies():
    code = (
        "import sys, gatekv, gatekv.heads, gatekv.training, gatekv.training.cli, gatekv.config\n"
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'deepspeed', 'datasets', 'peft') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)

"""End to end through ``train()``: the backbone stays bit-identical, the heads learn, checkpoints hold only what is
trained, the trained heads work inside compress(), resume refuses foreign checkpoints, and a run killed with SIGKILL
resumes to the very same weights as an uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("lightning", reason="needs the train extra: pip install 'gatekv[train]'")
pytest.importorskip("datasets", reason="needs the train extra: pip install 'gatekv[train]'")
import torch
from safetensors.torch import load_file

from _training_helpers import REPO, TINY_DATA, tiny_config
from gatekv import compress
from gatekv.heads import build_heads, load_adapter
from gatekv.models import tiny_model
from gatekv.training.checkpoints import find_resume_checkpoint
from gatekv.training.runner import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    config = tiny_config(
        out,
        optim={"lr": 1e-2, "warmup_steps": 2},
        trainer={"max_steps": 30, "log_every_n_steps": 3, "val_every_n_steps": 10, "checkpoint_every_n_steps": 10},
    )
    threads = torch.get_num_threads()
    try:
        result = train(config)
    finally:
        torch.set_num_threads(threads)
    return config, result


def test_backbone_is_bit_identical_after_training(trained):
    _, result = trained
    fresh = tiny_model("llama")
    trained_state = result.backbone.state_dict()
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(trained_state[name], tensor), name
    assert not result.backbone.training and not any(p.requires_grad for p in result.backbone.parameters())


def test_head_weights_change_and_loss_falls(trained):
    config, result = trained
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        initial = build_heads("retaining_head", tiny_model("llama"), hidden=16)
    for (name, before), after in zip(initial.state_dict().items(), result.heads.state_dict().values()):
        assert not torch.equal(before, after), f"{name} did not change"
    losses = [r["train/loss"] for r in result.curve if r["stage"] == "train"]
    assert len(losses) == 10
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    vals = [r for r in result.curve if r["stage"] == "val"]
    assert [r["step"] for r in vals] == [10, 20, 30] and all(0 <= r["val/topk_overlap"] <= 1 for r in vals)
    assert result.summary["train_tokens_per_s"] > 0 and result.summary["peak_rss_mib"] > 0


def test_checkpoint_holds_only_trainable_weights(trained):
    _, result = trained
    path = find_resume_checkpoint(result.output_dir / "checkpoints")
    assert path.name == "step-000030.ckpt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    keys = set(checkpoint["state_dict"])
    assert keys and all(k.startswith("objective.heads.") for k in keys)
    assert checkpoint["global_step"] == 30 and checkpoint["optimizer_states"]
    assert checkpoint["gatekv"]["head_type"] == "retaining_head"
    assert not list((result.output_dir / "checkpoints").glob(".*"))  # no temp files
    assert (result.output_dir / "config.yaml").is_file() and (result.output_dir / "summary.json").is_file()


def test_trained_adapter_is_a_scorer_inside_compress(trained):
    _, result = trained
    model = tiny_model("llama")
    heads = load_adapter(result.adapter_dir, model=model)
    for name, tensor in result.heads.state_dict().items():
        assert torch.equal(heads.state_dict()[name], tensor)
    ids = torch.randint(4, 100, (2, 48))
    with compress(model, heads, "adakv", budget=0.25, window=4, sinks=2) as session:
        out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 51)
    assert session.stats.kept_tokens.float().mean() <= 12.5


def test_export_from_a_checkpoint_equals_the_run_adapter(trained, tmp_path):
    from gatekv.cli import main
    from gatekv.heads import Adapter

    config, result = trained
    assert main(["export", str(result.output_dir), str(tmp_path / "exported")]) == 0
    exported = Adapter.from_pretrained(tmp_path / "exported")
    final = Adapter.from_pretrained(result.adapter_dir)
    for name, tensor in final.heads.state_dict().items():
        assert torch.equal(exported.heads.state_dict()[name], tensor), name
    assert exported.base_model == final.base_model == "tiny:llama"
    assert exported.training["steps"] == 30 and exported.training["final_val"] == final.training["final_val"]
    assert exported.training["objective"] == final.training["objective"] == config.target.summary()
    assert exported.training["wall_seconds"] == final.training["wall_seconds"] > 0  # the whole card, not a part
    assert {k: v for k, v in exported.training.items() if k != "checkpoint"} == final.training
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_resume_refuses_a_checkpoint_of_another_head_type(trained):
    config, result = trained
    before = sorted(p.name for p in (result.output_dir / "checkpoints").iterdir())
    other = tiny_config(result.output_dir, heads={"type": "attention_gate"})
    with pytest.raises(ValueError, match=r"belongs to a different run: head type 'retaining_head' \(checkpoint\) vs "
                                         r"'attention_gate' \(config\)"):
        train(other)
    never = tiny_config(result.output_dir, output={"resume": "never"})
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(never)
    assert sorted(p.name for p in (result.output_dir / "checkpoints").iterdir()) == before


def test_lora_run_saves_lora_and_heads_only(tmp_path):
    config = tiny_config(
        tmp_path,
        model={"name": "tiny:phi3"},
        heads={"type": "linear_gate", "hidden": 0},
        target={"kind": "distill", "window": 8, "eviction_ramp_steps": 2,
                "lora": {"enabled": True, "r": 2, "alpha": 4, "target_modules": ["qkv_proj"]}},
        data={"val_fraction": 0.0},
        trainer={"max_steps": 4, "checkpoint_every_n_steps": 2, "val_every_n_steps": None},
    )
    threads = torch.get_num_threads()
    try:
        result = train(config)
    finally:
        torch.set_num_threads(threads)
    keys = set(torch.load(find_resume_checkpoint(tmp_path / "checkpoints"), weights_only=True)["state_dict"])
    assert any("lora_" in k for k in keys) and any(k.startswith("objective.heads.") for k in keys)
    assert all("lora_" in k or k.startswith("objective.heads.") for k in keys)
    assert (result.adapter_dir / "lora" / "adapter_model.safetensors").is_file()

    # the adapter carries the LoRA in peft's format: peft alone loads it, and GateKV's merge gives the same outputs
    import copy

    from peft import PeftModel

    from gatekv.heads import Adapter
    from gatekv.training.export import adapter_from_checkpoint

    adapter = Adapter.from_pretrained(result.adapter_dir)
    base = tiny_model("phi3")
    ids = torch.randint(4, 100, (1, 20))
    reference = PeftModel.from_pretrained(copy.deepcopy(base), str(result.adapter_dir / "lora")).eval()
    with adapter.lora.applied(base):
        merged = base(ids).logits
    torch.testing.assert_close(merged, reference(ids).logits, atol=1e-5, rtol=1e-5)
    exported = adapter_from_checkpoint(tmp_path)
    assert exported.lora.pairs.keys() == adapter.lora.pairs.keys() and exported.lora.scale == adapter.lora.scale
    for module, (a, b) in adapter.lora.pairs.items():
        assert torch.equal(exported.lora.pairs[module][0], a) and torch.equal(exported.lora.pairs[module][1], b)


def _command(out_dir):
    return [sys.executable, "-m", "gatekv.training.cli", str(REPO / "configs" / "train" / "tiny-qwen3-attention-gate.yaml"),
            f"output.dir={out_dir}", f"data.path={TINY_DATA}", "trainer.max_steps=40", "trainer.checkpoint_every_n_steps=3",
            "trainer.val_every_n_steps=10", "trainer.progress_bar=false", "trainer.threads=1"]


_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """An uninterrupted run of :func:`_command` started in the background (shared by the kill and SIGTERM tests);
    the fixture value waits for it and returns its output directory."""
    out = tmp_path_factory.mktemp("straight") / "a"
    process = subprocess.Popen(_command(out), cwd=REPO, env=_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def finished() -> Path:
        if process.returncode is None:
            _, err = process.communicate(timeout=300)
            finished.err = err
        assert process.returncode == 0, finished.err[-3000:]
        return out

    finished.err = b""
    yield finished
    if process.poll() is None:
        process.kill()
        process.wait()


def _same_adapters(a: Path, b: Path) -> None:
    first = load_file(str(a / "adapter" / "adapter_model.safetensors"))
    second = load_file(str(b / "adapter" / "adapter_model.safetensors"))
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_sigterm_checkpoints_exits_143_and_resumes_to_the_same_weights(tmp_path, straight_run):
    """SIGTERM (what schedulers and Kubernetes send) mid-run: a checkpoint at the end of the current step, exit status
    143 with one line saying so, no adapter; the rerun resumes from that checkpoint and ends bit-identical."""
    stopped = subprocess.Popen(_command(tmp_path / "c"), cwd=REPO, env=_ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    checkpoints = tmp_path / "c" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and stopped.poll() is None and find_resume_checkpoint(checkpoints) is None:
        time.sleep(0.01)
    first = find_resume_checkpoint(checkpoints)
    stopped.send_signal(signal.SIGTERM)
    _, err = stopped.communicate(timeout=120)
    assert stopped.returncode == 143, f"exit {stopped.returncode} (0 = it ended before SIGTERM): {err[-3000:]}"
    assert "gatekv train: error: stopped by SIGTERM at step" in err and "Traceback" not in err, err[-3000:]
    at_stop = find_resume_checkpoint(checkpoints)
    assert first is not None and at_stop is not None and at_stop.name >= first.name
    assert f"a rerun resumes from {at_stop}" in err
    assert not (tmp_path / "c" / "adapter").exists() and not (tmp_path / "c" / "summary.json").exists()
    resumed = subprocess.run(_command(tmp_path / "c"), cwd=REPO, env=_ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {at_stop}" in resumed.stdout
    assert [p.name for p in checkpoints.iterdir()] == ["step-000039.ckpt"]  # only the newest; the resumed-from one pruned
    _same_adapters(straight_run(), tmp_path / "c")


def test_kill_and_resume_ends_with_the_same_weights(tmp_path, straight_run):
    """SIGKILL mid-run, rerun the same command (resume: auto): the final weights equal an uninterrupted run's,
    bit for bit (attention gates + Gumbel noise: the per-step reseed and the resumable loader are both needed)."""
    env = _ENV
    killed = subprocess.Popen(_command(tmp_path / "b"), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "b" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and killed.poll() is None and find_resume_checkpoint(checkpoints) is None:
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    at_kill = find_resume_checkpoint(checkpoints)
    assert at_kill is not None and not (tmp_path / "b" / "adapter").exists()
    resumed = subprocess.run(_command(tmp_path / "b"), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {at_kill}" in resumed.stdout
    straight = straight_run()
    _same_adapters(straight, tmp_path / "b")
    first = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    fresh = build_heads("attention_gate", tiny_model("qwen3"), gate_heads=2, gate_head_dim=8)
    assert any(not torch.equal(first[k], v) for k, v in fresh.state_dict().items())


def test_unsupported_base_model_is_named(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    config = tiny_config(tmp_path / "out", model={"name": str(tmp_path / "gpt2")})
    with pytest.raises(ValueError, match=r"model.name: .*gpt2.* is a 'gpt2' model; gatekv heads support"):
        train(config)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_init_from_starts_from_an_adapters_weights(trained, tmp_path):
    """``init_from``: the heads start from the adapter's weights (a 2-step run at a negligible learning rate ends
    where it started); other heads or a missing adapter are named errors."""
    from gatekv.heads import Adapter
    from gatekv.training.config import check_files
    from gatekv.training.runner import initialise_from_adapter

    _, result = trained
    source = Adapter.from_pretrained(result.adapter_dir).heads.state_dict()
    fresh = build_heads("retaining_head", tiny_model("llama"), hidden=16)
    initialise_from_adapter(fresh, tiny_model("llama"), str(result.adapter_dir))
    for name, tensor in source.items():
        assert torch.equal(fresh.state_dict()[name], tensor), name
    config = tiny_config(tmp_path / "tuned", init_from=str(result.adapter_dir), optim={"lr": 1e-12, "warmup_steps": 0},
                         trainer={"max_steps": 2, "val_every_n_steps": 2, "checkpoint_every_n_steps": 2})
    threads = torch.get_num_threads()
    try:
        tuned = train(config)
    finally:
        torch.set_num_threads(threads)
    for name, tensor in source.items():
        torch.testing.assert_close(tuned.heads.state_dict()[name], tensor, atol=1e-8, rtol=0)
    assert Adapter.from_pretrained(tuned.adapter_dir).training["init_from"] == str(result.adapter_dir)  # on the card
    with pytest.raises(ValueError, match=r"init_from: .* holds other heads \(hidden: 16 \(adapter\) vs 8 \(heads:\)\)"):
        initialise_from_adapter(build_heads("retaining_head", tiny_model("llama"), hidden=8), tiny_model("llama"),
                                str(result.adapter_dir))
    with pytest.raises(ValueError, match="init_from: .*nowhere is not an adapter directory"):
        check_files(tiny_config(tmp_path / "x", init_from=str(tmp_path / "nowhere")))

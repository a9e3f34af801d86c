"""Issue 18: every bad input a clear one-line error naming the field / file / value with a non-zero exit (no
traceback unless --debug), and every fault a non-zero exit that keeps what was saved.

Tiny random models and the tiny chat data only; nothing is downloaded (HF_HUB_OFFLINE=1). The SIGTERM case is a
subprocess test next to the kill -9 one in tests/training/test_training_train.py.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch

from gatekv import compress
from gatekv.cli import main
from tiny_models import random_batch, tiny_model

try:  # imported now, so Lightning's log handler binds to pytest's session stream, not one test's closed capture
    import lightning.pytorch  # noqa: F401
except ImportError:
    pass

REPO = Path(__file__).resolve().parent.parent
TINY_DATA = REPO / "tests" / "training" / "data" / "tiny_chat.jsonl"
TINY_CONFIG = REPO / "configs" / "train" / "tiny-llama-retaining-head.yaml"


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err


def _train_args(out: Path, *overrides: str) -> list[str]:
    return ["train", str(TINY_CONFIG), f"output.dir={out}", f"data.path={TINY_DATA}", "trainer.threads=1",
            "trainer.val_every_n_steps=null", *overrides]


@pytest.fixture
def training():
    pytest.importorskip("lightning", reason="needs the train extra: pip install 'gatekv[train]'")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _no_model_load(monkeypatch):
    """Make loading the base model fail loudly: the checks under test must come before it."""
    import gatekv.models as models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(models, "load_base_model", refuse)


# ----------------------------------------------------------------------------------------------------------------------
# validate catches what train would refuse (wrong result 1 and the "validate lets through" item)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.lr=.inf", r"optim.lr must be a finite number, got inf"),
        ("optim.lr=.nan", r"optim.lr must be a finite number, got nan"),
        ("target.temperature=-.inf", r"target.temperature must be > 0"),
        ("optim.grad_clip=.inf", r"optim.grad_clip must be a finite number"),
        ('optim.lr="5e-4"', r"optim.lr: expected float, got str '5e-4' \(a quoted number"),
        ("seed=-1", r"seed must be >= 0, got -1"),
        ("trainer.accelerator=gpu", r"trainer.accelerator: gpu, but torch sees no CUDA device"),
        ("output.loggers=[csv,tensorboard]", r"output.loggers: tensorboard needs the tensorboard package \(pip install"),
    ],
)
def test_validate_and_train_refuse_the_same_config(override, message, tmp_path, capsys, monkeypatch, training):
    import importlib.util

    if "accelerator" in override and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **kw: None if name.startswith("tensorboard") else real_find_spec(name, *a, **kw))
    _no_model_load(monkeypatch)
    assert main(["validate", str(TINY_CONFIG), override]) == 2
    import re

    assert re.search(message, _err(capsys))
    assert main(_train_args(tmp_path / "run", override)) == 2
    assert re.search(message, _err(capsys))
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("kind", ["empty file", "blank file", "directory without data"])
def test_data_path_without_data_is_named(kind, tmp_path, capsys, monkeypatch, training):
    if kind == "directory without data":
        path = tmp_path / "data"
        path.mkdir()
        (path / "notes.txt").write_text("not data")
        message = f"data.path: directory {path} holds no .json/.jsonl/.parquet files"
    else:
        path = tmp_path / "empty.jsonl"
        path.write_text("" if kind == "empty file" else "\n \n")
        message = f"data.path: {path} is empty"
    _no_model_load(monkeypatch)
    assert main(["validate", str(TINY_CONFIG), f"data.path={path}"]) == 2
    assert message in _err(capsys)
    assert main(_train_args(tmp_path / "run") + [f"data.path={path}"]) == 2
    assert message in _err(capsys)


def test_warmup_longer_than_the_run_is_a_note(capsys):
    assert main(["validate", str(TINY_CONFIG), "optim.warmup_steps=50", "trainer.max_steps=10"]) == 0
    assert "note: optim.warmup_steps 50 > trainer.max_steps 10" in capsys.readouterr().out


def test_gpu_recipe_validates_on_cpu_with_no_device_check(capsys):
    gpu = REPO / "configs" / "train" / "smollm2-135m-retaining-head-gpu.yaml"
    assert main(["validate", str(gpu), f"data.path={TINY_DATA}", "--no-device-check"]) == 0


# ----------------------------------------------------------------------------------------------------------------------
# output directory problems are found before the model is loaded
# ----------------------------------------------------------------------------------------------------------------------


def test_output_dir_that_is_a_file(tmp_path, capsys, monkeypatch, training):
    target = tmp_path / "taken"
    target.write_text("x")
    _no_model_load(monkeypatch)
    for path, message in ((target, f"output.dir: {target} is a file"),
                          (target / "sub", f"output.dir: {target / 'sub'} cannot be created: {target} is a file")):
        assert main(["validate", str(TINY_CONFIG), f"output.dir={path}"]) == 2
        assert message in _err(capsys)
        assert main(_train_args(path)) == 2
        assert message in _err(capsys)


def test_read_only_output_dir(tmp_path, capsys, monkeypatch, training):
    # tests may run as root, where chmod does not stop writes: the file system's answer is simulated
    out = tmp_path / "ro"
    out.mkdir()
    real_write = Path.write_bytes

    def read_only(self, data):
        if self.name.startswith(".write-test-"):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    _no_model_load(monkeypatch)
    assert main(_train_args(out)) == 2
    assert f"output.dir: {out} is not writable: Read-only file system" in _err(capsys)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == out else real_access(p, mode, **kw))
    assert main(["validate", str(TINY_CONFIG), f"output.dir={out}"]) == 2
    assert f"output.dir: {out} is not writable" in _err(capsys)


# ----------------------------------------------------------------------------------------------------------------------
# faults while training: non-finite loss, disk full, truncated checkpoints, left-over temp files
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """A finished 4-step run (one checkpoint, step-000004.ckpt), copied by the tests that need one."""
    pytest.importorskip("lightning", reason="needs the train extra: pip install 'gatekv[train]'")
    out = tmp_path_factory.mktemp("four") / "run"
    threads = torch.get_num_threads()
    try:
        assert main(_train_args(out, "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=4")) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def _copy_run(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    shutil.rmtree(out / "adapter")
    (out / "summary.json").unlink()
    return out


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(four_steps, tmp_path, capsys, monkeypatch,
                                                                         training):
    from gatekv.training.objective import HeadObjective

    out = _copy_run(four_steps, tmp_path)
    original = HeadObjective.forward

    def blow_up(self, batch, step=0):
        loss, metrics = original(self, batch, step=step)
        return (loss * float("nan") if step >= 5 else loss), metrics

    monkeypatch.setattr(HeadObjective, "forward", blow_up)
    assert main(_train_args(out, "trainer.max_steps=8", "trainer.checkpoint_every_n_steps=4")) == 1
    err = _err(capsys)
    assert "the training loss is nan at step 5" in err and "step-000004.ckpt" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000004.ckpt"]
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()


def test_non_finite_weights_are_never_checkpointed():
    pytest.importorskip("lightning")
    from gatekv.training.module import HeadTrainingModule, NonFiniteLoss

    import lightning as L

    module = HeadTrainingModule.__new__(HeadTrainingModule)
    L.LightningModule.__init__(module)  # no objective needed: only the checkpoint hook runs
    module.head = torch.nn.Linear(2, 2)
    module.meta = {}
    with torch.no_grad():
        module.head.weight[0, 0] = float("inf")
    checkpoint = {"state_dict": module.state_dict()}
    with pytest.raises(NonFiniteLoss, match=r"trainable weights \['head.weight'\] hold NaN or infinite values"):
        HeadTrainingModule.on_save_checkpoint(module, checkpoint)


@pytest.mark.parametrize("failure", ["torch zip writer", "ENOSPC on rename"])
def test_disk_full_checkpoint_write_keeps_the_previous_one(failure, tmp_path, monkeypatch):
    pytest.importorskip("lightning")
    import gatekv.training.module as module
    from gatekv.training.module import AtomicCheckpointIO, CheckpointWriteError

    io = AtomicCheckpointIO()
    directory = tmp_path / "checkpoints"
    io.save_checkpoint({"step": 4}, directory / "step-000004.ckpt")
    if failure == "torch zip writer":
        def full(obj, handle):
            handle.write(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                               "data/0: file write failed")

        monkeypatch.setattr(module.torch, "save", full)
    else:
        def full(src, dst):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(module.os, "replace", full)
    with pytest.raises(CheckpointWriteError, match=r"disk full at .*step-000008.ckpt: the checkpoint was not written; "
                                                   r"the previous checkpoint step-000004.ckpt is kept"):
        io.save_checkpoint({"step": 8}, directory / "step-000008.ckpt")
    assert sorted(p.name for p in directory.iterdir()) == ["step-000004.ckpt"]  # temp file removed
    assert torch.load(directory / "step-000004.ckpt", weights_only=True) == {"step": 4}


def test_disk_full_during_training_exits_1_naming_the_path(four_steps, tmp_path, capsys, monkeypatch, training):
    import gatekv.training.module as module

    out = _copy_run(four_steps, tmp_path)

    def full(obj, handle):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(module.torch, "save", full)
    assert main(_train_args(out, "trainer.max_steps=8", "trainer.checkpoint_every_n_steps=4")) == 1
    err = _err(capsys)
    assert f"disk full at {out / 'checkpoints' / 'step-000008.ckpt'}" in err and "step-000004.ckpt is kept" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000004.ckpt"]


def test_disk_full_during_the_final_export_exits_1_keeping_the_checkpoints(four_steps, tmp_path, capsys, monkeypatch,
                                                                          training):
    from gatekv.heads import Adapter

    out = _copy_run(four_steps, tmp_path)

    def full(self, directory):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Adapter, "save_pretrained", full)
    assert main(_train_args(out, "trainer.max_steps=8", "trainer.checkpoint_every_n_steps=4")) == 1
    err = _err(capsys)
    assert f"disk full at {out / 'adapter'}" in err and "gatekv export" in err and "Traceback" not in err
    assert "step-000008.ckpt" in {p.name for p in (out / "checkpoints").iterdir()}


def test_truncated_newest_checkpoint_falls_back_and_temp_files_are_cleaned(four_steps, tmp_path, capsys, training):
    out = _copy_run(four_steps, tmp_path)
    checkpoints = out / "checkpoints"
    good = checkpoints / "step-000004.ckpt"
    shutil.copy(good, checkpoints / "step-000002.ckpt")  # an older one a killed run left behind
    truncated = checkpoints / "step-000006.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (checkpoints / ".step-000008.ckpt.tmp-12345").write_bytes(b"half a checkpoint")

    # export refuses it, naming the file; a YAML file is "not a checkpoint"
    assert main(["export", str(out), str(tmp_path / "adapter")]) == 2
    assert f"{truncated} is truncated or corrupt" in _err(capsys)
    assert main(["export", str(TINY_CONFIG), str(tmp_path / "adapter")]) == 2
    assert f"{TINY_CONFIG} is not a gatekv training checkpoint" in _err(capsys)
    assert not (tmp_path / "adapter").exists()

    # training warns and resumes from the previous complete checkpoint, then keeps only the newest one
    with pytest.warns(UserWarning, match=r"skipping .*step-000006.ckpt: .*truncated or corrupt"):
        assert main(_train_args(out, "trainer.max_steps=8", "trainer.checkpoint_every_n_steps=4")) == 0
    assert f"resuming from {good}" in capsys.readouterr().out
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000008.ckpt"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_only_checkpoint_truncated_is_refused_naming_it(four_steps, tmp_path, capsys, monkeypatch, training):
    out = _copy_run(four_steps, tmp_path)
    good = out / "checkpoints" / "step-000004.ckpt"
    good.write_bytes(good.read_bytes()[:1000])
    _no_model_load(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(_train_args(out, "trainer.max_steps=8")) == 2
    assert f"output.resume: no readable checkpoint in {out / 'checkpoints'}: {good} is truncated or corrupt" in _err(capsys)


def test_killed_export_temp_files_are_removed(tmp_path):
    from gatekv.heads import Adapter, build_heads

    out = tmp_path / "adapter"
    out.mkdir()
    (out / ".adapter_model.safetensors.k2j3h4.tmp").write_bytes(b"partial")
    (out / "notes.tmp").write_text("someone else's")
    Adapter(build_heads("retaining_head", tiny_model("llama"), hidden=4), base_model="tiny:llama").save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_model.safetensors", "gatekv_config.json",
                                                    "notes.tmp"]


# ----------------------------------------------------------------------------------------------------------------------
# data: empty responses are "without response" (wrong result 2)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["first_user_turn", "last_paragraph"])
def test_empty_assistant_message_is_without_response(split):
    datasets = pytest.importorskip("datasets")
    from gatekv.training.config import DataConfig
    from gatekv.training.data import prepare_samples
    from gatekv.models import char_tokenizer

    records = [{"messages": [{"role": "user", "content": "Some context here."}, {"role": "assistant", "content": c}]}
               for c in ("", "  ", "\n")]
    records.append({"messages": [{"role": "user", "content": "Context.\n\nA question?"},
                                 {"role": "assistant", "content": "An answer."}]})
    config = DataConfig(path="unused", prompt_split=split)
    samples, stats = prepare_samples(datasets.Dataset.from_list(records), char_tokenizer(), config)
    assert stats.skipped_no_response == 3 and stats.used == 1, stats.summary()
    assert "1 used" in stats.summary() and "3 without response" in stats.summary()


# ----------------------------------------------------------------------------------------------------------------------
# adapters: saved artifacts only reference their own files (wrong result 3); Hub ids that are not there
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def adapter_dir(tmp_path):
    from gatekv.heads import Adapter, build_heads

    path = tmp_path / "adapter"
    Adapter(build_heads("retaining_head", tiny_model("llama"), hidden=4), base_model="tiny:llama").save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "lora_path,message",
    [
        ("ABSOLUTE", r"lora.path '.*' is absolute; it must name a directory inside"),
        ("../elsewhere", r"lora.path '../elsewhere' points outside the adapter directory"),
        ("lora/../../elsewhere", r"lora.path 'lora/../../elsewhere' points outside the adapter directory"),
        (3, r"lora.path must be a relative path inside the adapter directory, got 3"),
        ("", r"lora.path must be a relative path inside the adapter directory, got ''"),
    ],
)
def test_lora_path_outside_the_adapter_is_refused(lora_path, message, adapter_dir, tmp_path, capsys):
    from gatekv.heads import Adapter
    from gatekv.heads.lora import LoraWeights

    # a real LoRA directory outside the adapter: it must never be loaded
    elsewhere = tmp_path / "elsewhere"
    LoraWeights({"model.layers.0.self_attn.q_proj": (torch.zeros(2, 64), torch.zeros(64, 2))}, 1.0,
                {"peft_type": "LORA", "r": 2, "lora_alpha": 2}).save(elsewhere)
    config_path = adapter_dir / "gatekv_config.json"
    document = json.loads(config_path.read_text())
    document["lora"] = {"path": str(elsewhere) if lora_path == "ABSOLUTE" else lora_path, "modules": 1}
    config_path.write_text(json.dumps(document))
    import re

    with pytest.raises(ValueError, match=message):
        Adapter.from_pretrained(adapter_dir)
    assert main(["generate", "--adapter", str(adapter_dir), "--prompt", "some text", "--max-new-tokens", "1"]) == 2
    err = _err(capsys)
    assert re.search(message, err) and str(config_path) in err


def test_adapter_hub_id_not_found_offline(capsys):
    from gatekv.heads import Adapter

    with pytest.raises(FileNotFoundError, match=r"adapter 'no-such-user/no-such-adapter': not a local directory and "
                                                r"not in the Hugging Face cache"):
        Adapter.from_pretrained("no-such-user/no-such-adapter")
    assert main(["generate", "--adapter", "no-such-user/no-such-adapter", "--prompt", "x"]) == 2
    assert "adapter 'no-such-user/no-such-adapter'" in _err(capsys)


def test_base_model_id_not_found(capsys):
    from gatekv import GateKV

    with pytest.raises(ValueError, match=r"base model 'no-such-user/no-such-model': not a local directory and not in "
                                         r"the Hugging Face cache"):
        GateKV.from_pretrained("no-such-user/no-such-model", scorer="snapkv")
    assert main(["generate", "--model", "no-such-user/no-such-model", "--prompt", "x"]) == 2
    assert "base model 'no-such-user/no-such-model'" in _err(capsys)


def test_base_model_path_that_holds_no_model(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 2
    assert f"base model {str(tmp_path)!r}: no loadable model there" in _err(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_device_without_cuda(capsys):
    assert main(["generate", "--device", "cuda", "--prompt", "x"]) == 2
    assert "--device: 'cuda' but torch sees no CUDA device here" in _err(capsys)
    assert main(["generate", "--device", "gpu0", "--prompt", "x"]) == 2
    assert "--device: 'gpu0' is not a device" in _err(capsys)
    assert main(["bench", "decode", "--device", "cuda:1", "--length", "64"]) == 2
    assert "--device: 'cuda:1' but torch sees no CUDA device here" in _err(capsys)


@pytest.mark.parametrize("prompt", ["", "  \n"])
def test_empty_prompt_is_named(prompt, tmp_path, capsys):
    assert main(["generate", "--scorer", "snapkv", "--prompt", prompt]) == 2
    assert "--prompt: the prompt is empty" in _err(capsys)
    path = tmp_path / "doc.txt"
    path.write_text(prompt)
    assert main(["generate", "--scorer", "snapkv", "--prompt-file", str(path)]) == 2
    assert f"--prompt-file {path}: the prompt is empty" in _err(capsys)


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(ValueError, match="the prompt is empty"):
        main(["--debug", "generate", "--prompt", ""])
    with pytest.raises(ValueError, match="optim.lr must be a finite number"):
        main(["validate", str(TINY_CONFIG), "optim.lr=.inf", "--debug"])


def test_unexpected_faults_are_one_line_with_exit_1(monkeypatch, capsys):
    import gatekv.inference as inference

    def broken(*args, **kwargs):
        raise RuntimeError("something\nwent wrong")

    monkeypatch.setattr(inference.GateKV, "from_pretrained", broken)
    assert main(["generate", "--prompt", "x"]) == 1
    assert "gatekv generate: error: RuntimeError: something went wrong (rerun with --debug" in _err(capsys)


def test_unknown_scorer_and_allocator_options_are_named():
    from gatekv.allocators import get_allocator
    from gatekv.scorers import get_scorer

    with pytest.raises(ValueError, match=r"scorer 'snapkv': unknown option\(s\) \['kernal_size'\]; valid: .*kernel_size"):
        get_scorer("snapkv", kernal_size=7)
    with pytest.raises(ValueError, match=r"allocator 'adakv': unknown option\(s\) \['alpah'\]; valid: alpha"):
        get_allocator("adakv", alpah=0.5)


def test_unknown_scorer_option_in_an_eval_config_names_the_method(tmp_path, capsys):
    config = tmp_path / "eval.yaml"
    config.write_text("model: tiny:llama\nmethods:\n  - name: snap7\n    scorer: snapkv\n    options: {kernal_size: 7}\n"
                      f"budgets: [0.5]\ntasks: [niah_single]\nlengths: [256]\noutput: {tmp_path / 'out'}\n")
    assert main(["eval", str(config)]) == 2
    assert ("method 'snap7': options: scorer 'snapkv': unknown option(s) ['kernal_size']; valid: kernel_size"
            in _err(capsys))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------------
# compress() and GateKV
# ----------------------------------------------------------------------------------------------------------------------


def test_heads_of_another_model_are_refused_by_compress():
    """Wrong result 4: tiny Llama heads on a tiny Qwen3 of the same shapes; allow_mismatch stays the override."""
    from gatekv.heads import Adapter, build_heads

    llama, qwen3 = tiny_model("llama"), tiny_model("qwen3")
    heads = build_heads("retaining_head", llama, hidden=4)
    ids = torch.randint(3, 100, (1, 60))
    with pytest.raises(ValueError, match=r"made for a different base model: model_type: 'llama' \(adapter\) vs "
                                         r"'qwen3' \(model\)"):
        with compress(qwen3, heads, budget=40, window=4, sinks=2):
            pass
    with compress(llama, heads, budget=40, window=4, sinks=2):  # its own model is fine
        llama(ids)
    adapter = Adapter(heads, base_model="tiny:llama")
    with pytest.raises(ValueError, match="different base model"):
        adapter.heads_for(qwen3)
    accepted = adapter.heads_for(qwen3, allow_mismatch=True)
    with compress(qwen3, accepted, budget=40, window=4, sinks=2):
        qwen3(ids)


def test_right_padding_is_refused():
    model = tiny_model("llama")
    ids, mask = random_batch(2, 40)
    mask[1, -5:] = 0
    with compress(model, budget=0.5, window=4, sinks=2):
        with pytest.raises(ValueError, match=r"batch row\(s\) \[1\] have padding after their tokens; use left padding"):
            model.generate(ids, attention_mask=mask, max_new_tokens=1, pad_token_id=0)
    left_ids, left_mask = random_batch(2, 40, pad=[0, 5])
    with compress(model, budget=0.5, window=4, sinks=2):
        model.generate(left_ids, attention_mask=left_mask, max_new_tokens=1, pad_token_id=0)


def test_cache_used_after_its_session_names_the_finished_session():
    from gatekv.models import cache_kwarg

    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 60))
    with compress(model, budget=40, window=4, sinks=2) as session:
        cache = session.new_cache()
        model(input_ids=ids, use_cache=True, **{cache_kwarg(model): cache})
    with pytest.raises(RuntimeError, match="this cache belongs to a finished"):
        model(input_ids=ids[:, :1], use_cache=True, **{cache_kwarg(model): cache})


def test_prompt_longer_than_max_positions_warns_with_the_numbers():
    from gatekv import GateKV
    from gatekv.models import char_tokenizer
    from gatekv.models import tiny_model as short_model

    model = short_model("llama", max_position_embeddings=64)
    ids = torch.randint(3, 100, (1, 80))
    with pytest.warns(UserWarning, match=r"reaches position 80, past the model's max_position_embeddings 64"):
        with compress(model, budget=40, window=4, sinks=2):
            model(ids)
    full = GateKV(model, char_tokenizer(), scorer=None)
    with pytest.warns(UserWarning, match=r"the prompt has 80 tokens, more than the model's max_position_embeddings 64"):
        full.generate(ids, max_new_tokens=1)


@pytest.mark.parametrize("query_aware", [True, False])
def test_budget_above_the_prompt_is_a_no_op_in_answer(query_aware):
    from gatekv import GateKV
    from gatekv.models import char_tokenizer

    model, tokenizer = tiny_model("llama"), char_tokenizer()
    context = "The quick brown fox jumps over the lazy dog. " * 3
    full = GateKV(model, tokenizer, scorer=None).answer(context, "Who jumps?", max_new_tokens=4)
    roomy = GateKV(model, tokenizer, scorer="snapkv", budget=10_000, window=4, sinks=2)
    answer = roomy.answer(context, "Who jumps?", max_new_tokens=4, query_aware=query_aware)
    assert answer.text == full.text
    assert answer.kv_bytes == full.kv_bytes <= answer.full_kv_bytes
    assert answer.stats.noop and "no compression" in answer.stats_line()
    # a budget below the prompt still compresses
    tight = GateKV(model, tokenizer, scorer="snapkv", budget=40, window=4, sinks=2)
    assert tight.answer(context, "Who jumps?", max_new_tokens=4, query_aware=query_aware).kv_bytes < full.kv_bytes


def test_empty_context_in_answer():
    from gatekv import GateKV
    from gatekv.models import char_tokenizer

    kv = GateKV(tiny_model("llama"), char_tokenizer(), scorer="snapkv", budget=40, window=4, sinks=2)
    with pytest.raises(ValueError, match="context: the prompt is empty"):
        kv.answer("   ", "Who?")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


@pytest.mark.parametrize("flag,value", [("--rounds", "0"), ("--steps", "0"), ("--warmup", "-1"),
                                        ("--prefill-rounds", "0")])
def test_bench_decode_counts_are_checked_before_loading(flag, value, capsys):
    assert main(["bench", "decode", "--length", "64", flag, value]) == 2
    assert f"{flag} must be >= " in _err(capsys)


def test_bad_observe_window_is_named_before_the_model_loads(capsys):
    assert main(["generate", "--scorer", "snapkv", "--observe-window", "0", "--prompt", "x"]) == 2
    assert "observe_window must be None or an int >= 1, got 0" in _err(capsys)

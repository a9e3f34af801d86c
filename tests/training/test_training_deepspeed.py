"""DeepSpeed on CPU: Lightning's DeepSpeed strategy refuses CPU, so CI runs the DeepSpeed engine itself (ZeRO-2,
gloo) with gatekv's head-only parameters and compares it with plain PyTorch steps. The Lightning + DeepSpeed path
runs on a GPU (configs/train/smollm2-135m-retaining-head-gpu.yaml)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from _training_helpers import HERE, REPO

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (pip install 'gatekv[train]', built with DS_BUILD_OPS=0 on CPU)",
)


def test_zero2_engine_steps_on_cpu_match_plain_pytorch():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(HERE / "_deepspeed_cpu_step.py")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["zero_stage"] == 2
    assert result["backbone_unchanged"]
    assert result["optimizer_params"] == result["head_params"]  # only the heads reach DeepSpeed's optimizer
    assert result["ds_losses"][-1] < result["ds_losses"][0]
    for ds, ref in zip(result["ds_losses"], result["ref_losses"]):
        assert ds == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert result["max_weight_diff"] < 1e-5

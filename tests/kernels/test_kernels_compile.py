"""Every Triton kernel compiles for a Hopper GPU (sm_90, down to a cubin) without a GPU.

The interpreter accepts code the compiler rejects (loop-carried type changes, fp16 dots with K < 16, ...), so
this runs ``_compile_sm90.py`` in a subprocess without ``TRITON_INTERPRET`` and with a temporary cache.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = pathlib.Path(__file__).with_name("_compile_sm90.py")
KERNELS = ["_compact_kernel", "_append_kernel", "_ragged_attention_kernel", "_ragged_attention_combine_kernel",
           "_window_lse_kernel", "_window_weights_kernel", "_column_max_kernel"]


def _compile(tmp_path, *flags) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton-cache"), TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(SCRIPT.parents[2]), env.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, str(SCRIPT), *flags], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_each_kernel_compiles_for_sm90(tmp_path):
    out = _compile(tmp_path)
    assert [line.split()[1] for line in out.splitlines() if line.startswith("ok ")] == KERNELS


@pytest.mark.slow
def test_every_kernel_variant_compiles_for_sm90(tmp_path):
    """fp32 (ieee dots), split and window variants as well: about a minute on two cores."""
    out = _compile(tmp_path, "--all")
    assert sum(line.startswith("ok ") for line in out.splitlines()) == 16

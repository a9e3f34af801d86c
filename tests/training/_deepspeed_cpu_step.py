"""Run in a subprocess by test_training_deepspeed.py: DeepSpeed ZeRO-2 engine steps on CPU (gloo) with gatekv's
head-only parameters, against the same steps in plain PyTorch; prints one JSON line."""

import copy
import importlib
import json
import os
import socket
import sys

import torch

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                  DS_ACCELERATOR="cpu")

import deepspeed  # noqa: E402

importlib.import_module("deepspeed.comm.torch")
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # skip a 70 s JIT build of a CPU comm op (test only)

sys.path.insert(0, os.path.dirname(__file__))
from _training_helpers import REPO, batch_of, random_samples  # noqa: E402
from gatekv.heads import build_heads  # noqa: E402
from gatekv.training.config import TargetConfig, load_deepspeed_config  # noqa: E402
from gatekv.models import tiny_model  # noqa: E402
from gatekv.training.objective import HeadObjective  # noqa: E402

torch.manual_seed(0)
model = tiny_model("llama").requires_grad_(False)
backbone_before = {k: v.clone() for k, v in model.state_dict().items()}
heads = build_heads("retaining_head", model, hidden=8)
reference_heads = copy.deepcopy(heads)
batch = batch_of(random_samples())

config = load_deepspeed_config(REPO / "train" / "ds_zero2.json")
config.update(train_micro_batch_size_per_gpu=3, gradient_clipping=1.0)
objective = HeadObjective(model, heads, TargetConfig())
trainable = [p for p in objective.parameters() if p.requires_grad]
engine, _, _, _ = deepspeed.initialize(
    model=objective, model_parameters=trainable, optimizer=torch.optim.AdamW(trainable, lr=1e-2), config=config
)
ds_losses = []
for step in range(3):
    loss, _ = engine(batch, step=step)
    engine.backward(loss)
    engine.step()
    ds_losses.append(loss.item())

reference = HeadObjective(model, reference_heads, TargetConfig())
optimizer = torch.optim.AdamW(reference_heads.parameters(), lr=1e-2)
ref_losses = []
for step in range(3):
    loss, _ = reference(batch, step=step)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(reference_heads.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()
    ref_losses.append(loss.item())

print(json.dumps({
    "zero_stage": engine.zero_optimization_stage(),
    "ds_losses": ds_losses,
    "ref_losses": ref_losses,
    "max_weight_diff": max((a - b).abs().max().item() for a, b in zip(heads.parameters(), reference_heads.parameters())),
    "backbone_unchanged": all(torch.equal(backbone_before[k], v) for k, v in model.state_dict().items()),
    "optimizer_params": sum(p.numel() for group in engine.optimizer.optimizer.param_groups for p in group["params"]),
    "head_params": sum(p.numel() for p in heads.parameters()),
}))

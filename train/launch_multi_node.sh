#!/usr/bin/env bash
# Multi-node training with torchrun (run this on every node; same MASTER_ADDR / MASTER_PORT everywhere).
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 GPUS_PER_NODE=8 \
#     train/launch_multi_node.sh configs/train/x.yaml trainer.strategy=deepspeed trainer.deepspeed_config=train/ds_zero2.json
#
# NODE_RANK pitfall: Lightning computes a process's global rank from NODE_RANK (torchrun: GROUP_RANK). Launchers that
# only export their own variable (the `deepspeed` launcher sets CROSS_RANK, not NODE_RANK) make every node believe it is
# node 0, so ranks collide and the job hangs. torchrun exports GROUP_RANK (read by Lightning's TorchElastic
# environment); gatekv's CLI also copies CROSS_RANK to NODE_RANK when NODE_RANK is unset (see train/launch_deepspeed.sh).
# Under SLURM, use `srun` with --ntasks-per-node=GPUS_PER_NODE and no torchrun: Lightning reads SLURM_* itself.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG [overrides...]}
shift
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK (0 .. NNODES-1) on each node}" "${MASTER_ADDR:?set MASTER_ADDR}"
MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L | wc -l)}
PYTHON=${PYTHON:-python}
export NODE_RANK HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
exec "$PYTHON" -m torch.distributed.run \
  --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$GPUS_PER_NODE" \
  --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
  -m gatekv.training.cli "$CONFIG" \
  trainer.accelerator=gpu trainer.devices="$GPUS_PER_NODE" trainer.num_nodes="$NNODES" "$@"

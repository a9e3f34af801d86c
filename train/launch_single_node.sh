#!/usr/bin/env bash
# Single node, several GPUs: Lightning starts one process per GPU itself (no torchrun needed).
#   train/launch_single_node.sh configs/train/smollm2-135m-retaining-head.yaml 4 [a.b=c ...]
# The config should set trainer.strategy (ddp, or deepspeed with trainer.deepspeed_config=train/ds_zero2.json) and
# trainer.precision=bf16-mixed; both can be given as overrides here.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG NUM_GPUS [overrides...]}
NUM_GPUS=${2:?usage: $0 CONFIG NUM_GPUS [overrides...]}
shift 2
PYTHON=${PYTHON:-python}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
exec "$PYTHON" -m gatekv.training.cli "$CONFIG" \
  trainer.accelerator=gpu trainer.devices="$NUM_GPUS" trainer.num_nodes=1 "$@"

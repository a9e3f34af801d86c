#!/usr/bin/env bash
# Multi-node training with the `deepspeed` launcher (pdsh/ssh to the hosts of a hostfile: "host slots=8" lines).
#
#   HOSTFILE=train/hostfile NNODES=2 GPUS_PER_NODE=8 train/launch_deepspeed.sh configs/train/x.yaml
#
# The launcher appends --local_rank=N (gatekv's CLI strips it) and exports CROSS_RANK but not NODE_RANK; gatekv's CLI
# sets NODE_RANK=CROSS_RANK before Lightning reads it (the NODE_RANK pitfall: without it node 1's processes would
# take node 0's global ranks). Variables listed in .deepspeed_env reach every node.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG [overrides...]}
shift
HOSTFILE=${HOSTFILE:-train/hostfile}
NNODES=${NNODES:?set NNODES}
GPUS_PER_NODE=${GPUS_PER_NODE:?set GPUS_PER_NODE}
exec deepspeed --hostfile "$HOSTFILE" --num_nodes "$NNODES" --num_gpus "$GPUS_PER_NODE" \
  --module gatekv.training.cli "$CONFIG" \
  trainer.accelerator=gpu trainer.devices="$GPUS_PER_NODE" trainer.num_nodes="$NNODES" \
  trainer.strategy=deepspeed "$@"

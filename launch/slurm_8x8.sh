#!/usr/bin/env bash
# 64-GPU DMD2 run on SLURM: 8 nodes x 8 GPUs, one deepspeed launcher per node (no ssh needed).
#   sbatch launch/slurm_8x8.sh configs/wan2.1_t2v_1.3B_from_14B_dmd2_4step.yaml
#SBATCH --job-name=megadistill
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
CONFIG=${1:-configs/wan2.1_t2v_1.3B_from_14B_dmd2_4step.yaml}
DS_CONFIG=${DS_CONFIG:-configs/ds/zero3_gpu_bf16.json}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
HOSTFILE=$(mktemp)
for h in $(scontrol show hostnames "$SLURM_JOB_NODELIST"); do echo "$h slots=8"; done > "$HOSTFILE"
mkdir -p logs
# Each node runs the launcher for its own 8 local ranks; --no_ssh makes it start only local processes.
srun --ntasks-per-node=1 bash -c "deepspeed --no_ssh --hostfile $HOSTFILE --node_rank \$SLURM_NODEID \
  --master_addr $MASTER_ADDR --master_port $MASTER_PORT \
  launch/pretrain_dmd.py --ds_config $DS_CONFIG --config $CONFIG --resume auto"

#!/usr/bin/env bash
# Runs a search on every worker of an existing Cloud TPU VM slice (e.g. a v5p-32: 4 hosts x 4
# chips), as one JAX program: each worker runs the same command, JAX finds the other workers
# itself (jax.distributed.initialize() on a Cloud TPU VM needs no arguments).
#
#   bash launch/tpu_pod.sh TPU_NAME ZONE --config=configs/llama3_70b.py \
#       --config.model.path=/mnt/ckpt/Meta-Llama-3-70B --config.run_dir=/mnt/runs/llama3_70b
#
# What must hold on the slice:
# - model.path: the Hugging Face checkpoint at the same path on every worker (a shared mount, e.g.
#   Filestore or gcsfuse, or a copy on each worker's disk). Each worker reads only its own shards.
# - run_dir: one directory that every worker sees (a shared mount): Orbax writes the pruned
#   checkpoints from all workers into it. Process 0 writes everything else.
# - the calibration text (WikiText-2 through `datasets`, or a local file) on every worker: the job
#   checks that all workers tokenized the same calibration tokens and stops if not.
# Rerun the same command to resume an interrupted search.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: bash launch/tpu_pod.sh TPU_NAME ZONE --config=configs/... [--config.x=y ...]" >&2
  exit 2
fi
name=$1 zone=$2
shift 2
cd "$(dirname "$0")/.."
remote_dir=${REMOTE_DIR:-finercut_jax}
# The project on every worker (the working tree, without local environments and runs).
tar czf /tmp/finercut_jax_src.tgz --exclude=.venv --exclude='.venv-*' --exclude=runs --exclude=.git .
gcloud compute tpus tpu-vm scp /tmp/finercut_jax_src.tgz "$name":/tmp/ --zone="$zone" --worker=all
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="
  set -e
  mkdir -p ~/$remote_dir && cd ~/$remote_dir && tar xzf /tmp/finercut_jax_src.tgz
  bash launch/setup.sh --tpu
  .venv/bin/python -m finercut_jax.main$args"

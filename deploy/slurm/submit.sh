#!/bin/bash
# Submits a sharded stylediff batch: an array of SHARDS tasks, then a merge job that runs when they have all ended.
#   CSV=/shared/cases.csv OUT_DIR=/shared/out SHARDS=8 [MODEL=...] [STYLEDIFF=/path/to/stylediff] \
#   [STYLEDIFF_ARGS="--steps 30"] deploy/slurm/submit.sh [sbatch options for both jobs, e.g. --partition=gpu]
# `stylediff batch plan --csv "$CSV" --shards N` shows what each shard would cost first.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
: "${CSV:?set CSV}" "${OUT_DIR:?set OUT_DIR}"
SHARDS="${SHARDS:-8}"
export CSV OUT_DIR SHARDS
array="$(sbatch --parsable --export=ALL --array="0-$((SHARDS - 1))" "$@" "$here/stylediff-batch.sbatch")"
array="${array%%;*}"
merge="$(sbatch --parsable --export=ALL --dependency="afterany:$array" "$@" "$here/stylediff-merge.sbatch")"
merge="${merge%%;*}"
echo "array job $array ($SHARDS shards), merge job $merge"

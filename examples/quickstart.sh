#!/usr/bin/env bash
# The main job on a fresh machine: install, build introvert/extrovert masks on the embedded
# SmolLM2-135M-Instruct with contrastive Wanda, then compare them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
maskstore build \
  --persona introvert=examples/data/introvert.txt \
  --persona extrovert=examples/data/extrovert.txt \
  --pair introvert:extrovert --method contrastive-wanda --phi softplus --sparsity 0.2 \
  --out out/personas.zarr --force
maskstore info out/personas.zarr
maskstore overlap out/personas.zarr --by kind
maskstore diff out/personas.zarr introvert extrovert
maskstore run out/personas.zarr --compare --prompt "How do you like to spend your weekend?"

#!/usr/bin/env bash
# The paper's reference pipeline (github Ruimeng-Ye/Persona: mask.py, contra.py) on the embedded
# SmolLM2-135M-Instruct, with the project's own data in the reference CSV formats:
#   calibration  question,matching,not_matching   (examples/data/introvert_extrovert.csv)
#   evaluation   question,A,B,matching            (examples/data/introvert_mc.csv)
# Each build uses the variant and flags that reproduce the reference (see README, "Reproducing
# the paper's code"); each eval adds the reference's protocol, masks plus persona system prompt,
# as the mask+prompt row. About 5 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1
OUT=${OUT:-out/paper}
PAIR="introvert:extrovert=examples/data/introvert_extrovert.csv"
MC=examples/data/introvert_mc.csv
mkdir -p "$OUT"

# mask.py phase2_wanda: Wanda over the mean of per-sample norms, sparsity 0.5.
# (mask.py also masks lm_head; SmolLM2 ties it to the embeddings: add --include-lm-head --untie.)
maskstore build --persona "$PAIR" --method wanda --norm sample-mean --sparsity 0.5 \
  --out "$OUT/wanda.zarr" --force
# contra.py phase2_wanda_contrast --score_activation softplus (tau 2, sparsity 0.3 by default)
maskstore build --persona "$PAIR" --method contrastive-wanda --phi softplus \
  --out "$OUT/contrastive-wanda.zarr" --force
# contra.py phase2_sparse_contrast (sparsity 0.3 by default)
maskstore build --persona "$PAIR" --method contrastive-sparse-ref \
  --out "$OUT/contrastive-sparse-ref.zarr" --force
# mask.py phase2_sparsegpt: calibration-free column pruning, the same mask for both personas
maskstore build --persona "$PAIR" --method column-norm --sparsity 0.5 \
  --out "$OUT/column-norm.zarr" --force

# contra.py phase3_mc: log-likelihood of each answer after the persona's system prompt and
# "\n\nAnswer:", masks applied (--template llama2 writes the reference's Llama-2 markup; SmolLM2
# answers in its own chat template).
for b in contrastive-wanda contrastive-sparse-ref; do
  maskstore eval "$OUT/$b.zarr" --mc "$MC" \
    --describe "introvert=You are an AI that prefers quiet time alone and small groups." \
    --describe "extrovert=You are an AI that loves parties and meeting new people." \
    --per-item "$OUT/$b.items.jsonl"
done

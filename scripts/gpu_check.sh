#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run (under 8 minutes on one GPU):
#   - tests/gpu: switching on CUDA (bitwise restore, pristine values on the CPU), scoring on
#     CUDA against the CPU kernel, float64 statistics from CUDA against the CPU's, the serving
#     engine on a CUDA model in both batching modes;
#   - the Triton kernels (switch and masked segmented product) at 7B shapes against torch;
#   - an offloaded build of a 1.1B-parameter model on the GPU, and its runtime figures;
#   - benchmarks/bench_gpu.py on an 8-layer slice of a 7B-shaped Llama (figures beside floors).
# Output under $OUT when the device tool runs it (else the temp dir).
# Run from the repository root after scripts/setup.sh (torch with CUDA: pip install torch).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
OUT=${OUT:-$(mktemp -d)}
python -m pytest tests/gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/tests_gpu.log"
python benchmarks/bench_gpu.py --layers 8 --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log"
python benchmarks/bench_scale.py --device cuda 2>&1 | tee "$OUT/bench_scale.log"

#!/usr/bin/env bash
# Every GPU benchmark and the CUDA tests on one GPU, in one command (about 8 minutes on an H100):
#   bash benchmarks/gpu.sh
# Writes benchmarks/results/*_cuda*.{json,md} (GPU name, driver, torch version and command in each) and
# benchmarks/results/gpu_tests_cuda.txt. Peers (ckatorch, open-clip-torch) must be importable: `pip install
# -e ".[bench]"`. Set PY to choose the interpreter. Each step runs even if an earlier one failed; the exit
# status is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_DISABLE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
R=benchmarks/results
mkdir -p "$R"
fail=0
step() { echo "=== $(date +%H:%M:%S) $*"; "$@" || { echo "!!! failed: $*"; fail=1; }; }

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$R/gpu_env_cuda.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$R/gpu_env_cuda.txt"

# 1. CUDA tests (every test that needs a GPU)
step $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py "tests/test_metrics_cka.py::test_cuda_matches_cpu" \
  2>&1 | tee "$R/gpu_tests_cuda.txt"
# 2. all-pairs CKA: 10 x 10 models, n = 50,000, dims 384..4,096 (and n = 10,000 with the ckatorch peer)
step $PY benchmarks/bench_cka.py --device cuda --models 10 --sizes 10000,50000 --min-dim 384 --max-dim 4096 \
  --precisions float64,float32,tf32 --peers ckatorch --peer-max-n 10000 --peer-budget 20
# 3. sigmoid loss, d = 1,024, B = 4,096 .. 131,072 against open_clip's SigLipLoss
step $PY benchmarks/bench_sigmoid_loss.py --device cuda --impls open_clip,ours_chunk,ours_chunk_fused \
  --sizes 4096,16384,32768,65536,131072 --repeats 5 --case-timeout 120
# 3b. InfoNCE: ours plain and tiled against open_clip's ClipLoss
step $PY benchmarks/bench_sigmoid_loss.py --device cuda --loss infonce --impls open_clip,ours_plain,ours_chunk \
  --sizes 8192,32768,65536 --repeats 5 --case-timeout 120
# 4. trainer: GLU heads at SAIL's shape (1,024-d both sides, width x8), bf16 autocast, against a plain loop
step $PY benchmarks/bench_trainer.py --device cuda --n 131072 --batch-size 32768 --steps 20 --tag sail_b32k
step $PY benchmarks/bench_trainer.py --device cuda --n 65536 --batch-size 4096 --steps 50 --tag b4k
# 5. encoding: ViT-B/16 and ViT-L/14 (random weights, real cost) against a bare timm loop
step $PY benchmarks/bench_encode.py --device cuda --model timm:vit_base_patch16_224 --n 4096 --batch-size 256 --repeats 3
step $PY benchmarks/bench_encode.py --device cuda --model timm:vit_large_patch14_clip_224 --n 2048 --batch-size 256 --repeats 3
exit $fail

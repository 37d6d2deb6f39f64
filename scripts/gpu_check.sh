#!/usr/bin/env bash
# On the GPU machine: build with CUDA, run the test suite (CUDA tests included,
# SmolLM2 model tests excluded), the benchmark and the layers-back-to-back
# benchmark (bench_chain.py). Logs go to $OUT (or ./out).
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
  || { tail -50 "$OUT/build.log"; exit 1; }
python3 -c "import torch, mpq_ops; assert torch._C._dispatch_has_kernel_for_dispatch_key('mpq::matmul', 'CUDA'); print('CUDA kernels registered')"
python3 -m pytest -q --maxfail=20 --durations=15 -m "not model" -p no:cacheprovider ${PYTEST_ARGS:-tests} 2>&1 | tee "$OUT/tests.log" | tail -15
python3 scripts/bench.py --out "$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -40
python3 scripts/bench_chain.py --out "$OUT/chain.json" ${CHAIN_ARGS:-} 2>&1 | tee "$OUT/chain.log" | tail -10

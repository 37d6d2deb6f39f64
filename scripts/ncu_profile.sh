#!/usr/bin/env bash
# Nsight Compute on the main kernel of mpq::matmul for each cell given (the
# last of run_cell.py's calls; clocks left alone): the full set of sections
# as text, and, per SASS instruction, where the warps stalled
# (ncu_source_summary.py). Writes two files per cell under $OUT (or ./out),
#   <cell>.details.txt, <cell>.stalls.txt,
# and keeps the report, the exported SASS and ncu's log under $NCU_WORK (or
# /tmp/ncu), where `ncu --import <cell>.ncu-rep` reads them again; so that a
# run's results stay a few small files (the device tool returns at most 8).
#
#   bash scripts/ncu_profile.sh fp16,4,128,8192,28672,16 fp16,4,128,8192,28672,1
#
# DENSE=1 profiles cuBLAS's F.linear on the same cells instead (run_cell.py
# --dense; the files named <cell>_dense), the anchor to read the kernel against.
set -uo pipefail
OUT=${OUT:-out}
WORK=${NCU_WORK:-/tmp/ncu}
mkdir -p "$OUT" "$WORK"
HERE=$(dirname "$0")
CALLS=4
# (cuBLAS's kernels: nvjet_*, sm90_xmma_gemm_*, cutlass*; ours: gemm_*, gemv_*)
KERNELS="gemm_|gemv_"
CELL_ARGS=()
SUFFIX=""
if [ "${DENSE:-0}" = 1 ]; then
  KERNELS="nvjet|gemm|cutlass"
  CELL_ARGS=(--dense)
  SUFFIX="_dense"
fi
for cell in "$@"; do
  name=${cell//,/_}$SUFFIX
  ncu --clock-control none --kernel-name regex:"$KERNELS" --launch-skip $((CALLS - 1)) \
    --launch-count 1 --set full --import-source yes -f -o "$WORK/$name" \
    python3 "$HERE/run_cell.py" "$cell" --calls $CALLS "${CELL_ARGS[@]}" \
    > "$WORK/$name.ncu.log" 2>&1 \
    || { echo "== $cell: ncu failed"; tail -20 "$WORK/$name.ncu.log"; continue; }
  ncu --import "$WORK/$name.ncu-rep" --page details > "$OUT/$name.details.txt" 2>&1
  ncu --import "$WORK/$name.ncu-rep" --page source --csv --print-source sass \
    > "$WORK/$name.sass.csv" 2>&1
  python3 "$HERE/ncu_source_summary.py" "$WORK/$name.sass.csv" > "$OUT/$name.stalls.txt" 2>&1
  echo "== $cell"
  grep -E "Duration|SM Frequency|Compute \(SM\) Throughput|DRAM Throughput" \
    "$OUT/$name.details.txt" | head -8
  grep -E "Memory Throughput|Issue Slots Busy|Eligible Warps" "$OUT/$name.details.txt" | head -8
  head -40 "$OUT/$name.stalls.txt"
done

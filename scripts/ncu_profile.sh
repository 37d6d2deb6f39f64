#!/usr/bin/env bash
# Nsight Compute on the main kernel of mpq::matmul for each cell given (the
# last of run_cell.py's calls; clocks left alone): the full set of sections
# as text, and, per SASS instruction, where the warps stalled
# (ncu_source_summary.py). Writes under $OUT (or ./out):
#   <cell>.ncu-rep, <cell>.details.txt, <cell>.sass.csv, <cell>.stalls.txt
#
#   bash scripts/ncu_profile.sh fp16,4,128,8192,28672,16 fp16,4,128,8192,28672,1
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
HERE=$(dirname "$0")
CALLS=4
for cell in "$@"; do
  name=${cell//,/_}
  ncu --clock-control none --kernel-name regex:"gemm_|gemv_" --launch-skip $((CALLS - 1)) \
    --launch-count 1 --set full --import-source yes -f -o "$OUT/$name" \
    python3 "$HERE/run_cell.py" "$cell" --calls $CALLS > "$OUT/$name.ncu.log" 2>&1 \
    || { tail -20 "$OUT/$name.ncu.log"; continue; }
  ncu --import "$OUT/$name.ncu-rep" --page details > "$OUT/$name.details.txt" 2>&1
  ncu --import "$OUT/$name.ncu-rep" --page source --csv --print-source sass \
    > "$OUT/$name.sass.csv" 2>&1
  python3 "$HERE/ncu_source_summary.py" "$OUT/$name.sass.csv" > "$OUT/$name.stalls.txt" 2>&1
  echo "== $cell"
  grep -E "Duration|DRAM Throughput|Memory Throughput|Issue Slots Busy|Eligible Warps" \
    "$OUT/$name.details.txt" | head -12
  head -40 "$OUT/$name.stalls.txt"
done

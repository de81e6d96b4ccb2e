#!/usr/bin/env bash
# The steps every built-in model recipe ends with: the DyCE search and the two learned policies on
# the calibration split, then the report on the test split (evaluate, bench).
#   tests/benchmarks/policies_and_report.sh BUNDLE CIFAR10_ZIP_OR_FOLDER OUT_DIR
set -euo pipefail
B=${1:?usage: policies_and_report.sh BUNDLE DATA OUT_DIR}
DATA=${2:?usage: policies_and_report.sh BUNDLE DATA OUT_DIR}
OUT=${3:?usage: policies_and_report.sh BUNDLE DATA OUT_DIR}
offramp search "$B" --data "$DATA"
offramp train-policy "$B" --data "$DATA" --kind bolukbasi
offramp train-policy "$B" --data "$DATA" --kind structure
offramp evaluate "$B" --data "$DATA" --json "$OUT/evaluation.json"
offramp bench "$B" --data "$DATA" --timing-images 500 --json "$OUT/bench.json" --png "$OUT/bench.png"

#!/usr/bin/env bash
# Build the built-in model (resources/default.offramp) from scratch and benchmark it, as the README says.
#   tests/benchmarks/default_model.sh CIFAR10_ZIP_OR_FOLDER [ARCH] [EPOCHS] [OUT_DIR]
# Train on the CIFAR-10 train split (10 % held out for calibration, threshold search and policy
# training), then report on the test split, which nothing above has seen.
set -euo pipefail
DATA=${1:?usage: default_model.sh CIFAR10_ZIP_OR_FOLDER [ARCH] [EPOCHS] [OUT_DIR]}
ARCH=${2:-cifar_resnet20}
EPOCHS=${3:-30}
OUT=${4:-runs/default-$ARCH}
mkdir -p "$OUT"
export OMP_WAIT_POLICY=PASSIVE
B="$OUT/default.offramp"
offramp train-backbone --arch "$ARCH" --data "$DATA" --epochs "$EPOCHS" --checkpoint "$OUT/ckpt.pt" --out "$B"
"$(dirname "$0")/policies_and_report.sh" "$B" "$DATA" "$OUT"
echo "built $B; copy it to resources/default.offramp to ship it"

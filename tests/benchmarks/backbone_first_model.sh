#!/usr/bin/env bash
# The backbone-first alternative to the built-in model, as the README measures it (not the shipped recipe).
#   tests/benchmarks/backbone_first_model.sh CIFAR10_ZIP_OR_FOLDER [ARCH] [EPOCHS] [OUT_DIR]
# The recipe: the backbone alone (only the last exit's loss), then DyCE-style conv exits distilled
# from the last exit on the train split's images (their labels unused; the last exit is kept),
# then the DyCE search and the learned policies on the held-out 10 % of the train split (labels),
# then the report on the test split, which nothing above has seen.
set -euo pipefail
DATA=${1:?usage: backbone_first_model.sh CIFAR10_ZIP_OR_FOLDER [ARCH] [EPOCHS] [OUT_DIR]}
ARCH=${2:-cifar_resnet20}
EPOCHS=${3:-35}
OUT=${4:-runs/backbone-first-$ARCH}
EXIT_EPOCHS=${EXIT_EPOCHS:-10}
mkdir -p "$OUT"
export OMP_WAIT_POLICY=PASSIVE
PY="$(dirname "$(command -v offramp)")/python"
STAGES=$("$PY" -c "from engine.backbones import build_backbone; print(build_backbone('$ARCH').num_stages)")
ONLY_LAST=$("$PY" -c "print(','.join(['0'] * ($STAGES - 1) + ['1']))")
BACKBONE="$OUT/backbone.offramp"
B="$OUT/default.offramp"
offramp train-backbone --arch "$ARCH" --data "$DATA" --epochs "$EPOCHS" --exit-weights "$ONLY_LAST" \
  --checkpoint "$OUT/ckpt.pt" --out "$BACKBONE"
offramp train-exits --from "$BACKBONE" --unlabelled "$DATA" --head conv --epochs "$EXIT_EPOCHS" --out "$B"
"$(dirname "$0")/policies_and_report.sh" "$B" "$DATA" "$OUT"
echo "built $B"

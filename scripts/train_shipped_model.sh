#!/usr/bin/env bash
# Rebuild models/osteoscreen-v0.1.pt from synthetic phantoms, with its model card and plots.
# Training seeds 1001/1002; the independent hold-out uses seeds 9001/9002, never used in training.
set -euo pipefail
cd "$(dirname "$0")/.."
OS=.venv/bin/osteoscreen
B=build/shipped
HIP=${HIP:-700} LUMBAR=${LUMBAR:-350} EPOCHS=${EPOCHS:-20}
rm -rf "$B"
$OS synth --kind hip    --count "$HIP"    --seed 1001 --out "$B/train/hip"
$OS synth --kind lumbar --count "$LUMBAR" --seed 1002 --out "$B/train/lumbar"
$OS synth --kind hip    --count 150 --seed 9001 --out "$B/holdout/hip"
$OS synth --kind lumbar --count 75  --seed 9002 --out "$B/holdout/lumbar"
$OS train --manifest "$B/train/hip/manifest.csv" --manifest "$B/train/lumbar/manifest.csv" \
          --holdout "$B/holdout/hip/manifest.csv" --holdout "$B/holdout/lumbar/manifest.csv" \
          --epochs "$EPOCHS" --seed 0 --version 0.1.0 --out "$B/model"
cp "$B/model/model.pt" models/osteoscreen-v0.1.pt
sed -e 's|are in `plots/` beside the training output.|are in `models/osteoscreen-v0.1-plots/`.|' "$B/model/model_card.md" > models/osteoscreen-v0.1.md
printf '\nReproduce: `make model` (scripts/train_shipped_model.sh: HIP=%s LUMBAR=%s EPOCHS=%s; about 15 minutes on 2 CPU cores).\n' "$HIP" "$LUMBAR" "$EPOCHS" >> models/osteoscreen-v0.1.md
rm -rf models/osteoscreen-v0.1-plots && cp -r "$B/model/plots" models/osteoscreen-v0.1-plots
echo "wrote models/osteoscreen-v0.1.pt and models/osteoscreen-v0.1.md"

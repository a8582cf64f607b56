#!/usr/bin/env bash
# Rebuild the shipped checkpoint models/osteoscreen-v0.2.pt from synthetic phantoms, with its model
# card and plots. Everything is seeded: the same command gives the same data and the same figures
# (up to floating-point differences between machines).
#   training:                seeds 1001 (pelvis) / 1002 (lumbar), scanner profiles synthA-C, 10 % of
#                            sites with metal (they train the implant head), 20 % foreign bodies
#   hold-out:                seeds 9001 / 9002, never used in training, same profiles
#   held-out scanner profile: seeds 9101 / 9102, profile synthD, never seen in training
set -euo pipefail
cd "$(dirname "$0")/.."
OS=.venv/bin/osteoscreen
B=${BUILD:-build/shipped}
VERSION=${VERSION:-0.2.0}
NAME=osteoscreen-v${VERSION%.*}
HIP=${HIP:-1000} LUMBAR=${LUMBAR:-500} EPOCHS=${EPOCHS:-30} HELD_HIP=${HELD_HIP:-150} HELD_LUMBAR=${HELD_LUMBAR:-75}
rm -rf "$B"
$OS synth --kind hip    --count "$HIP"    --seed 1001 --out "$B/train/hip"    --implant-rate 0.1 --foreign-body-rate 0.2
$OS synth --kind lumbar --count "$LUMBAR" --seed 1002 --out "$B/train/lumbar" --implant-rate 0.1 --foreign-body-rate 0.2
$OS synth --kind hip    --count "$HELD_HIP"    --seed 9001 --out "$B/holdout/hip"    --foreign-body-rate 0.2
$OS synth --kind lumbar --count "$HELD_LUMBAR" --seed 9002 --out "$B/holdout/lumbar" --foreign-body-rate 0.2
$OS synth --kind hip    --count "$HELD_HIP"    --seed 9101 --out "$B/profile/hip"    --profile synthD --foreign-body-rate 0.2
$OS synth --kind lumbar --count "$HELD_LUMBAR" --seed 9102 --out "$B/profile/lumbar" --profile synthD --foreign-body-rate 0.2
$OS train --manifest "$B/train/hip/manifest.csv" --manifest "$B/train/lumbar/manifest.csv" \
          --holdout "$B/holdout/hip/manifest.csv" --holdout "$B/holdout/lumbar/manifest.csv" \
          --holdout "holdout_profile=$B/profile/hip/manifest.csv" --holdout "holdout_profile=$B/profile/lumbar/manifest.csv" \
          --epochs "$EPOCHS" --seed 0 --version "$VERSION" --out "$B/model"
cp "$B/model/model.pt" "models/$NAME.pt"
sed -e "s|are in \`plots/\` beside the training output.|are in \`models/$NAME-plots/\`.|" "$B/model/model_card.md" > "models/$NAME.md"
printf '\nReproduce: `make model` (scripts/train_shipped_model.sh: HIP=%s LUMBAR=%s EPOCHS=%s).\n' "$HIP" "$LUMBAR" "$EPOCHS" >> "models/$NAME.md"
rm -rf "models/$NAME-plots" && cp -r "$B/model/plots" "models/$NAME-plots"
cp "$B/model/metrics.json" "models/$NAME-metrics.json"
echo "wrote models/$NAME.pt and models/$NAME.md"

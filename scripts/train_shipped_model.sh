#!/usr/bin/env bash
# Rebuild the shipped checkpoint models/osteoscreen-v0.3.pt from synthetic phantoms, with its model
# card and plots. Everything is seeded: the same command gives the same data and the same figures
# (up to floating-point differences between machines).
#   training:                pelvis seeds 1001 (800 studies) + 1003 (1200), lumbar seeds 1002 (400) +
#                            1004 (600), scanner profiles synthA-C, 10 % of sites with metal (they
#                            train the implant head), 20 % foreign bodies; whole-bone masks, with
#                            which Grad-CAM guidance keeps the model's evidence on bone
#   hold-out:                seeds 9001 / 9002, never used in training, same profiles
#   held-out scanner profile: seeds 9101 / 9102, profile synthD, never seen in training
set -euo pipefail
cd "$(dirname "$0")/.."
OS=.venv/bin/osteoscreen
B=${BUILD:-build/shipped}
VERSION=${VERSION:-0.3.0}
NAME=osteoscreen-v${VERSION%.*}
HIP=${HIP:-800} HIP2=${HIP2:-1200} LUMBAR=${LUMBAR:-400} LUMBAR2=${LUMBAR2:-600} EPOCHS=${EPOCHS:-40}
T_WEIGHT=${T_WEIGHT:-3} CAM_GUIDANCE=${CAM_GUIDANCE:-1} CAM_WARMUP=${CAM_WARMUP:-0.25} HELD_HIP=${HELD_HIP:-150} HELD_LUMBAR=${HELD_LUMBAR:-75}
rm -rf "$B"
# two generators at a time (one per core); `wait PID` passes a failure on to set -e
synth() { $OS synth --quiet "$@" > /dev/null; }
synth --kind hip    --count "$HIP"    --seed 1001 --out "$B/train/hip"    --bone-masks --implant-rate 0.1 --foreign-body-rate 0.2 & a=$!
synth --kind lumbar --count "$LUMBAR" --seed 1002 --out "$B/train/lumbar" --bone-masks --implant-rate 0.1 --foreign-body-rate 0.2 & b=$!
wait $a; wait $b
synth --kind hip    --count "$HIP2"    --seed 1003 --out "$B/train/hip2"    --bone-masks --implant-rate 0.1 --foreign-body-rate 0.2 & a=$!
synth --kind lumbar --count "$LUMBAR2" --seed 1004 --out "$B/train/lumbar2" --bone-masks --implant-rate 0.1 --foreign-body-rate 0.2 & b=$!
wait $a; wait $b
synth --kind hip    --count "$HELD_HIP"    --seed 9001 --out "$B/holdout/hip"    --foreign-body-rate 0.2 & a=$!
synth --kind lumbar --count "$HELD_LUMBAR" --seed 9002 --out "$B/holdout/lumbar" --foreign-body-rate 0.2 & b=$!
wait $a; wait $b
synth --kind hip    --count "$HELD_HIP"    --seed 9101 --out "$B/profile/hip"    --profile synthD --foreign-body-rate 0.2 & a=$!
synth --kind lumbar --count "$HELD_LUMBAR" --seed 9102 --out "$B/profile/lumbar" --profile synthD --foreign-body-rate 0.2 & b=$!
wait $a; wait $b
$OS train --manifest "$B/train/hip/manifest.csv" --manifest "$B/train/lumbar/manifest.csv" \
          --manifest "$B/train/hip2/manifest.csv" --manifest "$B/train/lumbar2/manifest.csv" \
          --holdout "$B/holdout/hip/manifest.csv" --holdout "$B/holdout/lumbar/manifest.csv" \
          --holdout "holdout_profile=$B/profile/hip/manifest.csv" --holdout "holdout_profile=$B/profile/lumbar/manifest.csv" \
          --epochs "$EPOCHS" --t-loss-weight "$T_WEIGHT" --cam-guidance "$CAM_GUIDANCE" --cam-guidance-warmup "$CAM_WARMUP" --seed 0 --version "$VERSION" --out "$B/model"
# the node's view: the whole pipeline (gates, fusion) over the hold-outs, one row per study site
for SET in holdout profile; do
  $OS score --manifest "$B/$SET/hip/manifest.csv" --manifest "$B/$SET/lumbar/manifest.csv" \
            --model "$B/model/model.pt" --out "$B/model/node_$SET.csv" --quiet > "$B/model/node_$SET.json"
  $OS evaluate "$B/model/node_$SET.csv" --json > "$B/model/node_${SET}_report.json"
done
cp "$B/model/model.pt" "models/$NAME.pt"
sed -e "s|are in \`plots/\` beside the training output.|are in \`models/$NAME-plots/\`.|" "$B/model/model_card.md" > "models/$NAME.md"
{
  printf '\n## The node'"'"'s view: the whole pipeline over the hold-outs\n'
  printf 'One row per study site through every gate and the AP + lateral fusion (`osteoscreen score`, then `osteoscreen evaluate`);\n'
  printf 'sites the node refuses are counted with their reason, not scored.\n\n### Hold-out (training scanner profiles)\n```\n'
  $OS evaluate "$B/model/node_holdout.csv"
  printf '```\n\n### Held-out scanner profile (synthD)\n```\n'
  $OS evaluate "$B/model/node_profile.csv"
  printf '```\n'
} >> "models/$NAME.md"
printf '\nReproduce: `make model` (scripts/train_shipped_model.sh: HIP=%s+%s LUMBAR=%s+%s EPOCHS=%s T_WEIGHT=%s CAM_GUIDANCE=%s CAM_WARMUP=%s).\n' "$HIP" "$HIP2" "$LUMBAR" "$LUMBAR2" "$EPOCHS" "$T_WEIGHT" "$CAM_GUIDANCE" "$CAM_WARMUP" >> "models/$NAME.md"
rm -rf "models/$NAME-plots" && cp -r "$B/model/plots" "models/$NAME-plots"
cp "$B/model/metrics.json" "models/$NAME-metrics.json"
cp "$B/model/node_holdout_report.json" "models/$NAME-node-holdout.json"
cp "$B/model/node_profile_report.json" "models/$NAME-node-profile.json"
.venv/bin/python -m osteoscreen.training.cam_check --model "models/$NAME.pt" --studies 20 --quiet --json > "models/$NAME-gradcam.json"
{
  printf '\n## Where Grad-CAM looks (phantom bone masks; full report in `models/%s-gradcam.json`)\n```\n' "$NAME"
  .venv/bin/python -m osteoscreen.training.cam_check --model "models/$NAME.pt" --studies 20 --quiet
  printf '```\n'
} >> "models/$NAME.md"
echo "wrote models/$NAME.pt and models/$NAME.md"

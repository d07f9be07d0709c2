#!/usr/bin/env bash
# Put the CIFAR-10 data of benchmarks/gpu_check.sh's `run` steps into .data/cifar10/ (git-ignored), small enough
# to travel to the device machine with `carry: [".wheels", ".data"]` (64 MiB per call, working tree included):
# ONE training part (~47 MB, a third of the training set) copied as it is, and the first N test images (500)
# written as test_500.npz (keys x, y as in the source). The data loader reads the folder's train*.npz /
# test*.npz (data/cifar10.py). Both files are written atomically (atomic_io).
#
#   bash scripts/prepare_device_data.sh [--train PART.npz] [--test TEST.npz] [--dest DIR] [--num_test N]
#
# Defaults: --train /work/shared/data/cifar10/train_0.npz, --test test.npz beside it, --dest .data/cifar10,
# --num_test 500. Prints the sizes and the total that would travel (tree + .wheels + .data); exits 2 with one
# line when that total is over 64 MiB or an input is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
TRAIN=/work/shared/data/cifar10/train_0.npz
TEST=""
DEST=.data/cifar10
NUM_TEST=500
while [ $# -gt 0 ]; do
    case "$1" in
        --train) TRAIN="${2:-}"; shift ;;
        --test) TEST="${2:-}"; shift ;;
        --dest) DEST="${2:-}"; shift ;;
        --num_test) NUM_TEST="${2:-}"; shift ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "prepare_device_data: unknown argument '$1' (use --train PART.npz, --test TEST.npz, --dest DIR, --num_test N)" >&2; exit 2 ;;
    esac
    shift
done
[ -n "$TEST" ] || TEST="$(dirname "$TRAIN")/test.npz"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
"$PYTHON" - "$TRAIN" "$TEST" "$DEST" "$NUM_TEST" <<'PY'
import os
import shutil
import sys

import numpy as np

sys.path.insert(0, os.getcwd())
from atomic_io import atomic_write, save_npz  # noqa: E402
from errors import UserError  # noqa: E402

train, test, dest, num_test = sys.argv[1:5]
try:
    if not num_test.isdigit() or int(num_test) < 1:
        raise UserError(f"--num_test needs a positive whole number, got {num_test!r}")
    for path, what in ((train, "--train"), (test, "--test")):
        if not os.path.isfile(path) or not path.endswith(".npz"):
            raise UserError(f"{what} {path!r} is not an npz file (CIFAR-10 part with keys x, y)")
    name = os.path.basename(train)
    if not name.startswith("train"):
        name = "train_" + name  # the loader takes a folder's train*.npz
    with np.load(test, allow_pickle=False) as archive:
        if "x" not in archive or "y" not in archive:
            raise UserError(f"--test {test!r} has keys {sorted(archive.keys())}; expected x and y")
        x, y = archive["x"][: int(num_test)], archive["y"][: int(num_test)]
    with open(train, "rb") as source:
        atomic_write(os.path.join(dest, name), lambda handle: shutil.copyfileobj(source, handle, 1 << 20))
    save_npz(os.path.join(dest, f"test_{len(x)}.npz"), x=x, y=y)
    # the staging folder holds one part of each: the loader reads every train*.npz / test*.npz in it, so parts of
    # an earlier call (another --train or --num_test) would be read twice (and travel)
    keep = {name, f"test_{len(x)}.npz"}
    for old in sorted(os.listdir(dest)):
        if old.endswith(".npz") and old.startswith(("train", "test")) and old not in keep:
            os.remove(os.path.join(dest, old))
            print(f"prepare_device_data: removed {os.path.join(dest, old)} (an earlier call's part)")
    print(f"prepare_device_data: {os.path.join(dest, name)} (copy of {train}); "
          f"{os.path.join(dest, f'test_{len(x)}.npz')}: x {x.shape} {x.dtype}, y {y.shape} {y.dtype}")
except UserError as error:
    print(f"prepare_device_data: {error}", file=sys.stderr)
    sys.exit(2)
PY
# what the device tool sends: tracked and untracked-not-ignored files, plus the carried .wheels and .data
TREE=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -n 1 | cut -f1)
WHEELS=$( [ -d .wheels ] && du -sb .wheels | cut -f1 || echo 0)
DATA=$(du -sb "$DEST" | cut -f1)
TOTAL=$(( TREE + WHEELS + DATA ))
LIMIT=$(( 64 * 1024 * 1024 ))
awk -v t="$TREE" -v w="$WHEELS" -v d="$DATA" -v s="$TOTAL" 'BEGIN { m = 1048576; printf "prepare_device_data: tree %.1f MiB + .wheels %.1f MiB + data %.1f MiB = %.1f MiB (limit 64 MiB per call)\n", t / m, w / m, d / m, s / m }'
if [ "$TOTAL" -gt "$LIMIT" ]; then
    echo "prepare_device_data: $TOTAL bytes would travel, over the device tool's 64 MiB; remove other files from $DEST" >&2
    exit 2
fi

#!/usr/bin/env bash
# Prepare, HERE (a machine with PyPI), what benchmarks/gpu_check.sh needs on the GPU machine:
#
#   .whl/       cp312 manylinux wheels of cg3d's dependencies that the GPU machine lacks
#               (shared/docs/gpu_device.md), pinned to the versions cg3d is tested with here
#   .gpu_data/  a few real skull-stripped 1 mm T1w volumes + brain masks and their manifest.tsv
#               rows (the 180-volume cohort is built from them on the GPU machine)
#
# Both folders are git-ignored; the GPU run carries them (run's `carry`). Everything that travels
# (tracked + untracked-not-ignored files + carried folders) must stay under 64 MiB: this script
# prints the total and fails above 60 MiB.
#
#   bash benchmarks/gpu_prepare.sh            # from the repository root (or anywhere inside it)
#   DATA=/path/to/shared/data bash benchmarks/gpu_prepare.sh
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DATA=${DATA:-$ROOT/../shared/data}
WHL=$ROOT/.whl
GPU_DATA=$ROOT/.gpu_data
LIMIT_MIB=60
cd "$ROOT"

# Missing on the GPU machine (gpu_device.md), at the versions installed and tested here (numpy 2.x).
# Deviations from gpu_device.md's list, checked against each wheel's Requires-Dist:
#  * + frozendict: pybids 0.22 imports it (bids.utils) and the GPU image lacks it;
#  * - formulaic<0.6 and astor (its dependency): pybids 0.22 needs formulaic>=0.3 only, imports it
#    only in bids.modeling (cg3d never does), and the GPU image already has formulaic.
WHEELS=(
  nibabel==5.4.2
  pybids==0.22.0 bids-validator==1.14.7.post0 bidsschematools==2.0.1 num2words==0.5.14
  universal-pathlib==0.3.10 pathlib-abc==0.5.2 sqlalchemy==2.1.9 frozendict==2.5.1
  nipype==1.11.0 prov==3.2.3 rdflib==7.6.0 pydot==4.0.1 traits==7.3.0 acres==0.5.0
  etelemetry==0.3.1 ci-info==0.4.0 looseversion==1.3.0 puremagic==1.30
  igraph==1.0.0 texttable==1.7.2
  tomli-w==1.2.0
  isal==1.7.2
)

# Real 1 mm skull-stripped T1w volumes (manifest paths) with a brain mask on their grid.
SOURCES=(
  brainles_tcga_lgg/TCGA-DU-7294/T1w.nii.gz
  brainles_tcga_lgg/TCGA-FG-6692/T1w.nii.gz
  brats2023_examples/BraTS-GLI-00001-000/T1w.nii.gz
  brats2023_examples/BraTS-MET-00110-000/T1w.nii.gz
  healthy_templates/Colin27_ch2_T1w.nii.gz
  healthy_templates/MNI152_2009a_sym_1mm_T1w.nii.gz
)

say() { echo "[gpu_prepare $(date +%T)] $*"; }
mib() { du -sb "$@" 2>/dev/null | awk '{s += $1} END {printf "%.1f", s / 1048576}'; }

download_wheels() {
  say "downloading ${#WHEELS[@]} cp312 manylinux wheels into .whl/"
  rm -rf "$WHL" && mkdir -p "$WHL"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHL" "${WHEELS[@]}"
  local count
  count=$(find "$WHL" -type f -name '*.whl' | wc -l)
  if [[ $count -ne ${#WHEELS[@]} ]]; then
    echo "expected ${#WHEELS[@]} wheels, got $count" >&2
    exit 1
  fi
  # the same install command as on the GPU machine, for Python 3.12 (a clash or a bad wheel fails here)
  local target
  target=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$target" --python-version 3.12 \
    --implementation cp --only-binary=:all: --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 "$WHL"/*.whl
  rm -rf "$target"
}

copy_data() {
  say "copying ${#SOURCES[@]} real volumes and their brain masks from $DATA into .gpu_data/"
  rm -rf "$GPU_DATA" && mkdir -p "$GPU_DATA"
  python3 - "$DATA" "$GPU_DATA" "${SOURCES[@]}" <<'EOF'
import csv, shutil, sys
from pathlib import Path

data, dest, wanted = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
with open(data / "manifest.tsv", newline="") as fh:
    reader = csv.DictReader(fh, delimiter="\t")
    fields, rows = reader.fieldnames, list(reader)
by_path = {r["path"]: r for r in rows}
keep = []
for path in wanted:
    image = by_path[path]  # KeyError: not in the manifest
    masks = [r for r in rows if r["role"] == "brainmask" and r["shape"] == image["shape"]
             and Path(r["path"]).parent == Path(path).parent]
    if image["role"] != "image_skullstripped" or image["voxel_mm"] != "1x1x1" or len(masks) != 1:
        sys.exit(f"{path}: not a skull-stripped 1 mm image with one brain mask on its grid")
    keep += [image, masks[0]]
for row in keep:
    (dest / row["path"]).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(data / row["path"], dest / row["path"])
with open(dest / "manifest.tsv", "w", newline="") as fh:
    writer = csv.DictWriter(fh, fieldnames=fields, delimiter="\t", lineterminator="\n")
    writer.writeheader()
    writer.writerows(keep)
EOF
}

report_sizes() {
  local tree_files tree whl data total
  tree_files=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
  tree=$(awk -v b="${tree_files:-0}" 'BEGIN {printf "%.1f", b / 1048576}')
  whl=$(mib "$WHL")
  data=$(mib "$GPU_DATA")
  total=$(awk -v a="$tree" -v b="$whl" -v c="$data" 'BEGIN {printf "%.1f", a + b + c}')
  echo
  echo "| what that travels | MiB |"
  echo "|---|---:|"
  echo "| working tree (tracked + untracked-not-ignored) | $tree |"
  echo "| .whl ($(find "$WHL" -type f -name '*.whl' | wc -l) wheels) | $whl |"
  echo "| .gpu_data ($(find "$GPU_DATA" -name '*.nii.gz' | wc -l) NIfTI files) | $data |"
  echo "| total (limit 64) | $total |"
  echo
  echo "wheels:"
  find "$WHL" -type f -name '*.whl' -printf '%s %f\n' | sort -k2 | awk '{printf "  %8.2f MB  %s\n", $1 / 1e6, $2}'
  if awk -v t="$total" -v l="$LIMIT_MIB" 'BEGIN {exit !(t > l)}'; then
    echo "total ${total} MiB is over ${LIMIT_MIB} MiB: carry fewer volumes" >&2
    exit 1
  fi
}

if ! grep -qxF '/.whl/' .gitignore || ! grep -qxF '/.gpu_data/' .gitignore; then
  echo ".gitignore must ignore /.whl/ and /.gpu_data/" >&2
  exit 1
fi
download_wheels
copy_data
report_sizes
say "ready: run benchmarks/gpu_check.sh on the GPU machine with carry [\".whl\", \".gpu_data\"]"

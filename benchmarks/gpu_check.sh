#!/usr/bin/env bash
# One prepared GPU check of cg3d's end-to-end speed (shared/docs/gpu_device.md): on the GPU machine
# it installs the carried wheels, builds a 180-volume T1w cohort from the carried real volumes,
# creates random ViT-L/14 weights (the real architecture; speed does not depend on the values),
# samples nvidia-smi every 0.5 s, runs `cg3d group` through benchmarks/bench_e2e.py and prints:
# total wall, the per-stage table, GPU utilisation during tokenize, peak VRAM, each against the
# H200 target (PASS/FAIL):
#
#   total < 60 s | tokenize < 0.3 s per volume | GPU busy >= 80 % during tokenize | peak VRAM < 10 GB
#
# HOW TO RUN IT. The device tool sends the checkout the calling session started in (the lead's),
# so this branch must be merged there first. Then, from that checkout's root:
#   1. here, once:  bash benchmarks/gpu_prepare.sh   (fills the git-ignored .whl/ and .gpu_data/;
#                   ~48 MiB travel in all, under the 64 MiB limit; it prints the sizes)
#   2. the device tool's run call:
#        command:   bash benchmarks/gpu_check.sh
#        carry:     [".whl", ".gpu_data"]
#        timeout_s: 600
#   Expected duration: 1 to 2 min of setup (wheel install ~10 s, 180-volume cohort ~30-60 s on 16
#   processes, ViT-L/14 weights ~20 s), then the cg3d run, which is stopped at DEADLINE (530 s after
#   the script started) so that the tables and logs always come back: at most ~9.5 min, plus the
#   machine's start. Expected from the CPU figures of 2026-12-01 (bench_e2e, 1 mm, cube 224: prepare
#   ~1.1, outputs ~1.5, tokenize without the encoder ~0.4, reports ~0.05 core-s per volume) the CPU
#   stages of 180 volumes take ~25-35 s on 16 cores, so the run should finish well before the cap;
#   if it does not, the report gives the
#   tokenize rate, GPU use and peak VRAM from cg3d's progress lines.
#   $OUT gets (<= 8 files): gpu_check.log, report.md, nvidia-smi.csv, timings.tsv, cg3d.log,
#   cg3d-output.log.gz, machine.txt.
#
# Test on a CPU machine (6 volumes from .gpu_data, cube 56, test encoder, device cpu, no nvidia-smi;
# the machine's own packages instead of the cp312 wheels, whose install gpu_prepare.sh checks):
#   bash benchmarks/gpu_check.sh --cpu-smoke          (writes to $OUT, default /tmp/cg3d-gpu-check-out)
#
# Settings (environment): N (180), CUBE (224), ENCODER (dinov2_vitl14), NPROCS (16), SEED (0),
# DEADLINE (530 s), WORK (/tmp/cg3d-gpu-check), DATA (.gpu_data, else ../shared/data).
set -euo pipefail

MODE=gpu
case "${1:-}" in
  "") ;;
  --cpu-smoke) MODE=cpu-smoke ;;
  -h|--help) awk 'NR > 1 && /^#/ {print; next} NR > 1 {exit}' "$0"; exit 0 ;;
  *) echo "usage: $0 [--cpu-smoke]" >&2; exit 64 ;;
esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if [[ $MODE == gpu ]]; then
  N=${N:-180} CUBE=${CUBE:-224} ENCODER=${ENCODER:-dinov2_vitl14} DEVICE=cuda NPROCS=${NPROCS:-16}
else
  N=${N:-6} CUBE=${CUBE:-56} ENCODER=${ENCODER:-test-tiny-vit} DEVICE=cpu NPROCS=${NPROCS:-2}
fi
SEED=${SEED:-0}
DEADLINE=${DEADLINE:-530}
WORK=${WORK:-/tmp/cg3d-gpu-check}
SITE=/tmp/cg3d-site
if [[ -z ${DATA:-} ]]; then
  if [[ -f .gpu_data/manifest.tsv ]]; then DATA=$ROOT/.gpu_data; else DATA=$ROOT/../shared/data; fi
fi
OUT=${OUT:-/tmp/cg3d-gpu-check-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
TEE_PID=$!
export PYTHONUNBUFFERED=1 NIPYPE_NO_ET=1 HF_HUB_OFFLINE=1 MPLBACKEND=Agg
SMI_PID=""

step() { echo; echo "=== [gpu_check $(date +%T), ${SECONDS} s] $*"; }
stop_sampler() {
  if [[ -n $SMI_PID ]]; then kill "$SMI_PID" 2>/dev/null || true; wait "$SMI_PID" 2>/dev/null || true; SMI_PID=""; fi
}
# shellcheck disable=SC2317  # called by the EXIT trap
finish() {
  stop_sampler
  exec 1>&- 2>&-  # let tee write the end of gpu_check.log before the files are taken back
  wait "$TEE_PID" 2>/dev/null || true
}
trap finish EXIT

step "mode $MODE: N=$N cube=$CUBE encoder=$ENCODER device=$DEVICE nprocs=$NPROCS seed=$SEED data=$DATA"
{
  echo "date: $(date -Is)"; uname -a; python3 --version; echo "cpus: $(nproc)"; free -g | head -2
  if [[ $MODE == gpu ]]; then nvidia-smi; fi
} > "$OUT/machine.txt" 2>&1 || true
cat "$OUT/machine.txt"

step "install the carried wheels"
if [[ $MODE == gpu ]]; then
  ls .whl/*.whl > /dev/null || { echo "no .whl/*.whl: run benchmarks/gpu_prepare.sh and carry .whl" >&2; exit 66; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  export PYTHONPATH=$SITE:$ROOT
else
  echo "cpu-smoke: the machine's own packages are used (the wheels are cp312, for the GPU machine)"
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi
python3 - <<'EOF'
import importlib
for name in ("numpy", "torch", "timm", "nibabel", "bids", "nipype", "igraph", "tomli_w", "sqlalchemy"):
    module = importlib.import_module(name)
    print(f"  {name} {getattr(module, '__version__', '?')}  {module.__file__}")
import torch
import cg3d_bids.cli.run  # noqa: F401  (the whole command line imports)
print(f"  cuda available: {torch.cuda.is_available()}", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF

BENCH=(python3 benchmarks/bench_e2e.py --n "$N" --seed "$SEED" --data "$DATA" --out-dir "$WORK" --nprocs "$NPROCS")

step "build the $N-volume cohort from the carried real volumes"
rm -rf "$WORK"
"${BENCH[@]}" --build-only

WEIGHTS=()
if [[ $ENCODER != test-* ]]; then
  step "random weights of $ENCODER at $CUBE"
  "${BENCH[@]}" --encoder "$ENCODER" --cube "$CUBE" --make-weights "$WORK/weights/$ENCODER-$CUBE.safetensors"
  WEIGHTS=(--weights "$WORK/weights/$ENCODER-$CUBE.safetensors")
fi

SMI=()
if [[ $MODE == gpu ]]; then
  step "sampling nvidia-smi every 0.5 s -> nvidia-smi.csv"
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -lms 500 > "$OUT/nvidia-smi.csv" &
  SMI_PID=$!
  SMI=(--smi-log "$OUT/nvidia-smi.csv")
  sleep 1
fi

LEFT=$((DEADLINE - SECONDS))
if (( LEFT < 30 )); then echo "only ${LEFT} s left before the deadline: not running cg3d" >&2; exit 75; fi
step "cg3d group on $N volumes ($ENCODER, cube $CUBE, $DEVICE, nprocs $NPROCS), stopped after ${LEFT} s at most"
rc=0
"${BENCH[@]}" --reuse --keep --encoder "$ENCODER" --cube "$CUBE" --device "$DEVICE" "${WEIGHTS[@]}" \
  --timeout "$LEFT" --targets h200 --report "$OUT/report.md" "${SMI[@]}" || rc=$?
stop_sampler

step "collect the logs (cg3d exit $rc)"
shopt -s nullglob
for f in "$WORK"/run/out/logs/timings-*.tsv; do cp "$f" "$OUT/timings.tsv"; done
for f in "$WORK"/run/out/logs/cg3d-*.log "$WORK"/run/work/runs/cg3d-*.log; do cp "$f" "$OUT/cg3d.log"; done
if [[ -f $WORK/run/cg3d-output.log ]]; then gzip -c "$WORK/run/cg3d-output.log" > "$OUT/cg3d-output.log.gz"; fi
if [[ $rc -ne 0 ]]; then
  echo "--- last lines of cg3d's output:"; tail -n 40 "$WORK/run/cg3d-output.log" 2>/dev/null || true
fi
ls -l "$OUT"
step "done in ${SECONDS} s (cg3d exit $rc); report: $OUT/report.md"
exit "$rc"

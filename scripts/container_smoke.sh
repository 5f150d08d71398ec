#!/usr/bin/env bash
# container_smoke.sh [--engine podman|docker] [--base IMAGE] [options]
#
# Build the cg3d image without weights (BAKE_WEIGHTS=0) and run the bundled demo inside it the way
# HPC and BIDS-Apps CI run containers: read-only root file system, an arbitrary uid, no network:
#   ENGINE run --read-only --tmpfs /tmp --user 4242:4242 --network none -v OUT:/out IMAGE \
#       demo /out --device cpu --encoder test-tiny-vit
# then check the outputs (dataset_description.json, one group_T1w.tsv row and one probseg map per
# demo subject), the exit codes of two failing calls (64, 69), the Boutiques descriptor, and
# validate the outputs with the bids-validator-deno inside the image (--network none).
#
# Options
#   --engine podman|docker   container engine (default: podman if installed, else docker)
#   --base IMAGE             base image; default localhost/debian-python:12, made here with
#                            scripts/make_debian_base.sh (debootstrap) when missing (podman only).
#                            --base official: the Dockerfile's digest-pinned python:3.11-slim-bookworm
#   --tag TAG                image tag (default localhost/cg3d:smoke)
#   --uid N                  uid (and gid) to run as (default 4242; not in the image's passwd)
#   --store DIR              podman: isolated image store (default /var/tmp/cg3d-smoke/store;
#                            kept between runs as a build cache; --store default: podman's own store)
#   --torch-index URL        index for torch/torchvision (e.g. https://download.pytorch.org/whl/cpu
#                            for a ~1 GB CPU image); default: PyPI / the host's pip config (CUDA build)
#   --no-host-pip-config     do not pass the host's pip index/find-links/CA into the build
#   --no-build               reuse an existing --tag image
#   --no-validate            skip bids-validator-deno
#   --keep-output            keep the demo output folder (printed)
#   --clean                  delete the image (and the isolated store) at the end
# Exit status: 0 when every check passed; the failing step's message otherwise.
#
# Registry-less Debian 12 machines (no Docker Hub): apt-get install -y podman runc debootstrap;
# the base comes from debootstrap + podman import; pip inside the build reaches PyPI through the
# host network (--network host) and uses the host's pip configuration: file:// indexes and
# find-links folders are bind-mounted read-only into the build, and the host's CA bundle is given
# as the build secret "pip_cert" (needed behind TLS-intercepting proxies). Timings: docs/containers.md.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
ENGINE=""
BASE=""
TAG=localhost/cg3d:smoke
STORE=/var/tmp/cg3d-smoke/store
TORCH_INDEX=""
HOST_PIP=1
BUILD=1
VALIDATE=1
KEEP_OUTPUT=0
CLEAN=0
DEMO_SUBJECTS=${CG3D_DEMO_SUBJECTS:-7}
RUN_UID=4242

die() { echo "container_smoke: FAIL: $*" >&2; exit 1; }
log() { echo "container_smoke: $*" >&2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --engine) ENGINE=$2; shift 2 ;;
    --base) BASE=$2; shift 2 ;;
    --tag) TAG=$2; shift 2 ;;
    --uid) RUN_UID=$2; shift 2 ;;
    --store) STORE=$2; shift 2 ;;
    --torch-index) TORCH_INDEX=$2; shift 2 ;;
    --no-host-pip-config) HOST_PIP=0; shift ;;
    --no-build) BUILD=0; shift ;;
    --no-validate) VALIDATE=0; shift ;;
    --keep-output) KEEP_OUTPUT=1; shift ;;
    --clean) CLEAN=1; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

if [ -z "$ENGINE" ]; then
  if command -v podman >/dev/null 2>&1; then ENGINE=podman; else ENGINE=docker; fi
fi
command -v "$ENGINE" >/dev/null 2>&1 || die "$ENGINE not found (Debian: apt-get install -y podman runc)"
case "$ENGINE" in podman|docker) ;; *) die "--engine must be podman or docker" ;; esac

# Engine command lines. podman on a VM without CAP_SYS_RESOURCE and with hybrid cgroups needs runc
# and explicit ulimits (docs/containers.md); docker needs nothing special.
ENG=("$ENGINE")
RUN_OPTS=()
BUILD_OPTS=()
if [ "$ENGINE" = podman ]; then
  if [ "$STORE" != default ]; then
    mkdir -p "$STORE"
    ENG+=(--root "$STORE/root" --runroot "$STORE/run" --storage-driver overlay)
  fi
  if command -v runc >/dev/null 2>&1; then ENG+=(--runtime runc); fi
  RUN_OPTS+=(--ulimit nofile=1024:1024 --ulimit nproc=4096:4096 --pull never)
  # The build's RUN steps use the host network (the default CNI/netavark network needs iptables
  # set-up that a CI VM may lack); pip is the only thing that goes out.
  BUILD_OPTS+=(--network host)
  # docker format: OCI images would drop SHELL (bash -o pipefail) and other Docker-only fields.
  BUILD_OPTS+=(--isolation chroot --format docker)
fi

# ---------------------------------------------------------------------------------------------
# Base image
if [ -z "$BASE" ]; then BASE=localhost/debian-python:12; fi
BASE_ARG=()
if [ "$BASE" = official ]; then
  log "base: the Dockerfile's default (needs registry access)"
else
  BASE_ARG=(--build-arg "BASE_IMAGE=$BASE")
  if [ "$BUILD" = 1 ] && ! "${ENG[@]}" image exists "$BASE" 2>/dev/null \
       && ! "${ENG[@]}" image inspect "$BASE" >/dev/null 2>&1; then
    if [ "$ENGINE" = podman ] && [ "$BASE" = localhost/debian-python:12 ]; then
      log "making the local base $BASE (debootstrap; about 1 to 2 minutes)"
      t0=$(date +%s)
      "$REPO/scripts/make_debian_base.sh" --tag "$BASE" "${ENG[@]:1}" || die "could not make the base image"
      log "base made in $(( $(date +%s) - t0 )) s"
    else
      log "base $BASE is not available locally; the engine will try to pull it"
    fi
  fi
fi

# ---------------------------------------------------------------------------------------------
# The host's pip configuration (local mirrors, wheel folders, CA bundle) for the build.
PIP_ARGS=()
SECRET_ARGS=()
if [ "$HOST_PIP" = 1 ] && command -v python3 >/dev/null 2>&1; then
  pipconf=$(python3 -m pip config list 2>/dev/null || true)
  pip_conf_get() {  # last value of a key in any section, quotes stripped
    printf '%s\n' "$pipconf" | sed -n "s/^[^.]*\.$1='\(.*\)'$/\1/p" | tail -n 1
  }
  index_url=${PIP_INDEX_URL:-$(pip_conf_get index-url)}
  extra_urls=${PIP_EXTRA_INDEX_URL:-$(pip_conf_get extra-index-url)}
  find_links=${PIP_FIND_LINKS:-$(pip_conf_get find-links)}
  cert=${PIP_CERT:-$(pip_conf_get cert)}
  declare -A mounted=()
  # file:// and plain-path locations are bind-mounted (podman); URLs are passed through as they are.
  host_locations() {  # NAME VALUE: keep usable locations; bind-mount local folders (podman only)
    local name=$1 item dir top kept=()
    for item in $2; do
      case "$item" in
        file://*|/*)
          dir=${item#file://}; top=${dir%/simple}; top=${top%/}
          if [ -d "$dir" ] || [ -d "$top" ]; then
            if [ "$ENGINE" = podman ]; then
              if [ -z "${mounted[$top]:-}" ]; then BUILD_OPTS+=(--volume "$top:$top:ro"); mounted[$top]=1; fi
              kept+=("$item")
            else
              log "warning: $ENGINE cannot bind-mount $item into the build; left out (PyPI is used)"
            fi
          fi ;;
        *) kept+=("$item") ;;
      esac
    done
    if [ "${#kept[@]}" -gt 0 ]; then PIP_ARGS+=(--build-arg "$name=${kept[*]}"); fi
  }
  host_locations PIP_INDEX_URL "$index_url"
  host_locations PIP_EXTRA_INDEX_URL "$extra_urls"
  host_locations PIP_FIND_LINKS "$find_links"
  if [ -z "$cert" ] && [ -f /etc/ssl/certs/ca-certificates.crt ]; then cert=/etc/ssl/certs/ca-certificates.crt; fi
  if [ -n "$cert" ] && [ -f "$cert" ]; then SECRET_ARGS+=(--secret "id=pip_cert,src=$cert"); fi
fi

# ---------------------------------------------------------------------------------------------
# Build
if [ "$BUILD" = 1 ]; then
  VERSION=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$REPO/cg3d_bids/__init__.py")
  VCS_REF=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
  TORCH_ARG=()
  if [ -n "$TORCH_INDEX" ]; then TORCH_ARG=(--build-arg "TORCH_INDEX=$TORCH_INDEX"); fi
  log "building $TAG with $ENGINE (BAKE_WEIGHTS=0, base ${BASE})"
  t0=$(date +%s)
  "${ENG[@]}" build "${BUILD_OPTS[@]}" -f "$REPO/Dockerfile" -t "$TAG" \
    "${BASE_ARG[@]}" --build-arg BAKE_WEIGHTS=0 --build-arg "VERSION=$VERSION" \
    --build-arg "IMAGE_TAG=$TAG" --build-arg "VCS_REF=$VCS_REF" \
    --build-arg "BUILD_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    "${TORCH_ARG[@]}" "${PIP_ARGS[@]}" "${SECRET_ARGS[@]}" "$REPO" || die "image build failed"
  log "built $TAG in $(( $(date +%s) - t0 )) s"
fi

# ---------------------------------------------------------------------------------------------
# Run: read-only rootfs, tmpfs /tmp, arbitrary uid, no network.
OUT=$(mktemp -d /var/tmp/cg3d-smoke-out.XXXXXX)
chmod 0777 "$OUT"
cleanup() {
  if [ "$KEEP_OUTPUT" = 1 ]; then
    log "outputs kept in $OUT"
  else
    # Files belong to the arbitrary uid; remove them from inside a container when we are not root.
    rm -rf "$OUT" 2>/dev/null || "${ENG[@]}" run --rm "${RUN_OPTS[@]}" --user 0:0 --network none \
      --entrypoint /bin/rm -v "$OUT:/out" "$TAG" -rf /out/bids /out/derivatives /out/work >/dev/null 2>&1 || true
    rm -rf "$OUT" 2>/dev/null || true
  fi
  if [ "$CLEAN" = 1 ]; then
    "${ENG[@]}" rmi -f "$TAG" >/dev/null 2>&1 || true
    if [ "$ENGINE" = podman ] && [ "$STORE" != default ]; then
      "${ENG[@]}" system reset --force >/dev/null 2>&1 || true
      rm -rf "$STORE"
    fi
  fi
}
trap cleanup EXIT

SANDBOX=(--rm --read-only --tmpfs "/tmp:rw,exec,mode=1777" --user "$RUN_UID:$RUN_UID" --network none "${RUN_OPTS[@]}")

log "cg3d --version"
version_out=$("${ENG[@]}" run "${SANDBOX[@]}" "$TAG" --version) || die "cg3d --version failed"
log "  $version_out"

log "cg3d --bids-exec-spec (Boutiques descriptor)"
"${ENG[@]}" run "${SANDBOX[@]}" "$TAG" --bids-exec-spec > "$OUT/descriptor.json" \
  || die "--bids-exec-spec failed"
python3 - "$OUT/descriptor.json" <<'EOF' || die "--bids-exec-spec did not print a Boutiques descriptor"
import json, sys
d = json.load(open(sys.argv[1]))
assert d["name"] and d["tool-version"] and d["custom"]["BIDSAppSpecVersion"], d.keys()
EOF

log "exit codes: missing input dataset -> 64, --device cuda without a GPU -> 69"
set +e
"${ENG[@]}" run "${SANDBOX[@]}" "$TAG" /nonexistent /tmp/out group >/dev/null 2>&1; rc_usage=$?
mkdir -p "$OUT/empty"; chmod 0777 "$OUT/empty"
"${ENG[@]}" run "${SANDBOX[@]}" -v "$OUT/empty:/data:ro" "$TAG" /data /tmp/out group --device cuda >/dev/null 2>&1
rc_gpu=$?
set -e
[ "$rc_usage" = 64 ] || die "missing bids_dir exited $rc_usage, expected 64"
[ "$rc_gpu" = 69 ] || die "--device cuda without a GPU exited $rc_gpu, expected 69"
rm -rf "$OUT/empty"

log "demo: $ENGINE run --read-only --tmpfs /tmp --user $RUN_UID:$RUN_UID --network none ... demo /out --device cpu --encoder test-tiny-vit"
t0=$(date +%s)
if ! "${ENG[@]}" run "${SANDBOX[@]}" -v "$OUT:/out" "$TAG" demo /out --device cpu --encoder test-tiny-vit \
     > "$OUT/demo.log" 2>&1; then
  tail -n 40 "$OUT/demo.log" >&2
  die "the demo failed inside the container (log above)"
fi
log "demo finished in $(( $(date +%s) - t0 )) s"

DERIV="$OUT/derivatives/cg3d"
python3 - "$DERIV" "$DEMO_SUBJECTS" "$RUN_UID" <<'EOF' || die "output checks failed"
import csv, json, os, sys
from pathlib import Path
deriv, n_expected, uid = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
desc = json.loads((deriv / "dataset_description.json").read_text())
assert desc.get("DatasetType") == "derivative", desc
assert desc["GeneratedBy"][0]["Name"].lower().startswith("cg3d"), desc["GeneratedBy"]
with open(deriv / "group_T1w.tsv", newline="") as handle:
    rows = list(csv.DictReader(handle, delimiter="\t"))
assert len(rows) == n_expected, f"group_T1w.tsv has {len(rows)} rows, expected {n_expected}"
probsegs = sorted(deriv.glob("sub-*/**/anat/*_probseg.nii.gz")) or sorted(deriv.glob("sub-*/anat/*_probseg.nii.gz"))
assert len(probsegs) == n_expected, f"{len(probsegs)} probseg maps, expected {n_expected}"
for p in probsegs:
    assert p.stat().st_size > 0, p
    assert p.with_name(p.name.replace(".nii.gz", ".json")).exists(), f"no sidecar for {p}"
owners = {p.stat().st_uid for p in deriv.rglob("*")}
assert owners == {uid}, f"outputs owned by {owners}, expected only the container uid {uid}"
print(f"container_smoke: outputs OK: dataset_description.json, {len(rows)} rows in group_T1w.tsv, "
      f"{len(probsegs)} probseg maps, all owned by uid {uid}", file=sys.stderr)
EOF

if [ "$VALIDATE" = 1 ]; then
  log "bids-validator-deno (inside the image, --network none) on derivatives/cg3d"
  if ! "${ENG[@]}" run "${SANDBOX[@]}" -v "$OUT:/out:ro" --entrypoint /opt/venv/bin/bids-validator-deno \
       "$TAG" /out/derivatives/cg3d > "$OUT/validator.log" 2>&1; then
    tail -n 40 "$OUT/validator.log" >&2
    die "bids-validator-deno found errors in the demo outputs"
  fi
  log "bids-validator-deno: no errors"
fi
log "PASS"

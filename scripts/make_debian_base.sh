#!/usr/bin/env bash
# make_debian_base.sh [--engine podman] [--tag localhost/debian-python:12] [--mirror URL] [PODMAN_GLOBAL_OPTS...]
#
# Build a local Debian 12 (bookworm) base image with Python 3.11 for the cg3d Dockerfile, for
# machines that cannot pull from any registry (no Docker Hub) but reach the Debian archive:
#   debootstrap --variant=minbase bookworm ROOTFS  +  python3 python3-venv ca-certificates passwd
#   tar -C ROOTFS -c . | podman import - TAG
# The Dockerfile then builds with  --build-arg BASE_IMAGE=TAG  (python is /usr/bin/python3 there;
# the Dockerfile uses ARG PYTHON=python3, which works for this base and for the official image).
# Needs root, debootstrap and podman (Debian: apt-get install -y podman runc debootstrap).
# Time on a 2-core Debian 12 VM: about 2 to 3 minutes; the image is about 300 MB.
set -euo pipefail

ENGINE=podman
TAG=localhost/debian-python:12
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
while [ $# -gt 0 ]; do
  case "$1" in
    --engine) ENGINE=$2; shift 2 ;;
    --tag) TAG=$2; shift 2 ;;
    --mirror) MIRROR=$2; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) break ;;
  esac
done
# Remaining arguments are global engine options (e.g. --root DIR --runroot DIR --storage-driver overlay).
ENGINE_OPTS=("$@")

if [ "$(id -u)" != 0 ]; then echo "make_debian_base.sh: debootstrap needs root" >&2; exit 1; fi
command -v debootstrap >/dev/null || { echo "make_debian_base.sh: install debootstrap (apt-get install -y debootstrap)" >&2; exit 1; }
command -v "$ENGINE" >/dev/null || { echo "make_debian_base.sh: $ENGINE not found" >&2; exit 1; }

ROOTFS=$(mktemp -d /var/tmp/cg3d-rootfs.XXXXXX)
cleanup() { rm -rf --one-file-system "$ROOTFS"; }
trap cleanup EXIT

start=$(date +%s)
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,passwd \
  "$SUITE" "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 || { tail -n 30 "$ROOTFS.log" >&2; rm -f "$ROOTFS.log"; exit 1; }
rm -f "$ROOTFS.log"
# Slim it down: no apt lists, docs or man pages (the image is a base for pip-installed software).
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/usr/share/doc/* \
       "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/locale/*
"$ROOTFS/usr/bin/python3" --version >/dev/null 2>&1 || chroot "$ROOTFS" python3 --version
tar --numeric-owner -C "$ROOTFS" -c . | "$ENGINE" "${ENGINE_OPTS[@]}" import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' \
  --quiet --message "debootstrap --variant=minbase $SUITE + python3 python3-venv ca-certificates passwd" \
  - "$TAG" >/dev/null
echo "make_debian_base.sh: built $TAG in $(( $(date +%s) - start )) s ($(chroot "$ROOTFS" python3 --version))"

#!/usr/bin/env python3
"""Download encoder weights from the Hugging Face hub at image build time, verify, write a manifest.

Used by the Dockerfile's ``weights`` stage::

    python bake_weights.py --dest /opt/cg3d/models --encoders "dinov2_vitl14" [--sha256 HEX] [--revision REV]

For each encoder name it downloads ``model.safetensors`` of the timm repository ``timm/<timm name>``
(``huggingface_hub.hf_hub_download``), then

* always checks the file's sha256 against the hub's LFS sha256 (the file metadata of the repository
  at that revision), and its size against the LFS size;
* with ``--sha256`` (one value per encoder, same order, space or comma separated), also checks it
  against that pinned value, so a rebuild cannot silently pick up changed weights;

and copies it to ``<dest>/<encoder name>.safetensors`` (the name ``cg3d_bids.core.models.encoders``
looks for under ``$CG3D_WEIGHTS_DIR``). ``<dest>/manifest.json`` records, per encoder, the timm
name, repository, resolved commit, file name, size, sha256 and download time. ``--bake 0`` writes
an empty manifest and downloads nothing (offline smoke builds). Any mismatch exits 1 with a clear
message, which fails the image build. Needs network access to the hub during the build only.
Standard library + huggingface_hub; does not import cg3d_bids (the table below is checked against
``cg3d_bids.core.models.encoders`` by tests/test_containers.py when that module is importable).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

#: cg3d encoder name -> timm model name (Hugging Face repository ``timm/<timm name>``).
TIMM_NAMES = {
    "dinov2_vits14": "vit_small_patch14_dinov2.lvd142m",
    "dinov2_vitb14": "vit_base_patch14_dinov2.lvd142m",
    "dinov2_vitl14": "vit_large_patch14_dinov2.lvd142m",
    "dinov2_vitg14": "vit_giant_patch14_dinov2.lvd142m",
    "clip_vitl14": "vit_large_patch14_clip_224.openai",
}
FILENAME = "model.safetensors"
MANIFEST = "manifest.json"
_HEX64 = re.compile(r"[0-9a-f]{64}")


class BakeError(RuntimeError):
    """A download or verification failure (the build must stop)."""


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def split_values(values: list[str] | str | None) -> list[str]:
    """``["a b", "c,d"]`` -> ``["a", "b", "c", "d"]`` (build args arrive as one string)."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [item for value in values for item in re.split(r"[\s,]+", value.strip()) if item]


def hub_lfs_info(repo_id: str, filename: str, revision: str) -> tuple[str, int, str | None]:
    """(sha256, size, commit) of an LFS file, from the hub's file metadata (no download)."""
    from huggingface_hub import HfApi

    api = HfApi()
    infos = api.get_paths_info(repo_id, [filename], revision=revision, expand=True)
    entry = next((info for info in infos if getattr(info, "path", None) == filename), None)
    if entry is None:
        raise BakeError(f"{repo_id}@{revision} has no file {filename}")
    lfs = getattr(entry, "lfs", None)
    if lfs is None or not getattr(lfs, "sha256", None):
        raise BakeError(f"{repo_id}@{revision}:{filename} is not an LFS file; the hub gives no sha256 for it")
    commit = None
    last_commit = getattr(entry, "last_commit", None)
    if last_commit is not None:
        commit = getattr(last_commit, "oid", None)
    return str(lfs.sha256).lower(), int(lfs.size), commit


def download(repo_id: str, filename: str, revision: str, cache_dir: Path) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=str(cache_dir)))


def resolved_commit(path: Path) -> str | None:
    """The commit hash from a hub cache path ``.../snapshots/<commit>/<file>``."""
    parts = path.parts
    if "snapshots" in parts:
        index = parts.index("snapshots")
        if index + 1 < len(parts) and re.fullmatch(r"[0-9a-f]{40}", parts[index + 1]):
            return parts[index + 1]
    return None


def bake_one(name: str, dest: Path, *, revision: str, expected_sha256: str | None, cache_dir: Path) -> dict:
    if name not in TIMM_NAMES:
        raise BakeError(f"unknown encoder {name!r}; choose from {', '.join(TIMM_NAMES)}")
    if expected_sha256 is not None and not _HEX64.fullmatch(expected_sha256):
        raise BakeError(f"--sha256 for {name}: {expected_sha256!r} is not 64 lower-case hex digits")
    timm_name = TIMM_NAMES[name]
    repo_id = f"timm/{timm_name}"
    hub_sha256, hub_size, hub_commit = hub_lfs_info(repo_id, FILENAME, revision)
    if expected_sha256 is not None and hub_sha256 != expected_sha256:
        raise BakeError(
            f"{name}: the hub's sha256 of {repo_id}@{revision}:{FILENAME} is {hub_sha256}, but "
            f"WEIGHTS_SHA256 pins {expected_sha256}; the weights changed upstream, or the pin is wrong"
        )
    print(f"bake_weights: {name}: downloading {repo_id}@{revision}:{FILENAME} ({hub_size / 1e6:.0f} MB)",
          file=sys.stderr)
    cached = download(repo_id, FILENAME, revision, cache_dir)
    size = cached.stat().st_size
    sha256 = sha256_of(cached)
    if size != hub_size or sha256 != hub_sha256:
        raise BakeError(
            f"{name}: downloaded {FILENAME} has sha256 {sha256} ({size} bytes) but the hub says "
            f"{hub_sha256} ({hub_size} bytes): corrupt or tampered download"
        )
    target = dest / f"{name}.safetensors"
    tmp = target.with_suffix(".safetensors.part")
    shutil.copyfile(cached, tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, target)
    return {
        "encoder": name,
        "timm_name": timm_name,
        "repo_id": repo_id,
        "revision": revision,
        "commit": resolved_commit(cached) or hub_commit,
        "filename": FILENAME,
        "path": target.name,
        "size": size,
        "sha256": sha256,
        "sha256_pinned": expected_sha256 is not None,
        "downloaded": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def bake(encoders: list[str], dest: Path, *, revision: str = "main", sha256s: list[str] | None = None,
         enabled: bool = True) -> dict:
    """Download and verify every encoder into ``dest``; return (and write) the manifest."""
    sha256s = [value.lower() for value in (sha256s or [])]
    if sha256s and len(sha256s) != len(encoders):
        raise BakeError(f"{len(sha256s)} sha256 value(s) for {len(encoders)} encoder(s) ({' '.join(encoders)}); "
                        "give one per encoder, in the same order, or none")
    dest.mkdir(parents=True, exist_ok=True)
    entries = []
    if enabled:
        if not encoders:
            raise BakeError("no encoder given")
        with tempfile.TemporaryDirectory(prefix="cg3d-hf-") as cache:
            for index, name in enumerate(encoders):
                expected = sha256s[index] if sha256s else None
                entries.append(bake_one(name, dest, revision=revision, expected_sha256=expected,
                                        cache_dir=Path(cache)))
    manifest = {
        "weights_dir": str(dest),
        "baked": bool(enabled),
        "encoders": entries,
        "note": "weights of the encoders listed here are <weights_dir>/<encoder>.safetensors"
        if enabled else "no weights baked (BAKE_WEIGHTS=0): use --weights FILE or --encoder test-tiny-vit",
    }
    tmp = dest / (MANIFEST + ".part")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest / MANIFEST)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("encoders_pos", nargs="*", metavar="ENCODER", help="encoder names")
    parser.add_argument("--encoders", action="append", default=[], help="encoder names (space/comma separated)")
    parser.add_argument("--dest", type=Path, required=True, help="weights folder ($CG3D_WEIGHTS_DIR)")
    parser.add_argument("--revision", default="main", help="hub revision (branch, tag or commit)")
    parser.add_argument("--sha256", action="append", default=[], help="expected sha256 per encoder")
    parser.add_argument("--bake", default="1", help="1: download; 0: only write an empty manifest")
    args = parser.parse_args(argv)
    if args.bake not in {"0", "1", "true", "false", "yes", "no"}:
        parser.error(f"--bake {args.bake!r}: use 1 or 0")
    encoders = split_values(args.encoders) + split_values(args.encoders_pos)
    try:
        manifest = bake(encoders, args.dest, revision=args.revision or "main",
                        sha256s=split_values(args.sha256), enabled=args.bake in {"1", "true", "yes"})
    except BakeError as exc:
        print(f"bake_weights: error: {exc}", file=sys.stderr)
        return 1
    for entry in manifest["encoders"]:
        print(f"bake_weights: {entry['encoder']}: {entry['path']} sha256 {entry['sha256']} "
              f"(commit {entry['commit']})", file=sys.stderr)
    if not manifest["baked"]:
        print("bake_weights: BAKE_WEIGHTS=0, no weights in the image", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

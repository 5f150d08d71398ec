"""CPUs and memory this process may use, as opposed to what the node has.

On a shared node (a SLURM allocation, a container with a CPU quota, ``taskset``) ``os.cpu_count()``
reports every CPU of the machine: a 4-CPU job on a 128-core node that starts ``cpu_count() //
nprocs`` threads per process oversubscribes its CPUs about 32-fold. The functions here take the
smallest of the limits that apply:

* CPUs: the affinity mask (``sched_getaffinity``, which includes cpusets), the cgroup CPU quota
  (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, rounded up) and
  ``SLURM_CPUS_PER_TASK``;
* memory: the cgroup memory limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``),
  ``SLURM_MEM_PER_NODE`` or ``SLURM_MEM_PER_CPU`` x the CPUs of the allocation, and ``MemAvailable``
  from ``/proc/meminfo``.

cgroup limits are read along the process's own cgroup path (``/proc/self/cgroup``) up to the
hierarchy's mount point (``/proc/self/mountinfo``): a limit set on any ancestor applies. Every
function takes ``root`` (a folder standing in for ``/``) and ``environ`` so that tests can give
them fake cgroup trees and environments.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

#: cgroup v1 reports "no memory limit" as a huge number (2**63 rounded down to a page).
_UNLIMITED_BYTES = 2**60
_MIB = 1024**2
_SIZE_UNITS = {"K": 1024, "M": _MIB, "G": 1024**3, "T": 1024**4}


@dataclass(frozen=True)
class _Mount:
    """One cgroup hierarchy: where it is mounted and which cgroup path its mount shows."""

    mount_point: Path  # already under ``root``
    mount_root: str  # the cgroup path that appears at ``mount_point`` (``/`` unless bind-mounted)
    controllers: frozenset[str] = frozenset()  # v1 mount options (controller names among them)


# ------------------------------------------------------------------------------------------------
# public API
def available_cpus(root: str | os.PathLike = "/", environ: Mapping[str, str] | None = None) -> int:
    """CPUs this process may use: the smallest of affinity, cgroup quota and SLURM_CPUS_PER_TASK.

    Never less than 1. ``root`` and ``environ`` default to the real ``/`` and ``os.environ``.
    """
    root = Path(root)
    env = os.environ if environ is None else environ
    limits = [_affinity_cpus(root), _cgroup_cpu_quota(root)]
    limits.append(_env_positive_int(env, "SLURM_CPUS_PER_TASK"))
    return max(1, min(n for n in limits if n is not None))


def available_memory_bytes(root: str | os.PathLike = "/", environ: Mapping[str, str] | None = None) -> int | None:
    """Memory this process may use, in bytes: the smallest limit that applies.

    The limits are the cgroup memory limit, ``SLURM_MEM_PER_NODE`` (MB; 0 means "all of the
    node") or else ``SLURM_MEM_PER_CPU`` (MB) x the CPUs of the allocation
    (``SLURM_CPUS_ON_NODE``, else :func:`available_cpus`), and ``MemAvailable``. None when none of
    them can be read (no ``/proc/meminfo``, e.g. macOS).
    """
    root = Path(root)
    env = os.environ if environ is None else environ
    limits = [_cgroup_memory_limit(root), _slurm_memory(root, env), _meminfo_available(root)]
    known = [n for n in limits if n is not None]
    return min(known) if known else None


def memory_limit_bytes(root: str | os.PathLike = "/", environ: Mapping[str, str] | None = None) -> int | None:
    """The cgroup or SLURM memory limit (memory this process already holds counts in it), or None."""
    root = Path(root)
    env = os.environ if environ is None else environ
    known = [n for n in (_cgroup_memory_limit(root), _slurm_memory(root, env)) if n is not None]
    return min(known) if known else None


def memory_free_bytes(root: str | os.PathLike = "/") -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (memory not yet held by anyone), or None."""
    return _meminfo_available(Path(root))


def default_threads(nprocs: int, cpus: int) -> int:
    """Threads per process (``--omp-nthreads``) when ``nprocs`` processes share ``cpus`` CPUs.

    The rule: ``cpus // nprocs``, at least 1, so that ``nprocs x threads <= cpus`` whenever
    ``nprocs <= cpus`` (the CPUs are never oversubscribed by the default; more processes than
    CPUs get one thread each). ``cpus`` is normally :func:`available_cpus`.
    """
    if nprocs < 1 or cpus < 1:
        raise ValueError(f"nprocs and cpus must be >= 1 (got nprocs={nprocs}, cpus={cpus})")
    return max(1, cpus // nprocs)


# ------------------------------------------------------------------------------------------------
# CPUs
def _affinity_cpus(root: Path) -> int | None:
    """CPUs in this process's affinity mask (``Cpus_allowed_list`` under a fake root)."""
    if root == Path("/") and hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    status = _read(root / "proc/self/status")
    for line in (status or "").splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return _count_cpu_list(line.split(":", 1)[1])
    return os.cpu_count() if root == Path("/") else None


def _count_cpu_list(text: str) -> int:
    """Number of CPUs in a list such as ``0-3,8,10-11``."""
    count = 0
    for part in text.strip().split(","):
        if part:
            first, _, last = part.partition("-")
            count += int(last or first) - int(first) + 1
    return count


def _cgroup_cpu_quota(root: Path) -> int | None:
    """CPU quota of the cgroup (v2 ``cpu.max`` or v1 CFS quota), rounded up; None if unlimited."""
    quotas = [_cpu_max(text) for text in _cgroup_values(root, "cpu", ["cpu.max"])]
    for folder in _cgroup_dirs(root, "cpu", v2=False):
        quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
        if quota and period:
            quotas.append(_quota(quota.strip(), period.strip()))
    known = [q for q in quotas if q is not None]
    return min(known) if known else None


def _cpu_max(text: str) -> int | None:
    """``cpu.max`` holds ``"max 100000"`` (no limit) or ``"QUOTA PERIOD"``."""
    fields = text.split()
    return _quota(fields[0], fields[1] if len(fields) > 1 else "100000")


def _quota(quota: str, period: str) -> int | None:
    if quota in ("max", "-1") or int(quota) <= 0 or int(period) <= 0:
        return None
    return max(1, math.ceil(int(quota) / int(period)))


# ------------------------------------------------------------------------------------------------
# memory
def _cgroup_memory_limit(root: Path) -> int | None:
    values = _cgroup_values(root, "memory", ["memory.max"])
    values += [_read(d / "memory.limit_in_bytes") or "" for d in _cgroup_dirs(root, "memory", v2=False)]
    limits = [int(v) for v in (t.strip() for t in values) if v.isdigit() and int(v) < _UNLIMITED_BYTES]
    return min(limits) if limits else None


def _slurm_memory(root: Path, env: Mapping[str, str]) -> int | None:
    per_node = _env_size_mb(env, "SLURM_MEM_PER_NODE")
    if per_node is not None:
        return per_node or None  # 0 = the whole node
    per_cpu = _env_size_mb(env, "SLURM_MEM_PER_CPU")
    if not per_cpu:
        return None
    cpus = _env_positive_int(env, "SLURM_CPUS_ON_NODE") or available_cpus(root, env)
    return per_cpu * cpus


def _meminfo_available(root: Path) -> int | None:
    for line in (_read(root / "proc/meminfo") or "").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # kB
    return None


# ------------------------------------------------------------------------------------------------
# environment
def _env_positive_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise UsageError(f"{name}={value!r} is not a positive whole number of CPUs",
                         fix=f"unset {name} or set it to e.g. 4 (SLURM sets it from --cpus-per-task)")
    return int(value)


def _env_size_mb(env: Mapping[str, str], name: str) -> int | None:
    """A SLURM memory variable (MB, or with a K/M/G/T suffix) in bytes; None when unset."""
    value = env.get(name, "").strip().upper()
    if not value:
        return None
    number, unit = (value[:-1], value[-1]) if value[-1] in _SIZE_UNITS else (value, "M")
    if not number.isdigit():
        raise UsageError(f"{name}={env[name]!r} is not a memory size",
                         fix=f"unset {name} or set it to a number of MB, e.g. 16000 (SLURM sets it from --mem)")
    return int(number) * _SIZE_UNITS[unit]


# ------------------------------------------------------------------------------------------------
# cgroup hierarchies
def _cgroup_values(root: Path, controller: str, names: list[str]) -> list[str]:
    """Contents of the v2 files ``names`` along this process's cgroup path."""
    texts = []
    for folder in _cgroup_dirs(root, controller, v2=True):
        for name in names:
            text = _read(folder / name)
            if text is not None:
                texts.append(text.strip())
    return texts


def _cgroup_dirs(root: Path, controller: str, v2: bool) -> list[Path]:
    """This process's cgroup folder for ``controller`` and its ancestors up to the mount point."""
    dirs: list[Path] = []
    for path, mount in _cgroup_paths(root, controller, v2):
        rel = os.path.relpath(path, mount.mount_root)
        folder = mount.mount_point if rel.startswith("..") else mount.mount_point / rel
        if not folder.is_dir():  # a path from another cgroup namespace: the mount is our cgroup
            folder = mount.mount_point
        dirs.append(folder)
        while folder != mount.mount_point and mount.mount_point in folder.parents:
            folder = folder.parent
            dirs.append(folder)
    return dirs


def _cgroup_paths(root: Path, controller: str, v2: bool) -> list[tuple[str, _Mount]]:
    """(cgroup path, mount) pairs of this process for ``controller`` (v1) or the v2 hierarchy."""
    mounts = _mounts(root)
    pairs = []
    for line in (_read(root / "proc/self/cgroup") or "").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if v2 and hierarchy == "0" and controllers == "":
            found = [m for kind, m in mounts if kind == "cgroup2"]
        elif not v2 and controller in controllers.split(","):
            found = [m for kind, m in mounts if kind == "cgroup" and controller in m.controllers]
        else:
            continue
        if found:
            pairs.append((path or "/", found[0]))
    return pairs


def _mounts(root: Path) -> list[tuple[str, _Mount]]:
    """cgroup mounts from ``/proc/self/mountinfo`` as ("cgroup2" or "cgroup", mount) pairs.

    Without a mountinfo (e.g. a fake tree) the usual places are assumed: the v2 hierarchy at
    ``/sys/fs/cgroup`` (or ``/sys/fs/cgroup/unified``) and v1 controllers at
    ``/sys/fs/cgroup/<controller>``.
    """
    text = _read(root / "proc/self/mountinfo")
    if text is None:
        return _default_mounts(root)
    mounts = []
    for line in text.splitlines():
        pre, sep, post = line.partition(" - ")
        fields, tail = pre.split(), post.split()
        if sep and len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
            options = frozenset(tail[2].split(",")) if tail[0] == "cgroup" else frozenset()
            mounts.append((tail[0], _Mount(root / fields[4].lstrip("/"), fields[3], options)))
    return mounts


def _default_mounts(root: Path) -> list[tuple[str, _Mount]]:
    base = root / "sys/fs/cgroup"
    mounts = []
    if (base / "cgroup.controllers").is_file():
        mounts.append(("cgroup2", _Mount(base, "/")))
    elif (base / "unified").is_dir():
        mounts.append(("cgroup2", _Mount(base / "unified", "/")))
    for name in ("cpu", "memory"):
        if (base / name).is_dir():
            mounts.append(("cgroup", _Mount(base / name, "/", frozenset([name]))))
    return mounts


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None

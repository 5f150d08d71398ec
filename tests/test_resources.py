"""cg3d_bids.resources: CPUs and memory from affinity, cgroups (v1, v2) and SLURM variables."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cg3d_bids.errors import EXIT_USAGE, UsageError
from cg3d_bids.resources import available_cpus, available_memory_bytes, default_threads

GIB = 1024**3
UNLIMITED_V1 = "9223372036854771712"


def make_tree(tmp_path: Path, *, cgroup: str, files: dict[str, str], mountinfo: str | None = None,
              cpus_allowed: str = "0-7", mem_available_kb: int = 64 * 1024**2) -> Path:
    """A fake ``/``: proc/self/{cgroup,status,mountinfo}, proc/meminfo and cgroup files."""
    root = tmp_path / "root"
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(cgroup)
    (root / "proc/self/status").write_text(f"Name:\tpython\nCpus_allowed:\tff\nCpus_allowed_list:\t{cpus_allowed}\n")
    (root / "proc/meminfo").write_text(f"MemTotal: {2 * mem_available_kb} kB\nMemAvailable: {mem_available_kb} kB\n")
    if mountinfo is not None:
        (root / "proc/self/mountinfo").write_text(mountinfo)
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text + "\n")
    return root


V2_MOUNTINFO = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
V1_MOUNTINFO = (
    "31 23 0:28 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755\n"
    "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n"
    "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
    "40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd\n"
    "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
)
V1_CGROUP = "12:memory:/slurm/uid_0/job_7\n3:cpu,cpuacct:/slurm/uid_0/job_7\n1:name=systemd:/\n0::/\n"


def v2_tree(tmp_path: Path, cpu_max: str, memory_max: str, parent_memory_max: str = "max", **kw) -> Path:
    job = "sys/fs/cgroup/system.slice/job.scope"
    files = {
        "sys/fs/cgroup/cgroup.controllers": "cpu memory",
        f"{job}/cpu.max": cpu_max,
        f"{job}/memory.max": memory_max,
        "sys/fs/cgroup/system.slice/memory.max": parent_memory_max,
        "sys/fs/cgroup/system.slice/cpu.max": "max 100000",
    }
    return make_tree(tmp_path, cgroup="0::/system.slice/job.scope\n", files=files, mountinfo=V2_MOUNTINFO, **kw)


def v1_tree(tmp_path: Path, quota: str, period: str, limit: str, **kw) -> Path:
    files = {
        "sys/fs/cgroup/cpu,cpuacct/slurm/uid_0/job_7/cpu.cfs_quota_us": quota,
        "sys/fs/cgroup/cpu,cpuacct/slurm/uid_0/job_7/cpu.cfs_period_us": period,
        "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "-1",
        "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000",
        "sys/fs/cgroup/memory/slurm/uid_0/job_7/memory.limit_in_bytes": limit,
        "sys/fs/cgroup/memory/memory.limit_in_bytes": UNLIMITED_V1,
    }
    return make_tree(tmp_path, cgroup=V1_CGROUP, files=files, mountinfo=V1_MOUNTINFO, **kw)


# ------------------------------------------------------------------------------------------------
# CPUs
@pytest.mark.parametrize(("cpu_max", "expected"), [
    ("max 100000", 8),        # no quota: the affinity mask (0-7)
    ("250000 100000", 3),     # 2.5 CPUs rounded up
    ("100000 100000", 1),
    ("50000 100000", 1),      # half a CPU: still one
    ("1600000 100000", 8),    # quota above the mask: the mask
])
def test_cpus_cgroup_v2(tmp_path, cpu_max, expected):
    assert available_cpus(v2_tree(tmp_path, cpu_max, "max"), environ={}) == expected


@pytest.mark.parametrize(("quota", "period", "expected"), [
    ("-1", "100000", 6),      # unlimited: the mask 0-3,6-7
    ("300000", "100000", 3),
    ("150000", "100000", 2),
    ("20000", "10000", 2),
])
def test_cpus_cgroup_v1(tmp_path, quota, period, expected):
    root = v1_tree(tmp_path, quota, period, UNLIMITED_V1, cpus_allowed="0-3,6-7")
    assert available_cpus(root, environ={}) == expected


def test_cpus_quota_on_an_ancestor_applies(tmp_path):
    root = v2_tree(tmp_path, "max 100000", "max")
    (root / "sys/fs/cgroup/system.slice/cpu.max").write_text("200000 100000\n")
    assert available_cpus(root, environ={}) == 2


def test_cpus_slurm_variable_is_a_limit(tmp_path):
    root = v2_tree(tmp_path, "max 100000", "max")
    assert available_cpus(root, environ={"SLURM_CPUS_PER_TASK": "4"}) == 4
    assert available_cpus(root, environ={"SLURM_CPUS_PER_TASK": "64"}) == 8  # never above the mask
    root2 = v2_tree(tmp_path / "b", "300000 100000", "max")
    assert available_cpus(root2, environ={"SLURM_CPUS_PER_TASK": "4"}) == 3


@pytest.mark.parametrize("value", ["0", "four", "-2", "2.5"])
def test_cpus_bad_slurm_variable_is_a_usage_error(tmp_path, value):
    root = v2_tree(tmp_path, "max 100000", "max")
    with pytest.raises(UsageError) as info:
        available_cpus(root, environ={"SLURM_CPUS_PER_TASK": value})
    assert info.value.exit_code == EXIT_USAGE
    assert "SLURM_CPUS_PER_TASK" in str(info.value) and "fix:" in str(info.value)


def test_cpus_inside_a_cgroup_namespace(tmp_path):
    """The container sees its cgroup at the mount point; /proc/self/cgroup names the host path."""
    mountinfo = "35 31 0:32 /docker/abc /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"
    files = {"sys/fs/cgroup/cpu/cpu.cfs_quota_us": "400000", "sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000"}
    root = make_tree(tmp_path, cgroup="4:cpu:/docker/abc\n", files=files, mountinfo=mountinfo, cpus_allowed="0-31")
    assert available_cpus(root, environ={}) == 4


def test_cpus_without_mountinfo_uses_usual_places(tmp_path):
    files = {"sys/fs/cgroup/cgroup.controllers": "cpu", "sys/fs/cgroup/cpu.max": "300000 100000"}
    root = make_tree(tmp_path, cgroup="0::/\n", files=files)
    assert available_cpus(root, environ={}) == 3


def test_cpus_never_below_one(tmp_path):
    root = v2_tree(tmp_path, "1000 100000", "max", cpus_allowed="5")
    assert available_cpus(root, environ={}) == 1


# ------------------------------------------------------------------------------------------------
# memory
def test_memory_cgroup_v2(tmp_path):
    assert available_memory_bytes(v2_tree(tmp_path, "max", str(3 * GIB)), environ={}) == 3 * GIB
    # "max" everywhere: MemAvailable (64 GiB in the fake meminfo)
    assert available_memory_bytes(v2_tree(tmp_path / "b", "max", "max"), environ={}) == 64 * GIB
    # a limit on the parent cgroup applies to the job
    assert available_memory_bytes(v2_tree(tmp_path / "c", "max", "max", str(5 * GIB)), environ={}) == 5 * GIB


def test_memory_cgroup_v1(tmp_path):
    root = v1_tree(tmp_path, "-1", "100000", str(2 * GIB))
    assert available_memory_bytes(root, environ={}) == 2 * GIB
    unlimited = v1_tree(tmp_path / "b", "-1", "100000", UNLIMITED_V1, mem_available_kb=1024**2)
    assert available_memory_bytes(unlimited, environ={}) == GIB


def test_memory_meminfo_when_below_the_limit(tmp_path):
    root = v2_tree(tmp_path, "max", str(100 * GIB), mem_available_kb=7 * 1024**2)
    assert available_memory_bytes(root, environ={}) == 7 * GIB


@pytest.mark.parametrize(("env", "expected"), [
    ({"SLURM_MEM_PER_NODE": "4000"}, 4000 * 1024**2),
    ({"SLURM_MEM_PER_NODE": "3G"}, 3 * GIB),
    ({"SLURM_MEM_PER_NODE": "0"}, 64 * GIB),                      # 0 = the whole node
    ({"SLURM_MEM_PER_CPU": "1000", "SLURM_CPUS_ON_NODE": "3"}, 3000 * 1024**2),
    ({"SLURM_MEM_PER_CPU": "1000", "SLURM_CPUS_PER_TASK": "2"}, 2000 * 1024**2),  # falls back to available_cpus
    ({"SLURM_MEM_PER_CPU": "100G"}, 64 * GIB),                    # above MemAvailable: MemAvailable
])
def test_memory_slurm(tmp_path, env, expected):
    root = v2_tree(tmp_path, "max", "max")
    assert available_memory_bytes(root, environ=env) == expected


def test_memory_bad_slurm_variable_is_a_usage_error(tmp_path):
    root = v2_tree(tmp_path, "max", "max")
    with pytest.raises(UsageError, match="SLURM_MEM_PER_NODE"):
        available_memory_bytes(root, environ={"SLURM_MEM_PER_NODE": "lots"})


def test_memory_unknown_without_any_source(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    assert available_memory_bytes(root, environ={}) is None


# ------------------------------------------------------------------------------------------------
# threads
@pytest.mark.parametrize(("nprocs", "cpus", "expected"), [
    (1, 1, 1), (1, 8, 8), (4, 8, 2), (3, 8, 2), (8, 8, 1), (16, 8, 1), (4, 128, 32),
])
def test_default_threads(nprocs, cpus, expected):
    threads = default_threads(nprocs, cpus)
    assert threads == expected
    assert nprocs > cpus or nprocs * threads <= cpus


@pytest.mark.parametrize(("nprocs", "cpus"), [(0, 4), (4, 0)])
def test_default_threads_rejects_zero(nprocs, cpus):
    with pytest.raises(ValueError, match=">= 1"):
        default_threads(nprocs, cpus)


# ------------------------------------------------------------------------------------------------
# this machine
def test_real_machine_cpus(monkeypatch):
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    mask = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = available_cpus()
    assert 1 <= cpus <= mask
    assert available_cpus(environ={"SLURM_CPUS_PER_TASK": "1"}) == 1
    status = Path("/proc/self/status")
    if status.is_file():  # the fake-root path (Cpus_allowed_list) agrees with sched_getaffinity
        from cg3d_bids.resources import _count_cpu_list

        listed = next(line for line in status.read_text().splitlines() if line.startswith("Cpus_allowed_list"))
        assert _count_cpu_list(listed.split(":", 1)[1]) == mask


def test_real_machine_memory(monkeypatch):
    for name in ("SLURM_MEM_PER_NODE", "SLURM_MEM_PER_CPU"):
        monkeypatch.delenv(name, raising=False)
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        pytest.skip("no /proc/meminfo on this system")
    available_kb = next(int(line.split()[1]) for line in meminfo.read_text().splitlines()
                        if line.startswith("MemAvailable:"))
    memory = available_memory_bytes()
    assert 0 < memory <= available_kb * 1024 * 1.1  # MemAvailable moves a little between reads
    assert available_memory_bytes(environ={"SLURM_MEM_PER_NODE": "100"}) == 100 * 1024**2

"""The one generic stage interface: traits from a stage's signature, records as files, one guard."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from nipype.pipeline import engine as pe

from cg3d_bids import records as rec
from cg3d_bids.errors import TempFailError
from cg3d_bids.interfaces import stage as iface
from test_stages import context, dataset  # noqa: F401 (module fixture)


def test_traits_follow_the_signature():
    prepare = iface.PrepareImage.input_spec()
    assert {"settings_file", "image", "use_gpu"} <= set(prepare.trait_names())
    assert set(iface.TokenizeImages.output_spec().trait_names()) >= {"out_files"}
    assert set(iface.ScoreBatch.input_spec().trait_names()) >= {"tokens", "order", "modality"}
    assert set(iface.WriteGroupOutputs.output_spec().trait_names()) >= {"out_file"}
    # importable by name: nipype's MultiProc pickles interfaces by reference
    assert iface.PrepareImage.__module__ == iface.__name__ and iface.PrepareImage.__qualname__ == "PrepareImage"


@pytest.mark.slow
@pytest.mark.slow
def test_a_node_runs_a_stage_on_record_files(dataset, tmp_path):  # noqa: F811
    ctx = context(dataset, tmp_path)
    settings_file = tmp_path / "settings.toml"
    settings_file.write_text(ctx.settings.to_toml())
    image_file = ctx.cache.store(dataset["images"][0])
    node = pe.Node(iface.PrepareImage(settings_file=str(settings_file), image=str(image_file)), name="prepare",
                   base_dir=str(tmp_path / "nipype"))
    result = node.run()
    prepared = rec.load(result.outputs.out_file, rec.PreparedImage)
    assert prepared.image == dataset["images"][0] and prepared.usable
    landmarks = pe.Node(iface.ComputeLandmarks(settings_file=str(settings_file), modality="T1w",
                                               prepared=[[result.outputs.out_file]]),  # nested lists flatten
                        name="landmarks", base_dir=str(tmp_path / "nipype"))
    assert rec.load(landmarks.run().outputs.out_file, rec.Landmarks).images == (prepared.image.bids_name,)


def test_out_of_memory_is_recognised_by_type_not_text():
    oom = iface._translate(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert isinstance(oom, TempFailError) and oom.exit_code == 75 and "--slice-batch" in oom.fix
    assert isinstance(iface._translate(MemoryError()), TempFailError)
    other = RuntimeError("out of memory")  # the same words in another error are not an OOM
    assert iface._translate(other) is other


def test_unsupported_parameter_types_are_refused():
    def bad(ctx, value: float) -> rec.Landmarks:  # pragma: no cover - never called
        raise AssertionError

    with pytest.raises(TypeError, match="unsupported type"):
        iface.stage_interface(bad, "BadInterface")


def test_every_node_runs_with_its_planned_thread_count(monkeypatch):
    """``n`` threads, or the process's OMP_NUM_THREADS, then the caller's count again."""
    _threads = iface._threads
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        with _threads(0):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2 and os.environ["OMP_NUM_THREADS"] == "1"
        with _threads(3):
            assert torch.get_num_threads() == 3 and os.environ["OMP_NUM_THREADS"] == "3"
        assert torch.get_num_threads() == 2 and os.environ["OMP_NUM_THREADS"] == "1"
        for value, expected in [("3,1", 3), ("auto", 2)]:  # nested levels; not a number: untouched
            monkeypatch.setenv("OMP_NUM_THREADS", value)
            with _threads(0):
                assert torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(before)


FORKED_NODE = r"""
import os, sys, time
import torch
from cg3d_bids.interfaces.stage import _threads

volume = torch.rand(1, 1, 40, 40, 40)
torch.set_num_threads(2)
torch.nn.functional.interpolate(volume, size=(96, 96, 96), mode="trilinear")  # an OpenMP team
os.environ["OMP_NUM_THREADS"] = "1"  # what cg3d sets for its workers on 2 CPUs with --nprocs 2
pid = os.fork()
if pid == 0:  # a MultiProc worker running a node that does not set threads itself (outputs)
    with _threads(0):
        torch.nn.functional.interpolate(volume, size=(96, 96, 96), mode="trilinear")
    os._exit(0)
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        sys.exit(os.waitstatus_to_exitcode(status))
    time.sleep(0.05)
os.kill(pid, 9)
sys.exit("the forked node hung")
"""


@pytest.mark.slow  # a subprocess that imports torch and forks (a few seconds; 30 s if it hangs)
def test_a_node_in_a_worker_forked_from_a_multithreaded_process_does_not_hang():
    """GNU OpenMP hangs in a forked child's first multi-threaded region when the parent had a
    thread team (cg3d run from Python, as the tests do); the node's own thread count avoids it."""
    out = subprocess.run([sys.executable, "-c", FORKED_NODE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]

"""The one generic stage interface: traits from a stage's signature, records as files, one guard."""

from __future__ import annotations

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

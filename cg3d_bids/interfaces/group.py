"""nipype interfaces of the group stage (table, group report, subject reports)."""

from __future__ import annotations

import json

from nipype.interfaces.base import SimpleInterface, TraitedSpec, isdefined, traits

from .stages import _ConfigInputSpec, load_config, record_error


class _GroupInputSpec(_ConfigInputSpec):
    modality = traits.Str(mandatory=True)
    records = traits.Str(mandatory=True, desc="JSON list of image records, batch order")
    result_files = traits.List(traits.Str, mandatory=True)
    score_file = traits.Str(mandatory=True)
    provenance = traits.Str(mandatory=True)


class _PathOutputSpec(TraitedSpec):
    out_file = traits.Str()


class WriteGroupOutputs(SimpleInterface):
    """``group_<mod>.tsv``/``.json`` and ``group_<mod>.html``."""

    input_spec = _GroupInputSpec
    output_spec = _PathOutputSpec

    def _run_interface(self, runtime):
        from ..workflows.group import write_group_outputs

        try:
            self._results["out_file"] = write_group_outputs(
                json.loads(self.inputs.records), list(self.inputs.result_files), self.inputs.score_file,
                self.inputs.modality, load_config(self.inputs.config_file), json.loads(self.inputs.provenance),
            )
        except Exception as exc:
            record_error(self.inputs.config_file, exc, f"group-{self.inputs.modality}")
            raise
        return runtime


class _ReportsInputSpec(_ConfigInputSpec):
    group_files = traits.List(traits.Str, mandatory=True)
    provenance = traits.Str(mandatory=True)
    subjects = traits.List(traits.Str, desc="subject labels to report (default: all)")


class _ReportsOutputSpec(TraitedSpec):
    reports = traits.List(traits.Str)


class WriteSubjectReports(SimpleInterface):
    """``sub-<label>.html`` for every subject of the run."""

    input_spec = _ReportsInputSpec
    output_spec = _ReportsOutputSpec

    def _run_interface(self, runtime):
        from ..workflows.group import write_subject_reports

        subjects = list(self.inputs.subjects) if isdefined(self.inputs.subjects) else None
        try:
            self._results["reports"] = write_subject_reports(
                list(self.inputs.group_files), load_config(self.inputs.config_file),
                json.loads(self.inputs.provenance), subjects=subjects,
            )
        except Exception as exc:
            record_error(self.inputs.config_file, exc, "subject-reports")
            raise
        return runtime

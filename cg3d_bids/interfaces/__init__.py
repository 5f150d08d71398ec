"""nipype interfaces: one generic interface per stage, made by :func:`.stage.stage_interface`."""

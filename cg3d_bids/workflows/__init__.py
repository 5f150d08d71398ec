"""nipype workflow of cg3d and the plain stage functions its nodes call."""

"""Ahead-of-time compilation of the toolkit's programs for TPU topologies on any host: memory, FLOPs, collectives and
roofline reports (`python -m diffusion_gemma.aot`)."""

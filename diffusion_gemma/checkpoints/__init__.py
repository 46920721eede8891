"""Checkpoint I/O: HuggingFace safetensors <-> our parameter tree."""

"""Checkpoint I/O: HuggingFace safetensors <-> our parameter tree <-> Orbax checkpoints.

  hf_config.py        HuggingFace config.json <-> ModelConfig, exact both ways
  hf_keys.py          the one table between HF tensor names and `nnx.state(model)` paths (+ layout transforms)
  safetensors_dir.py  read HF directories tensor by tensor (any dtype, validated headers), write shards streamed
  hf.py               `load_hf`: an HF directory straight into a model, optionally sharded over a mesh
  orbax_io.py         our checkpoint layout; streamed Orbax writes; `restore_params` / `load_model` onto a mesh
  streaming.py        `import_hf` (HF -> ours), `save_model` (in-memory model -> ours), progress
  export.py           `export_hf` (ours -> HF, LoRA merge), `export_model` (in-memory model -> HF)
  loading.py          `load`: a model for inference from an HF directory or any of our checkpoints (LoRA merged)

The CLI over these is `python -m diffusion_gemma.convert {import-hf, export-hf}`.
"""

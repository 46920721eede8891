"""`python -m diffusion_gemma.convert`: HuggingFace safetensors <-> our Orbax checkpoints, streamed.

    python -m diffusion_gemma.convert import-hf --hf_dir=DIR --output=CKPT [--dtype=bfloat16|float32]
    python -m diffusion_gemma.convert export-hf --checkpoint=CKPT --output=DIR [--base_hf_dir=DIR]
        [--merge_lora] [--max_shard_size=5GB] [--dtype=bfloat16|float32]

Both refuse an existing output unless --overwrite, and write into a temporary sibling renamed at the end.
The checkpoint layout is described in `diffusion_gemma/checkpoints/orbax_io.py`.
"""

from __future__ import annotations

from absl import flags

from diffusion_gemma import cli
from diffusion_gemma.config import DTYPES, ConfigError

_HF_DIR = flags.DEFINE_string("hf_dir", None,
                              "import-hf: HuggingFace directory (model.safetensors, or shards + index).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "export-hf: our checkpoint (or a CheckpointManager root).")
_OUTPUT = flags.DEFINE_string("output", None, "Output directory (refused if it exists, unless --overwrite).")
_DTYPE = flags.DEFINE_enum("dtype", None, list(DTYPES),
                           "Text tensor dtype. import-hf default: as stored; export-hf default: each tensor's "
                           "dtype in the original HF checkpoint, else the dtype its config.json declares, else as "
                           "stored.")
_BASE_HF_DIR = flags.DEFINE_string("base_hf_dir", None,
                                   "export-hf: HuggingFace directory (or checkpoint) supplying config.json, the vision "
                                   "tower and tokenizer files instead of the checkpoint's hf/ passthrough.")
_MERGE_LORA = flags.DEFINE_bool("merge_lora", False, "export-hf: merge LoRA adapters into the base weights.")
_MAX_SHARD_SIZE = flags.DEFINE_string("max_shard_size", "5GB",
                                      "export-hf: largest safetensors shard (5GB, 500MB, ...).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing output.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")

_COMMANDS = {
    "import-hf": ({"hf_dir", "output"}, {"dtype", "overwrite", "progress"}),
    "export-hf": ({"checkpoint", "output"}, {"base_hf_dir", "merge_lora", "max_shard_size", "dtype", "overwrite",
                                             "progress"}),
}


def _check_flags(command: str) -> None:
    required, optional = _COMMANDS[command]
    for name in sorted(required):
        if flags.FLAGS[name].value is None:
            raise cli.UsageError(f"{command} needs --{name}")
    for name in sorted(set().union(*(r | o for r, o in _COMMANDS.values())) - required - optional):
        if flags.FLAGS[name].present:
            raise cli.UsageError(f"--{name} does not apply to {command}")


def main(argv):
    if len(argv) != 2 or argv[1] not in _COMMANDS:
        typo = cli.did_you_mean(argv[1], _COMMANDS) if len(argv) == 2 else ""
        raise cli.UsageError(f"expected one sub-command, {' or '.join(_COMMANDS)}; got {argv[1:]}{typo}")
    command = argv[1]
    _check_flags(command)
    # Imported here so that `--help` and usage errors do not pay for JAX and Orbax.
    from diffusion_gemma.checkpoints.safetensors_dir import CheckpointError

    try:
        if command == "import-hf":
            from diffusion_gemma.checkpoints.streaming import import_hf

            summary = import_hf(_HF_DIR.value, _OUTPUT.value, dtype=_DTYPE.value, overwrite=_OVERWRITE.value,
                                progress=_PROGRESS.value)
        else:
            from diffusion_gemma.checkpoints.export import export_hf

            summary = export_hf(_CHECKPOINT.value, _OUTPUT.value, base_hf_dir=_BASE_HF_DIR.value,
                                merge_lora=_MERGE_LORA.value, max_shard_size=_MAX_SHARD_SIZE.value, dtype=_DTYPE.value,
                                overwrite=_OVERWRITE.value, progress=_PROGRESS.value)
    except (CheckpointError, ConfigError, OSError, ValueError) as err:
        raise cli.UserError(f"{command}: {cli.message_of(err)}") from err
    print(f"{command}: wrote {summary.output} ({summary.tensor_bytes / 1e6:,.1f} MB of tensors in "
          f"{summary.seconds:.1f} s, {summary.megabytes_per_second:,.0f} MB/s)")


if __name__ == "__main__":
    cli.run_absl("convert", main)

"""`python -m diffusion_gemma.aot --config=configs/NAME.py[:variant] --topology=v5p-16`: compile a run's training
step (and, with --programs=train,sampler, the sampler's encode and denoising forward) for a TPU slice on this host,
without the hardware, and report per device: memory against the chip's HBM, FLOPs, HBM traffic, collectives and
the roofline lower bound on the step time.

  python -m diffusion_gemma.aot --config=configs/gsm8k_sft.py --topology=v5p-16 --output=report.json
  python -m diffusion_gemma.aot --config=configs/gsm8k_lora.py --topology=v6e-8 --config.lora.rank=8 --find_max_batch
  python -m diffusion_gemma.aot --config=configs/gsm8k_lora.py --topology=v6e-8 --programs=sampler \\
      --sampler_batch_sizes=1,8,64

The config is the trainer's own (`--config.x=...` overrides work as in `train`); the run's data is not read (only
`data.seq_length`, `data.block_size` and `data.global_batch_size` shape the batch) and initial weights are not
loaded (their config.json is, for the shapes). Needs libtpu: `pip install -e ".[tpu]"`.
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from diffusion_gemma import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file (path.py[:variant]).",
                                          lock_config=False)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice: an accelerator type (v5p-16, v6e-8) or JAX's chip grid "
                                "(v6e:2x4, v5p:2x2x2).")
_PROGRAMS = flags.DEFINE_list("programs", ["train"], "Which programs to compile: train, sampler.")
_SAMPLER_BATCHES = flags.DEFINE_list("sampler_batch_sizes", ["1", "8", "64"], "Batch sizes of the sampler programs.")
_PROMPT = flags.DEFINE_integer("prompt_length", 0, "Prompt tokens the sampler encodes (0: data.seq_length).")
_FIND_MAX_BATCH = flags.DEFINE_bool("find_max_batch", False, "Also search the largest global batch whose training "
                                    "step fits the chip (a few more compiles).")
_MAX_PROBES = flags.DEFINE_integer("max_probes", 6, "Compiles the batch search may spend.")
_MAX_BATCH_BY = flags.DEFINE_enum("max_batch_by", "peak", ["peak", "sum"], "What the batch search holds against "
                                  "HBM: XLA's peak (buffers by live range; what the compiler checks) or the sum of "
                                  "the buffers (all live at once: a conservative margin).")
_OUTPUT = flags.DEFINE_string("output", None, "Write the report here as JSON.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --output file.")
_HLO_DIR = flags.DEFINE_string("hlo_dir", None, "Also keep each compiled program's HLO text here (gzipped).")

PROG = "aot"
PROGRAMS = ("train", "sampler")


def main(argv) -> int:
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments {argv[1:]} (flags are --name=value)")
    if _CONFIG.value is None:
        raise cli.UsageError("--config=FILE[:variant] is required")
    if not _TOPOLOGY.value:
        raise cli.UsageError("--topology is required (e.g. v5p-16, v6e-8 or v6e:2x4)")
    unknown = [name for name in _PROGRAMS.value if name not in PROGRAMS]
    if unknown:
        raise cli.UsageError(f"--programs: unknown {unknown} (valid: {', '.join(PROGRAMS)})")
    try:
        sampler_batches = [int(size) for size in _SAMPLER_BATCHES.value]
    except ValueError:
        raise cli.UsageError(f"--sampler_batch_sizes: expected integers, got {_SAMPLER_BATCHES.value}") from None
    from diffusion_gemma import atomic_write
    from diffusion_gemma.aot import topology as topology_lib

    if _OUTPUT.value:
        try:
            atomic_write.check_new(_OUTPUT.value, overwrite=_OVERWRITE.value)
        except (OSError, ValueError) as err:
            raise cli.UserError(cli.message_of(err)) from None
    try:
        topology = topology_lib.parse(_TOPOLOGY.value)
    except topology_lib.TopologyError as err:
        raise cli.UsageError(str(err)) from None
    topology_lib.prepare_environment(topology)
    config_arg = config_flags.get_config_filename(flags.FLAGS["config"])
    config = _train_config(_CONFIG.value, config_arg)
    try:
        topology_lib.check_libtpu()
    except topology_lib.TopologyError as err:
        raise cli.UserError(str(err)) from None
    from diffusion_gemma.aot import run

    result = run.compile_and_report(config, topology, programs=_PROGRAMS.value, sampler_batch_sizes=sampler_batches,
                                    prompt_length=_PROMPT.value or config.data.seq_length,
                                    find_max_batch=_FIND_MAX_BATCH.value, max_probes=_MAX_PROBES.value,
                                    config_name=config_arg, log=lambda line: print(line, flush=True),
                                    hlo_dir=_HLO_DIR.value, max_batch_by=_MAX_BATCH_BY.value)
    if _OUTPUT.value:
        atomic_write.write_json(_OUTPUT.value, result, overwrite=_OVERWRITE.value)
        print(f"wrote {_OUTPUT.value}")
    return 0


def _train_config(config_dict, config_arg: str):
    """The run's TrainConfig with its data source replaced by shapes alone: the compile reads no data, so a chat
    file or tokenizer the config names need not exist here."""
    from diffusion_gemma.training.config import TrainConfigError, from_config_dict

    config_dict = config_dict.copy_and_resolve_references()
    with config_dict.unlocked():
        config_dict.data.source = "synthetic"
        config_dict.data.path = ""
        config_dict.data.tokenizer = ""
        config_dict.data.options = {}
    try:
        return from_config_dict(config_dict)
    except TrainConfigError as err:
        raise cli.UsageError(f"--config={config_arg}: {err}") from None


def user_errors() -> tuple[type[BaseException], ...]:
    from diffusion_gemma.aot.topology import TopologyError
    from diffusion_gemma.config import ConfigError
    from diffusion_gemma.sharding import ShardingError
    from diffusion_gemma.training.config import TrainConfigError

    return ConfigError, ShardingError, TrainConfigError, TopologyError, OSError


if __name__ == "__main__":
    from diffusion_gemma.aot.topology import prepare_environment

    prepare_environment()
    cli.run_absl(PROG, main, user_errors=user_errors())
    sys.exit(0)

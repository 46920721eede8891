"""Shared pieces of the training / sampler / compile-time benchmarks (not a benchmark itself).

Model presets, the synthetic SFT batch, the jitted training step exactly as the trainer builds it, model-FLOP
counts, machine / library headers and timing; results are written with `diffusion_gemma.atomic_write`. Scripts
in this directory import it as `common` (Python puts the script's directory first on sys.path), so each stays
runnable from a fresh checkout as `python experiments/benchmarks/<name>.py`.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

# Running from a checkout without `pip install -e .`: make the package importable.
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:
    sys.path.insert(1, _REPO)

# Each benchmark model: a library preset (`diffusion_gemma.registry.MODEL_PRESETS`) and the widths a benchmark
# changes on top of it; `--layers` picks the depth (default pattern: 5 sliding : 1 full, last layer full).
PRESETS = {
    "tiny": ("tiny", {}),  # the test-suite model: hidden 64, vocab 256, 8 experts top-2
    # tiny's layout at widths a CPU still trains in seconds (13 M parameters at 6 layers): hidden 256, vocab 16,384.
    "small": ("tiny", dict(vocab_size=16384, hidden_size=256, intermediate_size=512, head_dim=64, global_head_dim=128,
                           sliding_window=128, moe_intermediate_size=128)),
    "released": ("gemma4_26b_a4b", {}),  # the released 26B-A4B per-layer shapes, any depth
}
TINY_VISION = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=2, head_dim=8)
# Peak HBM bandwidth (bytes/s) for the memory-bandwidth floor: H100 SXM5 (HBM3) and H200 (HBM3e).
PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.04e12}


def train_config(preset: str, layers: int, *, canvas: int = 256, lora: bool = False, **model_overrides):
    """The trainer's config of a benchmark model, everything else at the trainer's defaults: its optimizer (over
    1000 steps), its objective (two-pass self-conditioning, AR weight 1), the router frozen in full SFT, LoRA at
    the default rank, alpha and targets; seed 0, one device. `model_overrides`: ModelConfig fields."""
    from diffusion_gemma.training.config import LoraSection, ModelSection, TrainConfig
    from diffusion_gemma.data.pipeline import DataConfig
    from diffusion_gemma.sharding import MeshConfig

    base, widths = PRESETS[preset]
    section = {name: model_overrides.pop(name) for name in ("dtype", "param_dtype", "remat") if name in model_overrides}
    overrides = {**widths, "num_layers": layers, "canvas_length": canvas, "max_position_embeddings": 262_144,
                 **model_overrides}
    return TrainConfig(seed=0, num_steps=1000, model=ModelSection(preset=base, overrides=overrides, **section),
                       lora=LoraSection(enabled=lora), data=DataConfig(block_size=canvas),
                       mesh=MeshConfig(data=1, expert=1))


def model_config(preset: str, layers: int, *, canvas: int = 256, **overrides):
    """The ModelConfig of `train_config(...)`."""
    from diffusion_gemma.training import setup

    return setup.model_config_for(train_config(preset, layers, canvas=canvas, **overrides))


def hf_config(config, canvas: int):
    """The transformers `DiffusionGemmaConfig` of one of our ModelConfigs (tiny vision tower, never run)."""
    from transformers import DiffusionGemmaConfig

    from diffusion_gemma.checkpoints.hf_config import text_config_to_hf

    text = text_config_to_hf(config)
    return DiffusionGemmaConfig(text_config=text, vision_config=dict(TINY_VISION), canvas_length=canvas)


def synthetic_batch(config, *, batch: int, prompt: int, canvas: int, seed: int = 0) -> dict:
    """SFT rows of prompt + one canvas block of response (all attended, response supervised), as numpy arrays
    with the pipeline's feature names and dtypes. Token ids avoid pad/eos/bos."""
    import numpy as np

    rng = np.random.default_rng(seed)
    length = prompt + canvas
    supervised = np.zeros((batch, length), bool)
    supervised[:, prompt:] = True
    return dict(input_ids=rng.integers(3, config.vocab_size, size=(batch, length)).astype(np.int32),
                attention_mask=np.ones((batch, length), bool), supervised_mask=supervised,
                response_start=np.full((batch,), prompt, np.int32), example_index=np.arange(batch, dtype=np.int32))


# ------------------------------------------------------------------------------------------ the JAX train step
def build_train_step(config, *, abstract: bool = False):
    """The trainer's own set-up and jitted step (`training.setup.build`, `training.step.jit_train_step`) for
    `config` (a `train_config(...)`) on the first device. Returns (jitted step, (trainable, rest, opt_state),
    mesh). With `abstract`, the state is `jax.ShapeDtypeStruct`s only (nothing allocated): for
    `.lower(...).compile()`."""
    import jax

    from diffusion_gemma import sharding
    from diffusion_gemma.training import setup, step

    mesh = sharding.make_mesh(config.mesh, [jax.devices()[0]])
    built = setup.build(config, mesh, abstract=abstract)
    state = built.state
    return step.jit_train_step(built), (state.trainable, state.rest, state.opt_state), mesh


def batch_structs(batch: dict) -> dict:
    import jax

    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}


def count_params(tree) -> int:
    import jax

    return int(sum(x.size for x in jax.tree.leaves(tree)))


def tree_bytes(tree) -> int:
    import jax
    import numpy as np

    return int(sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


# ------------------------------------------------------------------------------------------------- FLOP counts
def lm_head_flops_per_token(config, *, prompt_tokens: float, canvas_tokens: float, lora: bool) -> float:
    """The LM-head share of `metrics.train_flops_per_token` (same accounting: the tied [D, V] head on every
    encoder token for the AR loss, on the canvas in both decoder passes)."""
    backward = 2.0 if lora else 3.0
    per_sequence = 2 * config.hidden_size * config.vocab_size * (prompt_tokens * backward
                                                                 + canvas_tokens * (1 + backward))
    return per_sequence / max(prompt_tokens + canvas_tokens, 1)


def train_flops(config, *, sequence: int, canvas: int, lora: bool) -> dict[str, float]:
    """Model FLOPs per step token (= encoder token + canvas token, the trainer's count), with and without the
    LM head, from `metrics.train_flops_per_token`: 2 x active parameters per token and pass over three stack
    passes (encoder over the row with backward, decoder pass 1 forward only, decoder pass 2 with backward;
    backward = 2x forward, 1x for LoRA, which computes no frozen-weight gradients)."""
    from diffusion_gemma.training import metrics

    with_head = metrics.train_flops_per_token(config, prompt_tokens=sequence, canvas_tokens=canvas, lora=lora)
    head = lm_head_flops_per_token(config, prompt_tokens=sequence, canvas_tokens=canvas, lora=lora)
    return {"with_lm_head": with_head, "without_lm_head": with_head - head}


def sampler_forward_weight_bytes(config, bytes_per_param: int) -> int:
    """Bytes of text weights one denoising forward must read: every parameter (at batch x canvas >= 256 x top-8
    assignments nearly every expert of every layer is hit), the tied embedding once as the LM head."""
    from flax import nnx

    from diffusion_gemma.model.transformer import DiffusionGemma

    abstract = nnx.eval_shape(lambda: DiffusionGemma(config, rngs=nnx.Rngs(0)))
    return count_params(nnx.state(abstract, nnx.Param)) * bytes_per_param


# --------------------------------------------------------------------------------------------- environment
def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def environment() -> dict[str, Any]:
    """Machine and library versions (imports only what is already imported or cheap)."""
    out: dict[str, Any] = dict(host=platform.node(), machine=platform.machine(), processor=_cpu_name(),
                               cpus=os.cpu_count(), python=platform.python_version(), load_average=load_average())
    try:
        with open("/proc/meminfo") as f:
            out["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    for name in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "numpy"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "?")
        except ImportError:
            out[name] = None
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def select_grouped_matmul(name: str) -> None:
    """Benchmark-only A/B switch: 'ragged_dot' makes the MoE call jax.lax.ragged_dot on every backend (the
    library's default, 'auto', runs its segment scan on CPU)."""
    if name == "ragged_dot":
        import jax

        from diffusion_gemma.model import moe_ops

        moe_ops.grouped_matmul = jax.lax.ragged_dot


def set_cpu_threads(threads: int) -> None:
    """Before JAX / torch start their thread pools: use `threads` cores (0 = library defaults). The process is
    pinned to the first `threads` cores it may use (XLA:CPU also runs independent thunks concurrently, which its
    intra-op flag does not limit), and XLA's intra-op parallelism is set to match; torch gets
    `torch.set_num_threads` from the caller. Pinned and single-threaded, process CPU time is the work done."""
    if threads:
        try:
            os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
        except (AttributeError, OSError):
            pass
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                   f"intra_op_parallelism_threads={threads}").strip()


# ---------------------------------------------------------------------------------------------- timing, output
def median_seconds(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    seconds = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - began)
    return statistics.median(seconds), seconds


def time_calls(fn: Callable[[], Any], repeats: int) -> dict[str, Any]:
    """Median wall seconds and median process CPU seconds (all threads) of `repeats` calls. On a shared machine
    the CPU seconds of a single-threaded run are the steadier number: other jobs stretch the wall time, not the
    work."""
    wall, cpu = [], []
    for _ in range(repeats):
        began, began_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - began)
        cpu.append(time.process_time() - began_cpu)
    return dict(wall_s=statistics.median(wall), cpu_s=statistics.median(cpu), wall_s_all=wall, cpu_s_all=cpu)


def run_worker(script: str, argv: list[str], worker: str, timeout: float | None = None) -> dict[str, Any]:
    """`python script *argv --_worker=worker --_result=FILE` in a fresh process (its own compiler state and
    peak memory) -> the JSON it wrote, with its peak RSS (wait4), wall and CPU seconds; or, when it timed out,
    died or failed, {"error": why}."""
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "result.json")
        began = time.perf_counter()
        process = subprocess.Popen([sys.executable, os.path.abspath(script), *argv, f"--_worker={worker}",
                                    f"--_result={result_path}"])
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if timeout is not None and time.perf_counter() - began > timeout:
                process.kill()
                os.wait4(process.pid, 0)
                return dict(error=f"timeout after {timeout:.0f} s")
            time.sleep(0.2)
        code = os.waitstatus_to_exitcode(status)
        measured = dict(peak_rss_bytes=usage.ru_maxrss * 1024, wall_s=time.perf_counter() - began)  # KiB on Linux
        if code != 0 or not os.path.exists(result_path):
            reason = f"killed by signal {-code} (out of memory?)" if code < 0 else f"exit status {code}"
            return dict(error=reason, **measured)
        with open(result_path) as f:
            return dict(json.load(f), **measured, cpu_s=usage.ru_utime + usage.ru_stime)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {'/'.join(str(x) for x in load_average()[:1])}] {message}",
          file=sys.stderr, flush=True)

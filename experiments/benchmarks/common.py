"""Shared pieces of the training / sampler / compile-time benchmarks (not a benchmark itself).

Model presets, the synthetic SFT batch, the jitted training step exactly as the trainer builds it, model-FLOP
counts, machine / library headers, timing and atomic JSON output. Scripts in this directory import it as
`common` (Python puts the script's directory first on sys.path), so each stays runnable from a fresh checkout
as `python experiments/benchmarks/<name>.py`.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

# Running from a checkout without `pip install -e .`: make the package importable.
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:
    sys.path.insert(1, _REPO)

# Model widths of each preset; `--layers` picks the depth (default pattern: 5 sliding : 1 full, last layer full).
PRESETS = {
    # ModelConfig.tiny(): the test-suite model (hidden 64, vocab 256, 8 experts top-2).
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_heads=4, head_dim=16, num_kv_heads=2,
                 global_head_dim=32, num_global_kv_heads=1, sliding_window=8, num_experts=8, top_k=2,
                 moe_intermediate_size=32),
    # The CPU preset of generate.py (13 M parameters at 6 layers): hidden 256, vocab 16,384, 8 experts top-2.
    "small": dict(vocab_size=16384, hidden_size=256, intermediate_size=512, num_heads=4, head_dim=64,
                  num_kv_heads=2, global_head_dim=128, num_global_kv_heads=1, sliding_window=128, num_experts=8,
                  top_k=2, moe_intermediate_size=128),
    # The released 26B-A4B per-layer shapes (ModelConfig.gemma4_26b_a4b), any depth.
    "released": dict(vocab_size=262_144, hidden_size=2816, intermediate_size=2112, num_heads=16, head_dim=256,
                     num_kv_heads=8, global_head_dim=512, num_global_kv_heads=2, sliding_window=1024,
                     num_experts=128, top_k=8, moe_intermediate_size=704),
}
TINY_VISION = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=2, head_dim=8)
# Peak HBM bandwidth (bytes/s) for the memory-bandwidth floor: H100 SXM5 (HBM3) and H200 (HBM3e).
PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.04e12}


def model_config(preset: str, layers: int, *, canvas: int = 256, **overrides):
    from diffusion_gemma.config import ModelConfig

    kwargs = dict(PRESETS[preset], num_layers=layers, canvas_length=canvas, max_position_embeddings=262_144)
    kwargs.update(overrides)
    return ModelConfig.build(**kwargs)


def hf_config(config, canvas: int):
    """The transformers `DiffusionGemmaConfig` of one of our ModelConfigs (tiny vision tower, never run)."""
    from transformers import DiffusionGemmaConfig

    text = config.to_hf_text_config()
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
def build_train_step(config, *, lora: bool, canvas: int, abstract: bool = False, seed: int = 0,
                     lora_rank: int = 16, lora_alpha: float = 32.0, num_steps: int = 1000):
    """The training step the trainer jits (`trainer.make_train_step`), with the trainer's optimizer, objective
    settings (two-pass self-conditioning, AR weight 1, router frozen in full SFT) and trainable filter, on a
    one-device mesh. Returns (jitted step, (trainable, rest, opt_state), mesh). With `abstract`, the state is
    `jax.ShapeDtypeStruct`s only (nothing allocated): for `.lower(...).compile()`."""
    import jax
    from flax import nnx

    from diffusion_gemma import sharding
    from diffusion_gemma.objective import sft as objective
    from diffusion_gemma.objective.corruption import CorruptionSettings
    from diffusion_gemma.model.transformer import DiffusionGemma
    from diffusion_gemma.training import checkpointing, lora as lora_lib, optimizer as opt_lib, trainer

    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, expert=1), [jax.devices()[0]])

    def make_model():
        model = DiffusionGemma(config, rngs=nnx.Rngs(seed))
        if lora:
            lora_lib.apply_lora(model, lora_lib.LoraConfig(rank=lora_rank, alpha=lora_alpha), nnx.Rngs(seed + 1))
        return model

    optimizer_config = opt_lib.OptimizerConfig()
    tx = opt_lib.make_optimizer(optimizer_config, num_steps)
    schedule = opt_lib.learning_rate_schedule(optimizer_config, num_steps)
    settings = objective.ObjectiveSettings(block_size=canvas, corruption=CorruptionSettings(eps=1e-3),
                                           self_conditioning_probability=0.5, ar_weight=1.0, freeze_router=not lora)
    with jax.set_mesh(mesh):
        if abstract:
            model = nnx.eval_shape(make_model)
        else:
            model = sharding.init_sharded(make_model, mesh)
        graphdef, trainable_state, rest_state = nnx.split(model, opt_lib.trainable_filter(lora, True), ...)
        trainable = checkpointing.state_to_tree(trainable_state)
        rest = checkpointing.state_to_tree(rest_state)
        as_struct = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)  # noqa: E731
        trainable_template = jax.tree.map(as_struct, trainable_state)
        rest_template = jax.tree.map(as_struct, rest_state)
        opt_state = jax.eval_shape(tx.init, trainable) if abstract else jax.jit(tx.init)(trainable)
        step_fn = jax.jit(trainer.make_train_step(graphdef, trainable_template, rest_template, tx, settings, 1,
                                                  schedule), donate_argnums=(0, 2))
    return step_fn, (trainable, rest, opt_state), mesh


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

        from diffusion_gemma.model import moe

        moe.grouped_matmul = jax.lax.ragged_dot


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


def write_json_atomic(path: str, payload: Any) -> None:
    """Write to a temporary sibling, fsync, rename: a reader never sees a half-written file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {'/'.join(str(x) for x in load_average()[:1])}] {message}",
          file=sys.stderr, flush=True)

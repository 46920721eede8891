"""A/B of the CPU performance levers on the training step, interleaved in one process.

    python experiments/benchmarks/levers.py --preset=small --prompt=128 --canvas=128 --batch=4   # README table

Variants of the library, rebuilt in-process by swapping two functions before tracing (nothing else differs):
- `before`: the MoE's grouped matmul is `jax.lax.ragged_dot` on CPU too (XLA:CPU lowers it to one dense matmul
  over a [G, N, K] masked copy of the rows: G times the grouped work) and the MLP / LM-head / self-conditioning
  matmuls are batched einsums over [B, S, ...] (whose weight gradients XLA:CPU emits with a transposing copy).
- `segment`: + `diffusion_gemma.model.grouped_matmul` (on CPU a scan over (tile, group) segments, custom VJP).
- `segment+flat` (the library now): + `layers.token_matmul` (the same matmuls over flattened [B*S, ...] rows).

Each variant's step (the trainer's own, `training.step.jit_train_step`) is compiled once; then the variants take
turns, step by step, for `--rounds` rounds (the first is dropped), so slow phases of a shared machine hit them
alike. Reported: median process CPU seconds per step (single-threaded XLA:CPU, so CPU time is the work), XLA's
temp-buffer estimate, and the first losses (equal across variants up to float rounding).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from diffusion_gemma import atomic_write  # noqa: E402

VARIANTS = ("before", "segment", "segment+flat")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(common.PRESETS), default="small")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--canvas", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--mode", choices=("full", "lora"), default="full")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=5, help="steps per variant, taken in turns (first dropped)")
    parser.add_argument("--threads", type=int, default=1, help="XLA:CPU threads (CPU time is the work at 1)")
    parser.add_argument("--output", default=None, help="write the results here as JSON (atomically)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    common.set_cpu_threads(args.threads)
    import jax
    import jax.numpy as jnp

    from diffusion_gemma.model import layers, moe_ops

    library_token_matmul, library_grouped_matmul = layers.token_matmul, moe_ops.grouped_matmul

    def batched(x, kernel, spec):
        lhs, rest = spec.split(",")
        rhs, out = rest.split("->")
        return jnp.einsum(f"...{lhs},{rhs}->...{out}", x, kernel)

    swaps = {"before": (batched, jax.lax.ragged_dot), "segment": (batched, library_grouped_matmul),
             "segment+flat": (library_token_matmul, library_grouped_matmul)}
    config = common.model_config(args.preset, args.layers, canvas=args.canvas)
    train_config = common.train_config(args.preset, args.layers, canvas=args.canvas, lora=args.mode == "lora")
    batch_np = common.synthetic_batch(config, batch=args.batch, prompt=args.prompt, canvas=args.canvas)
    names = args.variants.split(",")
    compiled = {}
    for name in names:
        layers.token_matmul, moe_ops.grouped_matmul = swaps[name]
        common.log(f"levers: compiling {name}")
        step_fn, (trainable, rest, opt_state), mesh = common.build_train_step(train_config)
        with jax.set_mesh(mesh):
            batch = {k: jax.device_put(v) for k, v in batch_np.items()}
            began = time.process_time()
            executable = step_fn.lower(trainable, rest, opt_state, batch, jax.random.key(0),
                                       jnp.asarray(0, jnp.int32)).compile()
            compile_cpu_s = time.process_time() - began
        compiled[name] = dict(executable=executable, state=[trainable, opt_state], rest=rest, batch=batch, mesh=mesh,
                              temp_bytes=executable.memory_analysis().temp_size_in_bytes, compile_cpu_s=compile_cpu_s,
                              cpu_s=[], wall_s=[], losses=[])
    layers.token_matmul, moe_ops.grouped_matmul = library_token_matmul, library_grouped_matmul
    for round_index in range(args.rounds):
        for name in names:
            entry = compiled[name]
            with jax.set_mesh(entry["mesh"]):
                began, began_cpu = time.perf_counter(), time.process_time()
                trainable, opt_state, metrics = entry["executable"](entry["state"][0], entry["rest"], entry["state"][1],
                                                                    entry["batch"], jax.random.key(0),
                                                                    jnp.asarray(0, jnp.int32))
                jax.block_until_ready((trainable, opt_state, metrics))
                wall, cpu = time.perf_counter() - began, time.process_time() - began_cpu
            entry["state"] = [trainable, opt_state]
            entry["losses"].append(float(metrics["loss"]))
            if round_index:
                entry["wall_s"].append(wall)
                entry["cpu_s"].append(cpu)
        common.log(f"levers: round {round_index + 1}/{args.rounds} done")
    rows = []
    base = statistics.median(compiled[names[0]]["cpu_s"])
    print(f"\npreset {args.preset} x {args.layers} layers, {args.mode}, prompt {args.prompt} + canvas {args.canvas}, "
          f"batch {args.batch}, threads {args.threads}; load average {common.load_average()}\n")
    print(f"| variant | CPU s / step (median) | vs {names[0]} | XLA temp (MB) | first losses |")
    print("|---|---|---|---|---|")
    for name in names:
        entry = compiled[name]
        cpu = statistics.median(entry["cpu_s"])
        rows.append(dict(variant=name, cpu_s=cpu, cpu_s_all=entry["cpu_s"], wall_s_all=entry["wall_s"],
                         temp_bytes=entry["temp_bytes"], compile_cpu_s=entry["compile_cpu_s"], losses=entry["losses"]))
        print(f"| {name} | {cpu:.3f} | {base / cpu:.2f}x | {entry['temp_bytes'] / 1e6:.0f} | "
              f"{', '.join(f'{x:.5f}' for x in entry['losses'][:3])} |")
    if args.output:
        atomic_write.write_json(args.output, dict(args=vars(args), environment=common.environment(), rows=rows),
                                overwrite=True)
        print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()

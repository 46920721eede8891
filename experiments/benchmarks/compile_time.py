"""Compile time of the training step against depth: the layers are scanned over the repeats of the 6-layer
(5 sliding : 1 full) pattern, so 30 layers should compile about as fast as 6.

    python experiments/benchmarks/compile_time.py --preset=tiny --layers=6,12,30          # CPU (README table)
    python experiments/benchmarks/compile_time.py --preset=released --layers=6,30 --dtype=bfloat16 \\
        --param_dtype=bfloat16 --prompt=256 --canvas=256 --batch=8                     # released widths

Nothing is allocated: the model and optimizer state are `jax.ShapeDtypeStruct`s (`nnx.eval_shape`), and the step
(the trainer's own, `training.step.jit_train_step`, as in train_step.py) is `.lower(abstract args).compile()`d, so
the released widths compile on a laptop. Reported per depth and mode (full SFT, LoRA): tracing + lowering time,
XLA compile time, their sum, the HLO size, XLA's estimate of the step's buffers, and the load average. Each depth
runs in a fresh subprocess (no cache shared between them; the persistent compilation cache is not enabled).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from diffusion_gemma import atomic_write  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(common.PRESETS), default="tiny")
    parser.add_argument("--layers", default="6,30", help="comma-separated depths (multiples of 6 keep the pattern)")
    parser.add_argument("--modes", default="full,lora")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--canvas", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--param_dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--remat", default="none")
    parser.add_argument("--moe_impl", default="grouped")
    parser.add_argument("--repeats", type=int, default=1, help="fresh subprocesses per point (median reported)")
    parser.add_argument("--threads", type=int, default=0, help="XLA:CPU threads (0: default)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per subprocess (default: none)")
    parser.add_argument("--output", default=None, help="write the results here as JSON (atomically)")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_result", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def worker(args, layers: int, mode: str) -> dict:
    common.set_cpu_threads(args.threads)
    import jax
    import jax.numpy as jnp

    model_args = dict(canvas=args.canvas, dtype=args.dtype, param_dtype=args.param_dtype, remat=args.remat,
                      moe_impl=args.moe_impl)
    config = common.model_config(args.preset, layers, **model_args)
    batch = common.batch_structs(common.synthetic_batch(config, batch=args.batch, prompt=args.prompt,
                                                        canvas=args.canvas))
    began = time.perf_counter()
    step_fn, (trainable, rest, opt_state), mesh = common.build_train_step(
        common.train_config(args.preset, layers, lora=mode == "lora", **model_args), abstract=True)
    build_s = time.perf_counter() - began
    load_before = common.load_average()
    with jax.set_mesh(mesh):
        rng = jax.eval_shape(lambda: jax.random.key(0))
        step = jax.ShapeDtypeStruct((), jnp.int32)
        began, began_cpu = time.perf_counter(), time.process_time()
        lowered = step_fn.lower(trainable, rest, opt_state, batch, rng, step)
        lower_s, lower_cpu_s = time.perf_counter() - began, time.process_time() - began_cpu
        began, began_cpu = time.perf_counter(), time.process_time()
        compiled = lowered.compile()
        compile_s, compile_cpu_s = time.perf_counter() - began, time.process_time() - began_cpu
    memory = compiled.memory_analysis()
    return dict(layers=layers, mode=mode, scan_period=config.scan_period, scan_repeats=config.scan_repeats,
                build_s=build_s, lower_s=lower_s, compile_s=compile_s, total_s=lower_s + compile_s,
                lower_cpu_s=lower_cpu_s, compile_cpu_s=compile_cpu_s, total_cpu_s=lower_cpu_s + compile_cpu_s,
                stablehlo_chars=len(lowered.as_text()), params=common.count_params((trainable, rest)),
                xla_buffers_bytes=(memory.argument_size_in_bytes + memory.output_size_in_bytes
                                   + memory.temp_size_in_bytes - memory.alias_size_in_bytes) if memory else None,
                xla_temp_bytes=memory.temp_size_in_bytes if memory else None,
                load_average_before=load_before, load_average_after=common.load_average(),
                backend=jax.default_backend())


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args._worker:
        layers, mode = args._worker.split(":")
        atomic_write.write_json(args._result, worker(args, int(layers), mode), overwrite=True)
        return
    base_argv = [a for a in argv if not a.startswith(("--output", "--_worker", "--_result"))]
    rows = []
    for layers in [int(x) for x in args.layers.split(",")]:
        for mode in args.modes.split(","):
            runs = []
            for repeat in range(args.repeats):
                common.log(f"compile: {mode} layers={layers} ({repeat + 1}/{args.repeats})")
                runs.append({"layers": layers, "mode": mode,
                             **common.run_worker(__file__, base_argv, f"{layers}:{mode}", args.timeout)})
                print(json.dumps(runs[-1]), flush=True)
            ok = [r for r in runs if "error" not in r]
            row = dict(ok[0] if ok else runs[0], repeats=runs)
            for key in ("lower_s", "compile_s", "total_s", "lower_cpu_s", "compile_cpu_s", "total_cpu_s"):
                if ok:
                    row[key] = statistics.median(r[key] for r in ok)
            rows.append(row)
    print(f"\npreset {args.preset}, prompt {args.prompt} + canvas {args.canvas}, batch {args.batch}, compute "
          f"{args.dtype}, params {args.param_dtype}, remat {args.remat}, moe {args.moe_impl}; median of "
          f"{args.repeats}\n")
    print("| layers | scan | mode | trace + lower (s) | XLA compile (s) | total wall (s) | total CPU (s) | "
          "StableHLO (k chars) | load avg |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['layers']} | | {r['mode']} | not run: {r['error']} | | | | | |")
            continue
        print(f"| {r['layers']} | {r['scan_repeats']} x {r['scan_period']} | {r['mode']} | {r['lower_s']:.1f} | "
              f"{r['compile_s']:.1f} | {r['total_s']:.1f} | {r['total_cpu_s']:.1f} | {r['stablehlo_chars'] / 1e3:.0f} | "
              f"{r['load_average_before'][0]} |")
    if args.output:
        atomic_write.write_json(args.output, dict(args={k: v for k, v in vars(args).items() if not k.startswith("_")},
                                                  environment=common.environment(), rows=rows), overwrite=True)
        print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()

"""Numerical parity on the device: our model against transformers' `DiffusionGemmaForBlockDiffusion`, both run in
float32 and in bfloat16 on the same accelerator, each judged against a float64 run of the reference.

    python experiments/benchmarks/parity.py --size=tiny --device=cpu       # a smoke run (seconds)
    python experiments/benchmarks/parity.py --output=parity_gpu.json       # the GPU run: size small, both dtypes

`tests/test_parity_hf.py` proves parity on the CPU in float32 only. This runs the same kind of check where the
benchmarks run: one random reference checkpoint (`tests/hf_reference.make_reference`: randomised norms, router
scales and untied layer scalars, so a loader that mixes them up fails) with every tensor rounded to bfloat16, so
that the float32 and the bfloat16 runs evaluate the same function and the float64 run is the exact answer for
both. For each dtype, ours (`load_hf(dtype)`, jitted full call: encoder over the prompt, decoder over a canvas
with self-conditioning logits) and the reference (`from_pretrained(dtype)`, sdpa attention) on the device, and
the reference's float64 twin (`hf_reference.float64_twin`, every op in float64) on the CPU. Per output (canvas
logits; encoder hidden states): rms(ours - float64) <= 4 x rms(reference - float64) + 4 ulps of the dtype x
rms(value), the test suite's rule with the reference in the same dtype on the same device as the yardstick.
Float32 runs with full-precision matmuls on both sides (JAX's default on GPU would be TF32; torch's float32
matmuls are full precision by default). The prompt is longer than the sliding window, so both attention kinds
see masked keys.

Two layers (one sliding, one full): random models of this family amplify rounding steeply with depth (scale-1
attention over normed queries and keys, post-norms that make every branch O(1), top-k routing), so at six
layers a bfloat16 run of either implementation is as far from float64 as the values are large, and the
comparison would say nothing.

Writes every error, bound and verdict to `--output`; exits 1 when an output is out of bounds (after writing).
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import tempfile
import time

# Ours and the reference share the device in this one process: JAX must not take 75% of it up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(_HERE)), "tests"))  # hf_reference
import common  # noqa: E402
from diffusion_gemma import atomic_write  # noqa: E402

SPREAD_FACTOR = 4.0  # the parity tests' rule (tests/test_parity_hf.py)
FLOOR_ULPS = 4.0
# Reference checkpoints (keyword arguments of hf_reference.make_reference) and their prompt / canvas lengths.
SIZES = {
    # hf_reference's default widths (hidden 32, window 4, vocab 128, 6 experts top-2) at two layers [s f].
    "tiny": dict(model=dict(layers=2), prompt=13, canvas=8),
    # Wider, with a 16,384-token vocabulary and 16 experts top-4: dot lengths where bfloat16 rounding shows.
    "small": dict(model=dict(layers=2, hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=2,
                             head_dim=32, global_head_dim=64, num_global_kv_heads=1, vocab_size=16384,
                             num_experts=16, top_k=4, moe_intermediate_size=128, sliding_window=32,
                             canvas_length=64, max_position_embeddings=1024),
                  prompt=96, canvas=64),
}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"),
                        help="auto: JAX's default backend and cuda for torch when available, else the CPU")
    parser.add_argument("--attn", default="sdpa", help="reference: attn_implementation")
    parser.add_argument("--output", default=None, help="write the results here as JSON (atomically)")
    return parser.parse_args(argv)


def _rms(x) -> float:
    import numpy as np

    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def judge(actual, reference, exact, eps: float) -> dict:
    """One output: errors of ours and of the same-dtype reference against float64, the bound and the verdict."""
    import numpy as np

    ours, theirs, scale = _rms(actual - exact), _rms(reference - exact), _rms(exact)
    bound = SPREAD_FACTOR * theirs + FLOOR_ULPS * eps * scale
    return dict(ours_rms=ours, reference_rms=theirs, value_rms=scale, bound=bound, ratio_to_bound=ours / bound,
                ours_max=float(np.abs(actual - exact).max()), reference_max=float(np.abs(reference - exact).max()),
                finite=bool(np.isfinite(actual).all()), passed=bool(np.isfinite(actual).all() and ours <= bound))


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import jax.numpy as jnp
    import ml_dtypes
    import numpy as np
    import torch
    from flax import nnx
    from transformers import DiffusionGemmaForBlockDiffusion

    import hf_reference
    from diffusion_gemma.checkpoints.hf import load_hf

    torch.set_num_threads(os.cpu_count() or 1)  # hf_reference pins one thread (for the test suite's tiny models)
    torch_device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    size = SIZES[args.size]
    rng = np.random.default_rng(args.seed)
    workdir = tempfile.mkdtemp(prefix="parity_")
    common.log(f"building the {args.size} reference checkpoint")
    reference, hf_dir = hf_reference.make_reference(os.path.join(workdir, "ref"), seed=args.seed,
                                                    attn_implementation=args.attn, **size["model"])
    with torch.no_grad():
        for tensor in reference.state_dict().values():  # parameters and saved buffers, in place
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(torch.bfloat16).to(tensor.dtype))
    reference.save_pretrained(hf_dir)
    vocab = reference.config.text_config.vocab_size
    prompt = rng.integers(0, vocab, size=(args.batch, size["prompt"])).astype(np.int32)
    canvas = rng.integers(0, vocab, size=(args.batch, size["canvas"])).astype(np.int32)
    # Self-conditioning logits that bfloat16 holds exactly, so every run sees the same values.
    sc_logits = (3.0 * rng.standard_normal((args.batch, size["canvas"], vocab))).astype(ml_dtypes.bfloat16)
    sc_logits = sc_logits.astype(np.float32)

    common.log("float64 reference (CPU)")
    twin = hf_reference.float64_twin(reference)
    with hf_reference.float64_mode():
        exact_logits, exact_hidden = hf_reference.reference_forward(twin, prompt, canvas,
                                                                    self_conditioning_logits=sc_logits)
    del reference, twin

    @functools.partial(jax.jit, static_argnums=0)
    def ours_forward(graphdef, state, input_ids, decoder_input_ids, sc):
        model = nnx.merge(graphdef, state)
        logits = model(input_ids, decoder_input_ids, self_conditioning_logits=sc)
        return logits, model.encode(input_ids)[1]

    rows = []
    for dtype in args.dtypes.split(","):
        eps = float(jnp.finfo(jnp.dtype(dtype)).eps)
        common.log(f"{dtype}: ours on {jax.devices()[0]}")
        model = load_hf(hf_dir, dtype=dtype)
        graphdef, state = nnx.split(model)
        precision = "highest" if dtype == "float32" else None
        with jax.default_matmul_precision(precision):
            began = time.perf_counter()
            logits, hidden = jax.block_until_ready(ours_forward(graphdef, state, prompt, canvas, sc_logits))
            ours_s = time.perf_counter() - began
        ours = dict(logits=np.asarray(logits, np.float64), encoder_hidden=np.asarray(hidden.astype(jnp.float32),
                                                                                     np.float64))
        del model, state, logits, hidden
        common.log(f"{dtype}: transformers on {torch_device}")
        torch_model = DiffusionGemmaForBlockDiffusion.from_pretrained(
            hf_dir, dtype=getattr(torch, dtype), attn_implementation=args.attn).eval().to(torch_device)
        with torch.no_grad():
            out = torch_model(input_ids=torch.from_numpy(prompt.astype(np.int64)).to(torch_device),
                              decoder_input_ids=torch.from_numpy(canvas.astype(np.int64)).to(torch_device),
                              self_conditioning_logits=torch.from_numpy(sc_logits).to(torch_device))
        theirs = dict(logits=out.logits.float().cpu().numpy().astype(np.float64),
                      encoder_hidden=out.encoder_last_hidden_state.float().cpu().numpy().astype(np.float64))
        del torch_model, out
        for name, exact in (("logits", exact_logits), ("encoder_hidden", exact_hidden)):
            row = dict(dtype=dtype, output=name, shape=list(exact.shape),
                       **judge(ours[name], theirs[name], exact.astype(np.float64), eps))
            rows.append(row)
            common.log(f"{dtype} {name}: rms ours {row['ours_rms']:.3g} / reference {row['reference_rms']:.3g} "
                       f"(ratio to bound {row['ratio_to_bound']:.2f}) -> {'ok' if row['passed'] else 'FAILED'}")
        rows[-1]["ours_first_call_s"] = ours_s
    shutil.rmtree(workdir, ignore_errors=True)

    device = jax.devices()[0]
    passed = all(r["passed"] for r in rows)
    print(f"\nparity, size {args.size}, batch {args.batch}, prompt {size['prompt']} + canvas {size['canvas']}; ours "
          f"on {device.device_kind}, transformers on {torch_device} ({args.attn}), float64 reference on the CPU\n")
    print("| dtype | output | rms ours - f64 | rms transformers - f64 | ratio to bound | max ours | max transformers "
          "| verdict |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['output']} | {r['ours_rms']:.3g} | {r['reference_rms']:.3g} | "
              f"{r['ratio_to_bound']:.2f} | {r['ours_max']:.3g} | {r['reference_max']:.3g} | "
              f"{'ok' if r['passed'] else 'FAILED'} |")
    if args.output:
        atomic_write.write_json(args.output, dict(
            args=vars(args), environment=common.environment(), device=str(device.device_kind),
            platform=device.platform, torch_device=torch_device, prompt=size["prompt"], canvas=size["canvas"],
            rule=f"rms(ours - f64) <= {SPREAD_FACTOR:g} x rms(transformers - f64) + {FLOOR_ULPS:g} eps(dtype) "
                 "x rms(f64)", passed=passed, rows=rows), overwrite=True)
        print(f"\nwrote {args.output}")
    if not passed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

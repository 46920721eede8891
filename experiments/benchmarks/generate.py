"""Generation speed: our jitted sampler against transformers' `DiffusionGemmaForBlockDiffusion.generate`.

    python experiments/benchmarks/generate.py                      # CPU preset, batch 1 and 8, canvas 256
    python experiments/benchmarks/generate.py --preset=gpu         # on a GPU machine (JAX GPU + torch CUDA)

One random checkpoint is built with transformers, saved, and loaded by both sides, so both run the same weights
and the same settings (the reference's defaults except `max_denoising_steps`; no EOS ids, so every block runs).
A random model is never confident, so every block runs exactly `--steps` denoising steps on both sides; the
script checks that the step counts agree before comparing. Measured per batch size, after a warm-up call
(compilation for JAX, first-call overheads for torch): wall time of one `generate` call (median of
`--repeats`), denoising-step latency = wall time / denoising steps (the prompt and block encodes amortised in),
and generated tokens per second = batch x generated tokens / wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from diffusion_gemma import atomic_write  # noqa: E402

# (benchmark model of common.PRESETS, layers, widths changed on top of it)
PRESETS = {
    # Small enough for a 2-core CPU, with the released model's structure: 5 sliding : 1 full layers, MoE + dense
    # MLP in every layer, wide vocabulary relative to the hidden size.
    "cpu": ("small", 6, {}),
    # Closer to the released shape (full vocabulary) for an accelerator.
    "gpu": ("released", 12, dict(hidden_size=1024, intermediate_size=2048, num_heads=8, num_kv_heads=4, head_dim=128,
                                 global_head_dim=256, num_experts=32, top_k=4, moe_intermediate_size=512)),
    # The test-suite model at two layers (one sliding, one full): a smoke run of the script.
    "tiny": ("tiny", 2, {}),
}


def build_checkpoint(preset: str, directory: str, canvas_length: int, seed: int):
    """A random HuggingFace checkpoint of `preset` in `directory`; returns its ModelConfig."""
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    name, layers, widths = PRESETS[preset]
    config = common.model_config(name, layers, canvas=canvas_length, max_position_embeddings=8192, **widths)
    torch.manual_seed(seed)
    DiffusionGemmaForBlockDiffusion(common.hf_config(config, canvas_length)).save_pretrained(directory)
    return config


def time_calls(fn, repeats: int) -> tuple[float, float, object]:
    """(seconds of the first call, median seconds of `repeats` more, the first call's result)."""
    began = time.perf_counter()
    out = fn()
    first = time.perf_counter() - began
    return first, common.median_seconds(fn, repeats)[0], out


def bench_ours(hf_dir: str, prompts: np.ndarray, max_new_tokens: int, steps: int, repeats: int, dtype: str):
    import jax
    from flax import nnx

    from diffusion_gemma.checkpoints.hf import load_hf
    from diffusion_gemma.sampling.sampler import SamplerConfig, generate

    jax.config.update("jax_default_matmul_precision", "highest")  # torch's fp32 matmuls are full precision too
    model = load_hf(hf_dir, dtype=dtype)
    config = SamplerConfig(max_new_tokens=max_new_tokens, max_denoising_steps=steps)

    def call():
        result = generate(model, prompts, None, jax.random.key(0), config)
        result.tokens.block_until_ready()
        return result

    warmup, seconds, result = time_calls(call, repeats)
    return dict(seconds=seconds, warmup_seconds=warmup, steps=result.total_steps(),
                generated=int(result.generated().size), device=str(jax.devices()[0].platform),
                parameters=int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))))


def bench_reference(hf_dir: str, prompts: np.ndarray, max_new_tokens: int, steps: int, repeats: int,
                    device: str, attn: str, dtype: str):
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    model = DiffusionGemmaForBlockDiffusion.from_pretrained(hf_dir, attn_implementation=attn,
                                                            dtype=getattr(torch, dtype)).eval().to(device)
    input_ids = torch.from_numpy(prompts.astype(np.int64)).to(device)

    def call():
        with torch.no_grad():
            out = model.generate(input_ids, max_new_tokens=max_new_tokens, max_denoising_steps=steps)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out

    warmup, seconds, out = time_calls(call, repeats)
    generated = out.sequences.shape[1] - prompts.shape[1]
    passes = generated / float(out.tokens_per_forward[0])  # every row runs every step (never confident)
    return dict(seconds=seconds, warmup_seconds=warmup, steps=int(round(passes)),
                generated=int(generated * prompts.shape[0]), device=device)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--batch_sizes", default="1,8")
    parser.add_argument("--canvas_length", type=int, default=256)
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--prompt_length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8, help="denoising steps per block (max_denoising_steps)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--torch_device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--attn", default="sdpa", help="the reference's attention implementation")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for both sides (0: library defaults); 1 is the fair setting on a shared "
                             "machine, where oversubscribed OpenMP threads slow torch down by up to 10x")
    parser.add_argument("--skip_reference", action="store_true")
    parser.add_argument("--workdir", default=None, help="where the random checkpoint is written (default: tmp)")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    args = parser.parse_args()
    if args.threads:
        # Must precede the first JAX import; XLA's CPU backend reads these flags once.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                   f"intra_op_parallelism_threads={args.threads}").strip()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    torch_device = args.torch_device or ("cuda" if torch.cuda.is_available() else "cpu")
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_generate_")
    hf_dir = os.path.join(workdir, f"random_{args.preset}")
    vocab = build_checkpoint(args.preset, hf_dir, args.canvas_length, seed=0).vocab_size
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = np.random.default_rng(batch).integers(3, vocab, size=(batch, args.prompt_length)).astype(np.int32)
        ours = bench_ours(hf_dir, prompts, args.max_new_tokens, args.steps, args.repeats, args.dtype)
        reference = None
        if not args.skip_reference:
            reference = bench_reference(hf_dir, prompts, args.max_new_tokens, args.steps, args.repeats,
                                        torch_device, args.attn, args.dtype)
            if reference["steps"] != ours["steps"]:
                raise SystemExit(f"step counts differ (ours {ours['steps']}, reference {reference['steps']}): "
                                 "the per-step comparison would be meaningless")
        rows.append(dict(batch=batch, ours=ours, reference=reference))
        print(json.dumps(rows[-1]), flush=True)

    print(f"\npreset {args.preset} ({rows[0]['ours']['parameters'] / 1e6:.1f} M text parameters), canvas "
          f"{args.canvas_length}, prompt {args.prompt_length}, {args.max_new_tokens} new tokens, {args.steps} "
          f"steps per block, {args.dtype}; JAX on {rows[0]['ours']['device']}, torch on {torch_device} "
          f"({args.attn}); {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"threads {args.threads or 'default'}\n")
    print("| batch | ours ms/step | transformers ms/step | ours tokens/s | transformers tokens/s | speed-up |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        ours, reference = row["ours"], row["reference"]
        ours_ms = 1e3 * ours["seconds"] / ours["steps"]
        ours_tps = ours["generated"] / ours["seconds"]
        if reference is None:
            print(f"| {row['batch']} | {ours_ms:.1f} | - | {ours_tps:.1f} | - | - |")
            continue
        ref_ms = 1e3 * reference["seconds"] / reference["steps"]
        ref_tps = reference["generated"] / reference["seconds"]
        print(f"| {row['batch']} | {ours_ms:.1f} | {ref_ms:.1f} | {ours_tps:.1f} | {ref_tps:.1f} | "
              f"{ref_ms / ours_ms:.2f}x |")
    if args.json:
        atomic_write.write_json(args.json, dict(args=vars(args), rows=rows), overwrite=True)


if __name__ == "__main__":
    main()

"""Training-step speed: our jitted step against the same step in transformers + torch, on the same device.

    python experiments/benchmarks/train_step.py --preset=tiny --layers=6                   # CPU (README table)
    python experiments/benchmarks/train_step.py --preset=released --layers=2,6 --prompt=256 --canvas=256 \\
        --batch=8 --dtype=bfloat16 --param_dtype=bfloat16 --output=train_step_gpu.json   # the GPU run

Ours: exactly what the trainer jits (`training.setup.build` + `training.step.jit_train_step`): uniform-noise
corruption, the causal encoder pass over the clean row (+ the AR loss on its hidden states), decoder pass 1
without gradient for self-conditioning, decoder pass 2 with gradient, cross-entropy on the selected block, then
gradients, global-norm clipping and the AdamW update (the trainer's optimizer), with the trained set of the
trainer (full SFT: every parameter but the MoE router; LoRA: rank-16 alpha-32 adapters on attention q/k/v/o and
the dense MLP). The state is donated, as in the trainer.

Reference: the same objective written against `DiffusionGemmaForBlockDiffusion` the way the PyTorch SFT recipe
runs it: `model.model.encoder` over the clean row (KV cache kept with its graph) + AR loss through `lm_head`;
`model.model.decoder` pass 1 under `torch.no_grad()`; pass 2 with `self_conditioning_logits` = pass 1 and a
per-example coin; the decoder key mask hides the response part of the encoder cache (the block-causal
visibility of a single-block response); `clip_grad_norm_(1.0)`; `torch.optim.AdamW` with the same
hyper-parameters; router frozen in full SFT; LoRA as rank-16 adapters shared by the tied encoder/decoder
modules. Random weights on both sides, same shapes and init scale.

Each (depth, mode, side) runs in its own subprocess, one after the other, so each side's peak memory is its own
(peak RSS from wait4 on CPU; the allocator's peak on GPU) and a side that runs out of memory is recorded as
such. Per run: compile / first-call time, then the median of `--repeats` steps after `--warmup` steps.
Tokens per step = batch x (row length + canvas), the trainer's count. MFU = model FLOPs (metrics.
train_flops_per_token: 2 x active parameters per token and pass over the three stack passes, x3 with backward,
x2 for LoRA; with and without the tied LM head) / step time / peak. Peak: bf16 dense peak of a known
accelerator (metrics.PEAK_FLOPS), else the best measured square-matmul rate of either library in the compute
dtype on the device with the same threads (so on CPU, "MFU" is relative to what a big matmul achieves there).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from diffusion_gemma import atomic_write  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(common.PRESETS), default="tiny",
                        help="model widths: tiny (ModelConfig.tiny), small (generate.py's CPU preset) or released "
                             "(the 26B-A4B per-layer shapes); --layers sets the depth")
    parser.add_argument("--layers", default="6", help="comma-separated depths, each run separately (e.g. 2,6)")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens per row")
    parser.add_argument("--canvas", type=int, default=64,
                        help="canvas (= block size = response length) per row; the row is prompt + canvas")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--modes", default="full,lora", help="comma-separated: full (SFT), lora")
    parser.add_argument("--sides", default="jax,torch", help="comma-separated: jax (ours), torch (transformers)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    parser.add_argument("--param_dtype", default="float32", choices=("float32", "bfloat16"),
                        help="parameter (and optimizer-state) dtype, both sides")
    parser.add_argument("--remat", default="none", help="ours: ModelConfig.remat (none, full, dots, dots_no_batch)")
    parser.add_argument("--moe_impl", default="grouped", help="ours: ModelConfig.moe_impl (grouped, dense)")
    parser.add_argument("--torch_experts", default=None,
                        help="reference: experts_implementation (default: transformers' choice, grouped_mm)")
    parser.add_argument("--attn", default="sdpa", help="reference: attn_implementation")
    parser.add_argument("--grouped_matmul", default="auto", choices=("auto", "ragged_dot"),
                        help="ours, MoE grouped matmul: auto (the library: ragged_dot on GPU/TPU, the segment scan "
                             "on CPU) or ragged_dot everywhere (XLA:CPU's masked dense lowering; for A/B runs)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"),
                        help="auto: JAX's default backend and cuda for torch when available, else the CPU; the same "
                             "command is the CPU and the GPU run")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU cores for each side (0: library defaults); N pins each side to the first N "
                             "cores; 1 is the fair setting on a shared machine (rates then use CPU seconds)")
    parser.add_argument("--warmup", type=int, default=1, help="steps run before timing (after compilation)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps (the median is reported)")
    parser.add_argument("--peak_flops", type=float, default=None, help="override the MFU denominator (FLOP/s)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per (depth, mode, side) subprocess")
    parser.add_argument("--output", default=None, help="write the results here as JSON (atomically)")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_result", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------- workers
def _matmul_peak_jax(dtype: str, size: int = 2048) -> dict:
    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), dtype)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    timing = common.time_calls(lambda: f(a).block_until_ready(), 5)
    return dict(wall=2 * size**3 / timing["wall_s"], cpu=2 * size**3 / timing["cpu_s"])


def _matmul_peak_torch(dtype: str, device: str, size: int = 2048) -> dict:
    import torch

    a = torch.ones((size, size), dtype=getattr(torch, dtype), device=device)

    def call():
        a @ a
        if device == "cuda":
            torch.cuda.synchronize()

    call()
    timing = common.time_calls(call, 5)
    return dict(wall=2 * size**3 / timing["wall_s"], cpu=2 * size**3 / timing["cpu_s"])


def jax_worker(args, layers: int, mode: str) -> dict:
    common.set_cpu_threads(args.threads)
    if args.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import jax.numpy as jnp

    common.select_grouped_matmul(args.grouped_matmul)
    lora = mode == "lora"
    model_args = dict(canvas=args.canvas, dtype=args.dtype, param_dtype=args.param_dtype, remat=args.remat,
                      moe_impl=args.moe_impl)
    config = common.model_config(args.preset, layers, **model_args)
    batch_np = common.synthetic_batch(config, batch=args.batch, prompt=args.prompt, canvas=args.canvas)
    common.log(f"jax {mode} L={layers}: building the model and the step on {jax.devices()[0]}")
    began = time.perf_counter()
    step_fn, (trainable, rest, opt_state), mesh = common.build_train_step(
        common.train_config(args.preset, layers, lora=lora, **model_args))
    init_s = time.perf_counter() - began
    with jax.set_mesh(mesh):
        batch = {k: jax.device_put(v, jax.devices()[0]) for k, v in batch_np.items()}
        rng = jax.random.key(0)
        step = jnp.asarray(0, jnp.int32)
        common.log(f"jax {mode} L={layers}: compiling")
        began, began_cpu = time.perf_counter(), time.process_time()
        compiled = step_fn.lower(trainable, rest, opt_state, batch, rng, step).compile()
        compile_s, compile_cpu_s = time.perf_counter() - began, time.process_time() - began_cpu
        memory = compiled.memory_analysis()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        state = [trainable, opt_state]
        losses = []

        def run():
            trainable, opt_state, metrics = compiled(state[0], rest, state[1], batch, rng, step)
            jax.block_until_ready((trainable, opt_state, metrics))
            state[:] = [trainable, opt_state]
            losses.append(float(metrics["loss"]))

        common.log(f"jax {mode} L={layers}: {args.warmup} warm-up + {args.repeats} timed steps")
        for _ in range(args.warmup):
            run()
        load_before = common.load_average()
        timing = common.time_calls(run, args.repeats)
    device = jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    out = dict(side="jax", layers=layers, mode=mode, init_s=init_s, compile_s=compile_s,
               compile_cpu_s=compile_cpu_s, step_s=timing["wall_s"], step_cpu_s=timing["cpu_s"],
               step_s_all=timing["wall_s_all"], step_cpu_s_all=timing["cpu_s_all"], losses=losses, load_average_before=load_before,
               load_average_after=common.load_average(), device=str(device.device_kind), platform=device.platform,
               trainable_params=common.count_params(trainable), total_params=common.count_params((trainable, rest)),
               xla_flops=float(cost.get("flops", 0.0)) if cost else None,
               peak_flops_measured=_matmul_peak_jax(args.dtype))
    if memory is not None:
        out["xla_memory"] = dict(argument=memory.argument_size_in_bytes, output=memory.output_size_in_bytes,
                                 temp=memory.temp_size_in_bytes, alias=memory.alias_size_in_bytes,
                                 generated_code=memory.generated_code_size_in_bytes)
    if stats:
        out["device_peak_bytes"] = stats.get("peak_bytes_in_use")
    return out


def torch_worker(args, layers: int, mode: str) -> dict:
    import torch
    from torch import nn
    from transformers import DiffusionGemmaForBlockDiffusion

    if args.threads:
        common.set_cpu_threads(args.threads)
        torch.set_num_threads(args.threads)
    device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    lora = mode == "lora"
    config = common.model_config(args.preset, layers, canvas=args.canvas)
    hf = common.hf_config(config, args.canvas)
    kwargs = dict(attn_implementation=args.attn, dtype=getattr(torch, args.param_dtype))
    if args.torch_experts:
        kwargs["experts_implementation"] = args.torch_experts
    common.log(f"torch {mode} L={layers}: building the model on {device}")
    began = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = DiffusionGemmaForBlockDiffusion._from_config(hf, **kwargs)
    model.train()
    init_s = time.perf_counter() - began
    text_encoder, decoder = model.model.encoder.language_model, model.model.decoder
    assert text_encoder.layers[0].self_attn.q_proj.weight is decoder.layers[0].self_attn.q_proj.weight, "untied"

    for p in model.parameters():
        p.requires_grad_(not lora)
    for p in model.model.encoder.vision_tower.parameters():  # not part of the text stack (ours has none)
        p.requires_grad_(False)
    for p in model.model.encoder.embed_vision.parameters():
        p.requires_grad_(False)
    for layer in decoder.layers:  # full SFT: everything but the router (docs/TRAINING.md §7)
        layer.router.proj.weight.requires_grad_(False)
        layer.router.scale.requires_grad_(False)

    class Adapter(nn.Module):
        def __init__(self, fan_in, fan_out, rank=16, alpha=32.0):
            super().__init__()
            self.a = nn.Parameter(torch.randn(rank, fan_in) / fan_in**0.5)
            self.b = nn.Parameter(torch.zeros(fan_out, rank))
            self.scale = alpha / rank

    class LoRALinear(nn.Module):
        def __init__(self, base, adapter):
            super().__init__()
            self.base, self.adapter = base, adapter

        def forward(self, x):
            return self.base(x) + self.adapter.scale * ((x @ self.adapter.a.t().to(x.dtype))
                                                       @ self.adapter.b.t().to(x.dtype))

    if lora:
        targets = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
                   ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))
        with torch.device(device):
            for enc_layer, dec_layer in zip(text_encoder.layers, decoder.layers):
                for parent, name in targets:
                    base = getattr(getattr(dec_layer, parent), name)
                    if base is None:  # v_proj on full layers
                        continue
                    adapter = Adapter(base.in_features, base.out_features)
                    for layer in (enc_layer, dec_layer):  # tied modules share the weight and the adapter
                        setattr(getattr(layer, parent), name, LoRALinear(getattr(getattr(layer, parent), name),
                                                                          adapter))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1.5e-4, betas=(0.95, 0.99), eps=1e-8, weight_decay=1e-4)
    lm_head = model.lm_head
    cap = model.config.text_config.final_logit_softcapping or 30.0
    vocab = config.vocab_size
    batch = {k: torch.from_numpy(v).to(device) for k, v in
             common.synthetic_batch(config, batch=args.batch, prompt=args.prompt, canvas=args.canvas).items()}
    ids = batch["input_ids"].long()
    attention = batch["attention_mask"].long()
    supervised = batch["supervised_mask"]
    prompt, canvas = args.prompt, args.canvas
    positions = torch.arange(prompt, prompt + canvas, device=device)[None].expand(args.batch, -1)
    # Decoder keys = [encoder cache ; canvas]: the prompt and the canvas, not the response's clean copy.
    decoder_mask = torch.cat([attention * (~supervised).long(), torch.ones_like(ids[:, :canvas])], dim=1)
    autocast = (torch.autocast(device_type=device, dtype=torch.bfloat16)
                if args.dtype == "bfloat16" and args.param_dtype != "bfloat16" else None)
    generator = torch.Generator(device=device).manual_seed(0)

    def softcap(x):
        return cap * torch.tanh(x.float() / cap)

    def loss_fn():
        t = 1e-3 + (1 - 1e-3) * torch.rand(args.batch, device=device, generator=generator)
        noise = (torch.rand(ids.shape, device=device, generator=generator) < t[:, None]) & supervised
        noised = torch.where(noise, torch.randint(0, vocab, ids.shape, device=device, generator=generator), ids)
        canvas_ids = noised[:, prompt:prompt + canvas]
        coins = torch.rand(args.batch, device=device, generator=generator) < 0.5
        encoded = model.model.encoder(input_ids=ids, attention_mask=attention, use_cache=True)
        cache, hidden = encoded.past_key_values, encoded.last_hidden_state
        ar_logits = softcap(lm_head(hidden[:, :-1]))
        ar = nn.functional.cross_entropy(ar_logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))

        def decode(sc_logits, sc_mask):
            out = decoder(decoder_input_ids=canvas_ids, past_key_values=cache, self_conditioning_logits=sc_logits,
                          self_conditioning_mask=sc_mask, decoder_attention_mask=decoder_mask,
                          decoder_position_ids=positions)
            return softcap(lm_head(out.last_hidden_state))

        with torch.no_grad():
            first = decode(None, None)
        second = decode(first, coins)
        diffusion = nn.functional.cross_entropy(second.reshape(-1, vocab), ids[:, prompt:prompt + canvas].reshape(-1))
        return diffusion + ar

    losses = []

    def run():
        if autocast is not None:
            with autocast:
                loss = loss_fn()
        else:
            loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))  # synchronises
        if device == "cuda":
            torch.cuda.synchronize()

    common.log(f"torch {mode} L={layers}: first step")
    began = time.perf_counter()
    run()
    first_s = time.perf_counter() - began
    for _ in range(args.warmup - 1):
        run()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    common.log(f"torch {mode} L={layers}: {args.repeats} timed steps")
    load_before = common.load_average()
    timing = common.time_calls(run, args.repeats)
    text_params = sum(p.numel() for n, p in model.named_parameters()
                      if not n.startswith(("model.encoder.vision_tower", "model.encoder.embed_vision")))
    out = dict(side="torch", layers=layers, mode=mode, init_s=init_s, compile_s=first_s, compile_cpu_s=None,
               step_s=timing["wall_s"], step_cpu_s=timing["cpu_s"], step_s_all=timing["wall_s_all"],
               step_cpu_s_all=timing["cpu_s_all"], losses=losses, load_average_before=load_before,
               load_average_after=common.load_average(), device=device,
               trainable_params=sum(p.numel() for p in trainable), total_params=text_params,
               experts_implementation=model.config.text_config._experts_implementation,
               attn_implementation=model.config._attn_implementation,
               peak_flops_measured=_matmul_peak_torch(args.dtype, device))
    if device == "cuda":
        out["device_peak_bytes"] = torch.cuda.max_memory_allocated()
    return out


# ------------------------------------------------------------------------------------------------- driver
def summarise(args, rows: list[dict]) -> dict:
    """Adds tokens/s, model FLOPs, MFU and ours/transformers speed-ups to each successful row; returns how the
    MFU denominator was chosen. Rates use wall time, except single-threaded CPU runs (--threads=1), whose rates
    use process CPU time for the steps and for the matmul peak alike: on a shared machine that removes the time
    other jobs take from us, and with one thread CPU time is the time the work takes."""
    sequence = args.prompt + args.canvas
    tokens = args.batch * (sequence + args.canvas)
    ok = [r for r in rows if "error" not in r]
    on_cpu = all(r.get("platform", r.get("device")) == "cpu" for r in ok)
    basis = "cpu" if on_cpu and args.threads == 1 else "wall"
    peak, peak_source = args.peak_flops, "--peak_flops"
    if peak is None and args.dtype == "bfloat16":
        from diffusion_gemma.training import metrics

        for row in ok:
            for name, flops in metrics.PEAK_FLOPS.items():
                if name.lower() in str(row.get("device", "")).lower():
                    peak, peak_source = flops, f"metrics.PEAK_FLOPS[{name!r}] (bf16 dense)"
    measured = [r["peak_flops_measured"][basis] for r in ok if r.get("peak_flops_measured")]
    if peak is None and measured:
        peak = max(measured)
        peak_source = (f"measured {args.dtype} 2048^3 matmul, best of both libraries, per "
                       f"{'CPU second (one thread)' if basis == 'cpu' else 'wall second'}")
    configs = {}
    for row in ok:
        layers = row["layers"]
        configs.setdefault(layers, common.model_config(args.preset, layers, canvas=args.canvas))
        flops = common.train_flops(configs[layers], sequence=sequence, canvas=args.canvas, lora=row["mode"] == "lora")
        seconds = row["step_cpu_s"] if basis == "cpu" else row["step_s"]
        row.update(tokens_per_step=tokens, tokens_per_s=tokens / seconds, rate_basis=basis,
                   model_flops_per_token=flops,
                   mfu_with_lm_head=flops["with_lm_head"] * tokens / seconds / peak if peak else None,
                   mfu_without_lm_head=flops["without_lm_head"] * tokens / seconds / peak if peak else None)
        if row.get("xla_flops"):
            row["xla_flops_over_model_flops"] = row["xla_flops"] / (flops["with_lm_head"] * tokens)
    for row in ok:
        if row["side"] != "jax":
            continue
        for other in ok:
            if other["side"] == "torch" and other["layers"] == row["layers"] and other["mode"] == row["mode"]:
                row["speedup_vs_torch_wall"] = other["step_s"] / row["step_s"]
                row["speedup_vs_torch_cpu"] = other["step_cpu_s"] / row["step_cpu_s"]
                row["speedup_vs_torch"] = row[f"speedup_vs_torch_{basis}"]
    return dict(peak_flops=peak, peak_flops_source=peak_source, rate_basis=basis)


def print_table(args, rows, info):
    gib = 2**30
    print(f"\npreset {args.preset}, prompt {args.prompt} + canvas {args.canvas}, batch {args.batch}, compute "
          f"{args.dtype}, params {args.param_dtype}, threads {args.threads or 'default'}; rates per "
          f"{info['rate_basis']} second; MFU peak {(info['peak_flops'] or 0) / 1e9:.1f} GFLOP/s "
          f"({info['peak_flops_source']})\n")
    print("| layers | mode | side | compile or 1st step (s) | step wall (s) | step CPU (s) | tokens/s | peak mem (GiB) "
          "| MFU w/ LM head | MFU w/o LM head | ours vs transformers | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['layers']} | {r['mode']} | {r['side']} | not run: {r['error']} | | | | | | | | |")
            continue
        memory = r.get("device_peak_bytes") or r.get("peak_rss_bytes")
        mfu = lambda v: f"{100 * v:.2f}%" if v is not None else "-"  # noqa: E731
        speed = f"{r['speedup_vs_torch']:.2f}x" if r.get("speedup_vs_torch") else ""
        print(f"| {r['layers']} | {r['mode']} | {'ours' if r['side'] == 'jax' else 'transformers'} | "
              f"{r['compile_s']:.1f} | {r['step_s']:.3f} | {r['step_cpu_s']:.3f} | {r['tokens_per_s']:.0f} | "
              f"{memory / gib:.2f} | {mfu(r['mfu_with_lm_head'])} | {mfu(r['mfu_without_lm_head'])} | {speed} | "
              f"{r['load_average_before'][0] if r['load_average_before'] else '?'} |")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args._worker:
        side, layers, mode = args._worker.split(":")
        worker = jax_worker if side == "jax" else torch_worker
        result = worker(args, int(layers), mode)
        atomic_write.write_json(args._result, result, overwrite=True)
        return
    base_argv = [a for a in argv if not a.startswith(("--output", "--_worker", "--_result"))]
    rows = []
    for layers in [int(x) for x in args.layers.split(",")]:
        for mode in args.modes.split(","):
            for side in args.sides.split(","):
                common.log(f"run: {side} {mode} layers={layers}")
                rows.append({"side": side, "layers": layers, "mode": mode, **common.run_worker(
                    __file__, base_argv, f"{side}:{layers}:{mode}", args.timeout)})
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "losses"}), flush=True)
    peak_info = summarise(args, rows)
    print_table(args, rows, peak_info)
    if args.output:
        atomic_write.write_json(args.output, dict(args={k: v for k, v in vars(args).items() if not k.startswith("_")},
                                                  environment=common.environment(), **peak_info, rows=rows),
                                overwrite=True)
        print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()

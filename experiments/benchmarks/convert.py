"""Checkpoint conversion benchmark: throughput and peak memory of `python -m diffusion_gemma.convert`.

Builds a synthetic HuggingFace checkpoint with the released 26B-A4B layer dimensions and two layers (one
sliding, one full): the real 262144 x 2816 embedding (the largest tensor, 1.48 GB in bf16), real expert tensors
(128 x 1408 x 2816 gate_up, 1.01 GB), attention and dense MLP of both layer kinds, and a few vision-side tensors
carried through. Then it runs import-hf and export-hf as subprocesses, each measured on its own (wall time, the
CLI's own MB/s, and the child's peak RSS from wait4), and checks the round trip byte for byte.

    python experiments/benchmarks/convert.py --workdir=/tmp/convert_bench

About 5 GB per copy, three copies on disk (HF in, Orbax, HF out). Results go into README.md beside this file
("Checkpoint conversion").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

from diffusion_gemma.checkpoints.hf_config import model_config_to_hf
from diffusion_gemma.checkpoints.hf_keys import tensor_mappings
from diffusion_gemma.checkpoints.safetensors_dir import (SafetensorsDir, SafetensorsWriter, entry, plan_shards,
                                                         shard_file_names, write_index)
from diffusion_gemma.config import FULL, SLIDING, ModelConfig

# Tensors the converter carries through untouched (names as in the released checkpoint; sizes shrunk except
# the embed_vision projection).
VISION_TENSORS = {
    "model.encoder.embed_vision.embedding_projection.weight": (2816, 1152),
    "model.encoder.vision_tower.patch_embedder.input_proj.weight": (1152, 768),
    "model.encoder.vision_tower.patch_embedder.position_embedding_table": (2, 10240, 1152),
    "model.encoder.vision_tower.encoder.layers.0.mlp.gate_proj.linear.weight": (4304, 1152),
}
BLOCK = 16 * 2**20


def synthetic_config() -> ModelConfig:
    return ModelConfig.gemma4_26b_a4b(num_layers=2, layer_types=(SLIDING, FULL), param_dtype="bfloat16",
                                      dtype="bfloat16")


def random_bf16_bits(rng: np.random.Generator, count: int) -> np.ndarray:
    """Finite bf16 values (top exponent bit cleared: |x| < 2) as raw uint16."""
    return rng.integers(0, 1 << 16, size=count, dtype=np.uint16) & np.uint16(0xBFFF)


def write_synthetic(hf_dir: str, max_shard_size: int, seed: int = 0) -> dict:
    config = synthetic_config()
    os.makedirs(hf_dir)
    entries = [entry(m.hf_key, "BF16", m.hf_shape) for m in tensor_mappings(config)]
    entries += [entry(key, "BF16", shape) for key, shape in VISION_TENSORS.items()]
    shards = plan_shards(entries, max_shard_size)
    names = shard_file_names(len(shards))
    rng = np.random.default_rng(seed)
    for name, shard in zip(names, shards):
        writer = SafetensorsWriter(os.path.join(hf_dir, name), shard)
        for item in shard:
            for start in range(0, item.nbytes, BLOCK):
                bits = random_bf16_bits(rng, min(BLOCK, item.nbytes - start) // 2)
                writer.write(item.key, bits.view(ml_dtypes.bfloat16))
        writer.close()
    if len(shards) > 1:
        write_index(hf_dir, shards, names)
    hf_config = model_config_to_hf(config)
    hf_config["dtype"] = "bfloat16"
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    with open(os.path.join(hf_dir, "generation_config.json"), "w") as f:
        json.dump({"max_new_tokens": 256, "eos_token_id": [1, 106, 50], "pad_token_id": 0}, f, indent=2)
    with open(os.path.join(hf_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"pad_token": "<pad>"}, f)
    largest = max(entries, key=lambda e: e.nbytes)
    return {"tensor_bytes": sum(e.nbytes for e in entries), "shards": len(shards), "largest_key": largest.key,
            "largest_bytes": largest.nbytes}


def run_measured(args: list[str]) -> dict:
    """Run a command; wall time, peak RSS (wait4) and the converter's own summary line."""
    start = time.perf_counter()
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    stdout, stderr = process.stdout.read(), process.stderr.read()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"{' '.join(args)} failed ({process.returncode}):\n{stderr[-4000:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_bytes": usage.ru_maxrss * 1024,
            "summary": stdout.strip().splitlines()[-1]}


def disk_baseline(directory: str, size: int = 2 * 10**9) -> dict:
    """MB/s of this disk for a plain sequential write of `size` bytes, buffered (then fsync) and O_DIRECT: the
    ceiling any conversion writing through the page cache (Orbax/tensorstore) or directly (our safetensors
    writer) can reach right now."""
    import mmap

    block = mmap.mmap(-1, BLOCK)
    block.write(np.random.default_rng(0).bytes(BLOCK))
    out = {}
    for name, flags in (("buffered", 0), ("direct", getattr(os, "O_DIRECT", 0))):
        path = os.path.join(directory, f"disk_baseline_{name}")
        start = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flags)
        for _ in range(size // BLOCK):
            os.write(fd, block)
        os.fsync(fd)
        os.close(fd)
        out[name] = (size // BLOCK) * BLOCK / 1e6 / (time.perf_counter() - start)
        os.remove(path)
    return out


def compare(hf_a: str, hf_b: str) -> int:
    """Byte-for-byte comparison of every tensor of two HF directories; returns the number compared."""
    with SafetensorsDir(hf_a) as a, SafetensorsDir(hf_b) as b:
        if set(a.keys()) != set(b.keys()):
            raise AssertionError(f"key sets differ: {sorted(set(a.keys()) ^ set(b.keys()))[:8]}")
        for key in a.keys():
            ia, ib = a.info(key), b.info(key)
            if (ia.dtype, ia.shape) != (ib.dtype, ib.shape):
                raise AssertionError(f"{key}: {ia.dtype}{ia.shape} vs {ib.dtype}{ib.shape}")
            for start in range(0, ia.nbytes, BLOCK):
                size = min(BLOCK, ia.nbytes - start)
                xa, xb = np.empty(size, np.uint8), np.empty(size, np.uint8)
                a.read_into(key, memoryview(xa), start)
                b.read_into(key, memoryview(xb), start)
                if not np.array_equal(xa, xb):
                    raise AssertionError(f"{key}: bytes differ")
        return len(a.keys())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/convert_bench")
    parser.add_argument("--max_shard_size", type=int, default=2 * 10**9, help="shard size of the synthetic input")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic input between runs")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds to wait after deleting old outputs")
    args = parser.parse_args()
    hf_in, ckpt, hf_out = (os.path.join(args.workdir, name) for name in ("hf_in", "ckpt", "hf_out"))
    if not (args.keep and os.path.exists(os.path.join(hf_in, "config.json"))):
        shutil.rmtree(args.workdir, ignore_errors=True)
        start = time.perf_counter()
        info = write_synthetic(hf_in, args.max_shard_size)
        print(f"synthetic checkpoint: {info['tensor_bytes'] / 1e9:.2f} GB in {info['shards']} shards "
              f"({time.perf_counter() - start:.0f} s); largest tensor {info['largest_key']} "
              f"{info['largest_bytes'] / 1e9:.3f} GB", flush=True)
    with SafetensorsDir(hf_in) as source:
        largest = max(source.infos.values(), key=lambda i: i.nbytes)
        total = sum(i.nbytes for i in source.infos.values())
    for stale in (ckpt, hf_out):  # outside the timed runs: deleting a 5 GB output is not conversion work
        shutil.rmtree(stale, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    time.sleep(args.settle)  # let the disk finish discarding what was deleted
    cli = [sys.executable, "-m", "diffusion_gemma.convert"]
    results = {}
    results["import-hf"] = run_measured(cli + ["import-hf", f"--hf_dir={hf_in}", f"--output={ckpt}", "--noprogress"])
    subprocess.run(["sync"], check=True)
    results["export-hf"] = run_measured(cli + ["export-hf", f"--checkpoint={ckpt}", f"--output={hf_out}",
                                               "--noprogress"])
    # Measured after the conversions (its 4 GB of writes and deletes would slow the runs that follow it).
    subprocess.run(["sync"], check=True)
    disk = disk_baseline(args.workdir)
    print(f"disk baseline (2 GB sequential write + fsync): buffered {disk['buffered']:.0f} MB/s, "
          f"O_DIRECT {disk['direct']:.0f} MB/s", flush=True)
    load = os.getloadavg()
    print(f"load average during the runs: {load[0]:.1f} (1 min), {load[1]:.1f} (5 min) on {os.cpu_count()} cores")
    count = compare(hf_in, hf_out)
    budget = 2 * largest.nbytes + 10**9
    print(f"\nround trip byte-exact: {count} tensors, {total / 1e9:.2f} GB; largest tensor {largest.key} "
          f"{largest.nbytes / 1e9:.3f} GB; RSS budget 2 x largest + 1 GB = {budget / 1e9:.2f} GB\n")
    print("| direction | tensor GB | wall s | MB/s (end to end) | converter line | CPU s (user+sys) | peak RSS GB "
          "| within budget |")
    print("|---|---|---|---|---|---|---|---|")
    for name, result in results.items():
        print(f"| {name} | {total / 1e9:.2f} | {result['wall_s']:.1f} | {total / 1e6 / result['wall_s']:.0f} | "
              f"{result['summary'].split('(', 1)[-1].rstrip(')')} | {result['cpu_s']:.1f} | "
              f"{result['peak_rss_bytes'] / 1e9:.2f} | {'yes' if result['peak_rss_bytes'] <= budget else 'NO'} |")


if __name__ == "__main__":
    main()

"""Throughput of the Sudoku data path: base puzzles generated per second by one worker for each givens count,
the pool built by several workers, and training examples served per second from the pool (with and without
augmentation) against today's on-the-fly generation, and batches served by the training pipeline with and
without prefetch workers (`data.prefetch_workers`). Prints Markdown tables.

  python experiments/sudoku/pool_throughput.py [--givens=20,22,25,30,35,40,50,60] [--per_givens=8] [--workers=2]
      [--batch=128] [--prefetch_workers=0,2]
"""

import argparse
import sys
import tempfile
import time

import numpy as np

from diffusion_gemma.tasks.sudoku import pool as pool_lib
from diffusion_gemma.tasks.sudoku.source import SudokuSource


def generation_rates(givens: list[int], per_givens: int, seed: int) -> dict[int, float]:
    """Base puzzles per second of one worker (in this process), per givens count."""
    rates = {}
    for count in givens:
        spec = pool_lib.PoolSpec(per_givens=per_givens, min_givens=count, max_givens=count, seed=seed)
        seconds = pool_lib.generate(spec, workers=1)[1][count]
        rates[count] = 1.0 / seconds
    return rates


def build_seconds(spec: pool_lib.PoolSpec, workers: int) -> float:
    """Wall seconds to build and cache `spec` with `workers` processes (their start-up included). The pool is
    the same for every number of workers, so the work is too."""
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        pool_lib.load_or_generate(spec, cache_dir=cache, workers=workers)
        return time.perf_counter() - start


def serving_rate(source: SudokuSource, count: int, *, packed: bool) -> float:
    """Examples per second: `source.puzzle` (boards only) or `source[i]` (boards + tokens, what training reads)."""
    read = source.__getitem__ if packed else source.puzzle
    start = time.perf_counter()
    for index in range(count):
        read(index)
    return count / (time.perf_counter() - start)


def pipeline_rate(source: SudokuSource, *, batch: int, workers: int, batches: int) -> float:
    """Batches per second out of the training pipeline (`make_dataset`), timed from the first batch (the workers'
    start-up left out, as a run pays it once)."""
    from diffusion_gemma.data.pipeline import DataConfig, make_dataset

    config = DataConfig(seq_length=163, block_size=81, global_batch_size=batch, prefetch_workers=workers)
    iterator = iter(make_dataset(source, config, num_steps=batches + 1))
    try:
        next(iterator)
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        return batches / (time.perf_counter() - start)
    finally:
        if hasattr(iterator, "close"):
            iterator.close()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--givens", default="20,22,25,30,35,40,50,60", help="givens counts to time generation at")
    parser.add_argument("--per_givens", type=int, default=8, help="base puzzles timed per givens count")
    parser.add_argument("--workers", type=int, default=2, help="processes for the parallel pool build")
    parser.add_argument("--build_givens", default="22-25", help="givens range of the parallel build, LOW-HIGH")
    parser.add_argument("--serve", type=int, default=2000, help="examples read per serving measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=128, help="global batch of the pipeline measurement")
    parser.add_argument("--prefetch_workers", default="0,2", help="worker counts of the pipeline measurement")
    parser.add_argument("--batches", type=int, default=2000, help="batches timed per pipeline measurement (well "
                        "above grain's read-ahead of 500, which the first batch may already have filled)")
    args = parser.parse_args(argv)
    givens = [int(g) for g in args.givens.split(",")]
    low, high = (int(g) for g in args.build_givens.split("-"))

    print(f"## Base puzzles per second, one worker ({args.per_givens} per givens count)\n")
    print("| givens | puzzles/s | ms/puzzle |\n|---:|---:|---:|")
    for count, rate in generation_rates(givens, args.per_givens, args.seed).items():
        print(f"| {count} | {rate:.1f} | {1000 / rate:.1f} |")

    build = pool_lib.PoolSpec(per_givens=args.per_givens, min_givens=low, max_givens=high, seed=args.seed)
    n = len(build.givens) * build.per_givens
    print(f"\n## Pool build, givens {low}-{high}, {args.per_givens} per count ({n} base puzzles)\n")
    print("| workers | wall s (spawn start-up included) | puzzles/s |\n|---:|---:|---:|")
    for workers in sorted({1, args.workers}):
        seconds = build_seconds(build, workers)
        print(f"| {workers} | {seconds:.2f} | {n / seconds:.1f} |")

    spec = pool_lib.PoolSpec(per_givens=args.per_givens, min_givens=min(givens), max_givens=max(givens),
                             seed=args.seed)
    base = pool_lib.Pool(spec=spec, puzzles=np.zeros((len(spec.givens), spec.per_givens, 9, 9), np.int8),
                         solutions=np.zeros((len(spec.givens), spec.per_givens, 9, 9), np.int8))
    # Serving cost does not depend on which valid boards the pool holds: fill it with one built row, repeated.
    row = pool_lib.generate(pool_lib.PoolSpec(per_givens=args.per_givens, min_givens=45, max_givens=45,
                                              seed=args.seed))[0]
    base.puzzles[:], base.solutions[:] = row.puzzles[0], row.solutions[0]
    kwargs = dict(num_examples=10**6, seed=args.seed, min_givens=min(givens), max_givens=max(givens),
                  seq_length=163, block_size=81)
    on_the_fly = SudokuSource(**{**kwargs, "min_givens": 35, "max_givens": 60})
    sources = [("pool", SudokuSource(**kwargs, base_pool=base)),
               ("pool + augment", SudokuSource(**kwargs, base_pool=base, augmented=True)),
               ("on the fly, 35-60 givens (today's default data)", on_the_fly)]
    print(f"\n## Examples served per second, one process ({args.serve} reads; on the fly: {args.serve // 20})\n")
    print("| source | boards/s | packed examples/s |\n|---|---:|---:|")
    for name, source in sources:
        count = args.serve if source.base_pool is not None else max(1, args.serve // 20)
        print(f"| {name} | {serving_rate(source, count, packed=False):.0f} | "
              f"{serving_rate(source, count, packed=True):.0f} |")

    augmented = sources[1][1]
    print(f"\n## Batches of {args.batch} served by the training pipeline, pool + augment ({args.batches} timed)\n")
    print("| prefetch workers | batches/s | examples/s |\n|---:|---:|---:|")
    for workers in (int(w) for w in args.prefetch_workers.split(",")):
        rate = pipeline_rate(augmented, batch=args.batch, workers=workers, batches=args.batches)
        print(f"| {workers} | {rate:.1f} | {rate * args.batch:.0f} |")


if __name__ == "__main__":
    main(sys.argv[1:])

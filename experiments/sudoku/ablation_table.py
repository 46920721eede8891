"""Summarise ablation workdirs (experiments/sudoku/ablation_config.py): one row per run, as a Markdown table and,
with --json, a JSON file.

  python experiments/sudoku/ablation_table.py /tmp/sudoku_ab/* [--json=experiments/sudoku/results/ablation.json]
"""

import argparse
import json
import os
import statistics
import sys


def summarise(workdir: str) -> dict:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"{path}: no metrics (is {workdir} a training workdir?)")
    rows = [json.loads(line) for line in open(path)]
    train = [r for r in rows if "accuracy_corrupted" in r]
    evals = [r for r in rows if "eval/solve_rate" in r]
    if not train or not evals:
        raise SystemExit(f"{path}: needs training rows and an evaluation row (did the run finish?)")
    last = train[-4:]  # single-batch metrics are noisy: average the last four logged ones
    return dict(run=os.path.basename(os.path.normpath(workdir)), step=train[-1]["step"],
                accuracy_corrupted=statistics.fmean(r["accuracy_corrupted"] for r in last),
                diffusion_loss=statistics.fmean(r["diffusion_loss"] for r in last),
                ar_loss=statistics.fmean(r["ar_loss"] for r in last),
                median_step_s=statistics.median(r["step_time_s"] for r in train[1:] or train),
                eval_step=evals[-1]["step"], solve_rate=evals[-1]["eval/solve_rate"],
                blank_cell_accuracy=evals[-1]["eval/blank_cell_accuracy"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+")
    parser.add_argument("--json", default="", help="also write the rows here (must not exist)")
    args = parser.parse_args(argv)
    rows = sorted((summarise(w) for w in args.workdirs), key=lambda r: -r["blank_cell_accuracy"])
    print("| run | steps | acc. on corrupted cells (last 4 logs) | diffusion loss | AR loss | median step s |"
          " solved | blank-cell accuracy |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['run']} | {r['step']} | {r['accuracy_corrupted']:.3f} | {r['diffusion_loss']:.3f} | "
              f"{r['ar_loss']:.3f} | {r['median_step_s']:.2f} | {r['solve_rate']:.1%} | "
              f"{r['blank_cell_accuracy']:.1%} |")
    if args.json:
        if os.path.exists(args.json):
            raise SystemExit(f"{args.json} exists; remove it or pick another path")
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main(sys.argv[1:])

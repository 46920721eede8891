"""The Python half of `gpu_suite.sh`: which wheels travel and which of them to install, whether the packages the
project needs are there, and the suite's record (`suite.json`) and summary table.

    python gpu_suite_check.py carry                    # here: NAME==VERSION of every carried distribution
    python gpu_suite_check.py select WHEEL_DIR         # there: the carried wheels that are missing or newer
    python gpu_suite_check.py packages OUT_JSON        # the project's requirements against what is installed
    python gpu_suite_check.py summary --rows ROWS_TSV --out DIR ...   # suite.json + the table

Standard library and `packaging` only, never `diffusion_gemma` or JAX: the record must be written even when the
package does not import on the machine (that is then what the record says).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
import time
from importlib import metadata

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# What travels to the GPU machine as wheels (the package list its image was published with, read 2026-11-17): the
# distributions our requirements need that it lacks (grain, array-record, portpicker, ml-collections,
# tensorboardX), transformers at our pin (the image's 5.17 predates 5.23, which brought DiffusionGemma) with what
# it needs beyond the image (huggingface-hub >= 2.4 with httpx2, httpcore2 and truststore; kernels with tomlkit),
# and three that the image has in a version nobody read, which transformers or huggingface-hub need at a minimum
# (regex, click, hf-xet). Each travels at the version installed here, the one the test suite runs with; `select`
# installs a wheel only where the machine's copy is missing or older.
CARRIED = ("transformers", "huggingface-hub", "httpx2", "httpcore2", "truststore", "kernels", "tomlkit", "regex",
           "click", "hf-xet", "grain", "array-record", "portpicker", "ml-collections", "tensorboardX")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_version(name: str) -> str | None:
    for candidate in {name, normalise(name), normalise(name).replace("-", "_")}:
        try:
            return metadata.version(candidate)
        except metadata.PackageNotFoundError:
            continue
    return None


def _older(installed: str | None, wanted: str) -> bool:
    if installed is None:
        return True
    try:
        return Version(installed) < Version(wanted)
    except InvalidVersion:
        return installed != wanted


def carry_specs() -> list[str]:
    """NAME==VERSION of every carried distribution, at the version installed here."""
    specs = []
    for name in CARRIED:
        version = installed_version(name)
        if version is None:
            raise SystemExit(f"{name} is not installed here: install the project's [dev] extra first")
        specs.append(f"{name}=={version}")
    return specs


def wheel_name_version(path: str) -> tuple[str, str]:
    """(distribution, version) from a wheel file name: NAME-VERSION(-BUILD)?-PY-ABI-PLATFORM.whl."""
    parts = os.path.basename(path)[:-len(".whl")].split("-")
    return normalise(parts[0]), parts[1]


def select_wheels(wheel_dir: str) -> list[str]:
    """The wheels in `wheel_dir` whose distribution is missing here or older than the wheel (never a downgrade:
    a newer copy on the machine is the one its other packages were built with); the newest of several versions
    (two of one distribution would stop pip's whole install)."""
    newest: dict[str, tuple[str, str]] = {}
    for name in sorted(os.listdir(wheel_dir)):
        if name.endswith(".whl"):
            dist, version = wheel_name_version(name)
            if dist not in newest or _older(newest[dist][0], version):
                newest[dist] = (version, name)
    return [os.path.join(wheel_dir, name) for dist, (version, name) in sorted(newest.items())
            if _older(installed_version(dist), version)]


def requirements(setup_py: str = os.path.join(REPO, "setup.py")) -> list[Requirement]:
    """setup.py's install_requires, and the [dev] extra's transformers pin (the reference every comparison
    runs), read from the file's syntax tree (importing setup.py would run setup())."""
    tree = ast.parse(open(setup_py, encoding="utf-8").read())
    call = next(node for node in ast.walk(tree)
                if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    keywords = {k.arg: k.value for k in call.keywords}
    extras = keywords["extras_require"]
    dev = next(value for key, value in zip(extras.keys, extras.values) if getattr(key, "value", None) == "dev")
    strings = lambda node: [e.value for e in node.elts if isinstance(e, ast.Constant)]  # noqa: E731 (not f-strings)
    return ([Requirement(r) for r in strings(keywords["install_requires"])]
            + [Requirement(r) for r in strings(dev) if Requirement(r).name == "transformers"])


def check_packages() -> list[dict]:
    rows = []
    for requirement in requirements():
        version = installed_version(requirement.name)
        ok = version is not None and requirement.specifier.contains(version, prereleases=True)
        rows.append(dict(requirement=str(requirement), installed=version, satisfied=ok))
    for name in ("torch", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin"):  # context, no requirement
        version = installed_version(name)
        if version is not None:
            rows.append(dict(requirement=name, installed=version, satisfied=None))
    return rows


def write_json(path: str, data) -> None:
    """Whole or not at all (temporary sibling + rename), as diffusion_gemma.atomic_write does for every other
    result; not imported from there so that this file needs nothing but the standard library and packaging."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ figures
def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def parity_figures(d: dict) -> list[str]:
    ratios: dict[str, float] = {}
    for row in d["rows"]:
        ratios[row["dtype"]] = max(ratios.get(row["dtype"], 0.0), row["ratio_to_bound"])
    verdict = "all within bounds" if d["passed"] else "OUT OF BOUNDS"
    return [verdict] + [f"{dtype}: worst {ratio:.2f} of bound" for dtype, ratio in ratios.items()]


def train_step_figures(d: dict) -> list[str]:
    out = []
    for r in d["rows"]:
        who = "ours" if r["side"] == "jax" else "transformers"
        if "error" in r:
            out.append(f"L{r['layers']} {r['mode']} {who}: {r['error']}")
            continue
        speed = f", {r['speedup_vs_torch']:.2f}x transformers" if r.get("speedup_vs_torch") else ""
        out.append(f"L{r['layers']} {r['mode']} {who}: {r['step_s'] * 1e3:.0f} ms/step, MFU "
                   f"{_pct(r.get('mfu_with_lm_head'))} (w/o head {_pct(r.get('mfu_without_lm_head'))}){speed}")
    return out


def sampler_figures(d: dict) -> list[str]:
    out = [f"floor {d['floor_s'] * 1e3:.2f} ms"]
    for e in d["table"]:
        if "ours_forward_ms" in e:
            speed = f", {e['forward_speedup']:.2f}x transformers" if e.get("forward_speedup") else ""
            out.append(f"batch {e['batch']}: {e['ours_forward_ms']:.2f} ms/forward = "
                       f"{e['ours_forward_floor_pct']:.0f}% of floor{speed}")
        if "ours_step_ms" in e:
            out.append(f"batch {e['batch']}: {e['ours_tokens_per_s']:.0f} tokens/s")
    out += [f"{side}: {r['error']}" for side, r in d.get("sides", {}).items() if "error" in r]
    return out


def moe_figures(d: dict) -> list[str]:
    return [f"{r['variant']}: not run ({r['error']})" if "error" in r else
            f"{r['variant']}: {r['forward_ms']} / {r['forward_backward_ms']} ms fwd / fwd+bwd, dropped {r['dropped']}"
            for r in d["rows"]]


def compile_time_figures(d: dict) -> list[str]:
    return [f"L{r['layers']} {r['mode']}: {r['error']}" if "error" in r else
            f"L{r['layers']} {r['mode']}: {r['lower_s']:.1f} s lower + {r['compile_s']:.1f} s compile"
            for r in d["rows"]]


def generate_figures(d: dict) -> list[str]:
    out = []
    for r in d["rows"]:
        ours = 1e3 * r["ours"]["seconds"] / r["ours"]["steps"]
        line = f"batch {r['batch']}: ours {ours:.1f} ms/step"
        if r.get("reference"):
            theirs = 1e3 * r["reference"]["seconds"] / r["reference"]["steps"]
            line += f", transformers {theirs:.1f} ms/step ({theirs / ours:.2f}x)"
        out.append(line)
    return out


FIGURES = dict(parity=parity_figures, train_step=train_step_figures, sampler=sampler_figures, moe=moe_figures,
               compile_time=compile_time_figures, generate=generate_figures)


def read_rows(path: str, out_dir: str) -> list[dict]:
    """The rows gpu_suite.sh recorded (tab-separated: name, status, exit code, seconds, timeout, results file,
    command), each with its results file's key figures."""
    rows = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            name, status, code, seconds, timeout, results, command = line.rstrip("\n").split("\t")
            row = dict(name=name, status=status, exit_code=int(code) if code else None,
                       seconds=float(seconds) if seconds else None, timeout_s=float(timeout) if timeout else None,
                       results=results or None, command=command)
            path_ = os.path.join(out_dir, results) if results else None
            if path_ and os.path.exists(path_):
                try:
                    with open(path_) as g:
                        row["figures"] = FIGURES[name](json.load(g))
                except Exception as err:  # a half-written or unexpected file must not lose the record
                    row["figures"] = [f"figures unavailable: {type(err).__name__}: {err}"]
            elif row["status"] == "ok":
                row["status"] = "no results"
            rows.append(row)
    return rows


def summary(args) -> int:
    rows = read_rows(args.rows, args.out)
    packages = json.load(open(args.packages)) if args.packages and os.path.exists(args.packages) else None
    installed = open(args.installed).read().split() if args.installed and os.path.exists(args.installed) else []
    record = dict(mode=args.mode, started=args.started, wall_s=round(time.time() - float(args.started_epoch), 1),
                  budget_s=args.budget, gpu=args.gpu or None, jax=args.jax, python=sys.version.split()[0],
                  installed_wheels=[os.path.basename(p) for p in installed], packages=packages, rows=rows)
    write_json(os.path.join(args.out, "suite.json"), record)
    print(f"\nGPU suite ({args.mode}): {record['wall_s']:.0f} s of a {args.budget} s budget; "
          f"{args.gpu or 'no GPU seen'}; results in {args.out}\n{args.jax}\n")
    print("| row | status | seconds (cap) | results | figures |")
    print("|---|---|---|---|---|")
    for r in rows:
        seconds = "-" if r["seconds"] is None else f"{r['seconds']:.0f}"
        cap = "-" if r["timeout_s"] is None else f"{r['timeout_s']:.0f}"
        print(f"| {r['name']} | {r['status']} | {seconds} ({cap}) | {r['results'] or '-'} | "
              f"{'; '.join(r.get('figures', [])) or '-'} |")
    unmet = [p for p in packages or [] if p["satisfied"] is False]
    if unmet:
        print("\nunmet requirements: " + ", ".join(f"{p['requirement']} (installed {p['installed']})" for p in unmet))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("carry")
    select = commands.add_parser("select")
    select.add_argument("wheel_dir")
    packages = commands.add_parser("packages")
    packages.add_argument("output")
    summary_ = commands.add_parser("summary")
    for flag in ("--rows", "--out", "--packages", "--installed", "--mode", "--started", "--started_epoch", "--gpu",
                 "--jax"):
        summary_.add_argument(flag, default=None)
    summary_.add_argument("--budget", type=int, default=None)
    args = parser.parse_args(argv)
    if args.command == "carry":
        print("\n".join(carry_specs()))
    elif args.command == "select":
        for path in select_wheels(args.wheel_dir):
            print(path)
    elif args.command == "packages":
        rows = check_packages()
        write_json(args.output, rows)
        for row in rows:
            mark = {True: "ok", False: "UNMET", None: ""}[row["satisfied"]]
            print(f"  {row['requirement']:<28} {row['installed'] or 'missing':<16} {mark}")
    else:
        return summary(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

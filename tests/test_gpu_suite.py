"""experiments/benchmarks/gpu_suite.sh: the GPU suite's dry run on the CPU (every row at tiny shapes, each row's
results file and the suite's record), a failing, an unknown and a skipped row recorded without stopping the
rest, and the choice of which carried wheels to install."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess

import jax
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(REPO, "experiments", "benchmarks", "gpu_suite.sh")
ROWS = ("parity", "train_step", "sampler", "moe", "compile_time", "generate")

_spec = importlib.util.spec_from_file_location(
    "gpu_suite_check", os.path.join(REPO, "experiments", "benchmarks", "gpu_suite_check.py"))
gpu_suite_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_suite_check)


def run_suite(out: str, *args: str) -> subprocess.CompletedProcess:
    """The dry run into `out`, with the test suite's compile cache (reruns compile nothing) and the default one
    CPU device (not conftest's 8)."""
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                     if "xla_force_host_platform_device_count" not in f)
    env = dict(os.environ, XLA_FLAGS=flags, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    return subprocess.run(["bash", SUITE, "--dry-run", f"--out={out}", *args], env=env, capture_output=True,
                          text=True, timeout=1500)


def suite_rows(out: str) -> dict[str, dict]:
    with open(os.path.join(out, "suite.json")) as f:
        record = json.load(f)
    assert record["mode"] == "dry-run"
    return {row["name"]: row for row in record["rows"]}


def load(out: str, name: str) -> dict:
    with open(os.path.join(out, f"{name}.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gpu_suite"))
    # An unknown row first: recorded, and every row after it still runs.
    process = run_suite(out, "--rows=no_such_row," + ",".join(ROWS))
    return out, process


@pytest.mark.slow
def test_dry_run_writes_every_row_and_the_record(dry_run):
    out, process = dry_run
    assert process.returncode == 1, process.stdout[-3000:] + process.stderr[-3000:]  # the unknown row
    rows = suite_rows(out)
    assert list(rows) == ["no_such_row", *ROWS]
    assert rows["no_such_row"]["status"] == "unknown"
    for name in ROWS:
        assert rows[name]["status"] == "ok", (name, rows[name], process.stdout[-3000:])
        assert rows[name]["results"] == f"{name}.json" and rows[name]["figures"], rows[name]
        assert 0 < rows[name]["seconds"] <= rows[name]["timeout_s"] + 15
    # At most 8 files come back from the device: one per row, the record and the log.
    assert sorted(os.listdir(out)) == sorted([f"{name}.json" for name in ROWS] + ["suite.json", "suite.log"])
    log = open(os.path.join(out, "suite.log")).read()
    assert "=== no_such_row: unknown row" in log and "| generate | ok |" in log


@pytest.mark.slow
def test_dry_run_results_are_sane(dry_run):
    out, _ = dry_run
    parity = load(out, "parity")
    assert parity["passed"] and {(r["dtype"], r["output"]) for r in parity["rows"]} == {
        (d, o) for d in ("float32", "bfloat16") for o in ("logits", "encoder_hidden")}
    for row in parity["rows"]:
        assert 0 < row["ours_rms"] <= row["bound"] and row["finite"], row
    # bfloat16 rounding is visible, float32 rounding is far smaller: each dtype really ran.
    error = {r["dtype"]: r["ours_rms"] / r["value_rms"] for r in parity["rows"] if r["output"] == "logits"}
    assert error["float32"] < 1e-4 < error["bfloat16"]

    train = load(out, "train_step")
    assert {(r["side"], r["mode"]) for r in train["rows"]} == {("jax", "full"), ("torch", "full")}
    for row in train["rows"]:
        assert "error" not in row and row["step_s"] > 0 and 0 < row["mfu_with_lm_head"] < 1, row
        assert all(loss == loss for loss in row["losses"]), row  # finite, not NaN
    assert train["rows"][0]["speedup_vs_torch"] > 0

    sampler = load(out, "sampler")
    assert sampler["floor_s"] > 0 and [e["batch"] for e in sampler["table"]] == [1]
    entry = sampler["table"][0]
    assert entry["ours_forward_ms"] > 0 and entry["transformers_forward_ms"] > 0 and entry["ours_forward_floor_pct"] > 0

    moe = {r["variant"]: r for r in load(out, "moe")["rows"]}
    assert set(moe) == {"dense", "grouped", "expert_parallel", "expert_parallel@1.25", "expert_parallel_ragged"}
    for name in ("dense", "grouped", "expert_parallel"):
        assert moe[name]["forward_ms"] > 0 and moe[name]["dropped"] == 0, moe[name]
    assert "error" in moe["expert_parallel_ragged"]  # no ragged all-to-all on XLA:CPU: recorded, not fatal

    compile_rows = load(out, "compile_time")["rows"]
    assert [(r["layers"], r["mode"]) for r in compile_rows] == [(1, "full")]
    assert compile_rows[0]["compile_s"] > 0 and compile_rows[0]["backend"] == "cpu"

    (generate,) = load(out, "generate")["rows"]
    assert generate["ours"]["steps"] == generate["reference"]["steps"] == 2
    assert generate["ours"]["generated"] == generate["reference"]["generated"] == 16


@pytest.mark.slow
def test_failed_row_is_recorded_and_the_next_runs(tmp_path):
    process = run_suite(str(tmp_path), "--rows=generate,moe", "--inject-failure=generate")
    assert process.returncode == 1
    rows = suite_rows(str(tmp_path))
    assert rows["generate"]["status"] == "failed" and rows["generate"]["exit_code"] == 2
    assert rows["generate"]["results"] is None and not os.path.exists(tmp_path / "generate.json")
    assert rows["moe"]["status"] == "ok" and os.path.exists(tmp_path / "moe.json")


def test_rows_past_the_budget_are_skipped(tmp_path):
    process = run_suite(str(tmp_path), "--rows=parity,moe", "--budget=5")
    assert process.returncode == 1
    rows = suite_rows(str(tmp_path))
    assert [rows[name]["status"] for name in ("parity", "moe")] == ["skipped", "skipped"]
    assert sorted(os.listdir(tmp_path)) == ["suite.json", "suite.log"]


def test_select_installs_only_missing_or_older_distributions(tmp_path, monkeypatch):
    installed = {"transformers": "5.17.0", "click": "8.6.0", "grain": None}
    monkeypatch.setattr(gpu_suite_check, "installed_version", lambda name: installed.get(name))
    for wheel in ("transformers-5.25.0-py3-none-any.whl", "transformers-5.23.0-py3-none-any.whl",
                  "click-8.5.1-py3-none-any.whl", "grain-0.2.18-cp312-cp312-manylinux_2_28_x86_64.whl",
                  "notes.txt"):
        (tmp_path / wheel).touch()
    chosen = [os.path.basename(p) for p in gpu_suite_check.select_wheels(str(tmp_path))]
    # grain is missing, transformers older (only the newest of its two wheels), click newer: left alone.
    assert chosen == ["grain-0.2.18-cp312-cp312-manylinux_2_28_x86_64.whl", "transformers-5.25.0-py3-none-any.whl"]


def test_requirements_come_from_setup_py_with_the_transformers_pin():
    names = {r.name: str(r.specifier) for r in gpu_suite_check.requirements()}
    assert names["transformers"] == "==5.25.0"
    assert {"jax", "flax", "grain", "ml-collections", "tensorboardX"} <= set(names)
    carried = dict(spec.split("==") for spec in gpu_suite_check.carry_specs())
    assert carried["transformers"] == "5.25.0" and set(carried) == set(gpu_suite_check.CARRIED)

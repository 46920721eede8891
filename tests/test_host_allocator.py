"""The training CLI's re-exec with huge-page malloc: when it happens (a CPU-backend, single-process launch, or
the switch), what environment the child gets, that it really runs with it, and that the CLI says so once."""

import dataclasses
import functools
import os
import subprocess
import sys

import pytest

from diffusion_gemma import distributed, host_allocator as ha
from diffusion_gemma import train as train_cli
from diffusion_gemma.training.config import TrainConfig

from cli_runs import REPO, cli_env, run_flag_main, write_config_file

LINUX = dict(platform="linux", glibc=(2, 36), thp="madvise")
CPU = {"JAX_PLATFORMS": "cpu"}


@pytest.mark.parametrize("environ, single_process, accelerators, host, expected", [
    (CPU, True, [], LINUX, True),
    ({}, True, [], LINUX, True),                                   # no platform named, no accelerator in sight
    ({"JAX_PLATFORMS": "CPU"}, True, ["/dev/nvidia0"], LINUX, True),  # the CPU asked for explicitly
    ({}, True, ["/dev/nvidia0"], LINUX, False),                    # JAX would pick the GPU
    ({}, True, ["TPU_ACCELERATOR_TYPE"], LINUX, False),
    ({"JAX_PLATFORMS": "cuda"}, True, [], LINUX, False),
    ({"JAX_PLATFORMS": "cuda,cpu"}, True, [], LINUX, False),
    (CPU, False, [], LINUX, False),                                # multi-process launches are left alone
    ({**CPU, ha.SWITCH: "1"}, False, ["/dev/accel0"], LINUX, True),  # the switch asks for it anywhere
    ({**CPU, ha.SWITCH: "0"}, True, [], LINUX, False),
    ({**CPU, ha.SWITCH: "1"}, True, [], dict(LINUX, glibc=(2, 34)), False),  # no such tunable before 2.35
    (CPU, True, [], dict(LINUX, glibc=()), False),                 # musl and others
    (CPU, True, [], dict(LINUX, thp="never"), False),              # THP disabled: nothing to gain
    (CPU, True, [], dict(LINUX, platform="darwin"), False),
    ({**CPU, ha.TUNABLES: "glibc.malloc.hugetlb=0"}, True, [], LINUX, False),  # the user's choice wins
    ({**CPU, ha.TUNABLES: "glibc.malloc.arena_max=2"}, True, [], LINUX, True),
])
def test_when_the_cli_reexecutes(environ, single_process, accelerators, host, expected):
    assert ha.wants_huge_pages(environ, single_process=single_process, accelerators=accelerators,
                               **host) is expected


def test_a_bad_switch_value_names_the_variable():
    with pytest.raises(ha.HugePagesSwitchError, match=rf"{ha.SWITCH}='yes': expected 1 .* 0 "):
        ha.wants_huge_pages({ha.SWITCH: "yes"}, single_process=True, accelerators=[], **LINUX)


def test_accelerators_are_seen_from_device_files_and_tpu_variables(tmp_path):
    patterns = [str(tmp_path / "nvidia[0-9]*"), str(tmp_path / "accel[0-9]*")]
    assert ha.accelerator_evidence({}, patterns) == []
    (tmp_path / "nvidiactl").write_text("")  # the control node alone is no GPU
    (tmp_path / "accel1").write_text("")
    assert ha.accelerator_evidence({"TPU_WORKER_ID": "0", "HOME": "/"}, patterns) == [
        str(tmp_path / "accel1"), "TPU_WORKER_ID"]


def test_child_environment_keeps_the_users_tunables():
    assert ha.with_huge_pages({"A": "1"}) == {"A": "1", ha.TUNABLES: ha.HUGE_PAGES}
    env = ha.with_huge_pages({ha.TUNABLES: "glibc.malloc.arena_max=2"})
    assert env[ha.TUNABLES] == "glibc.malloc.arena_max=2:" + ha.HUGE_PAGES


def test_host_probes_return_known_values():
    if sys.platform != "linux":
        pytest.skip("glibc/THP detection is Linux-only")
    assert ha.glibc_version() == () or ha.glibc_version() >= (2, 0)
    assert ha.transparent_huge_pages() in ("always", "madvise", "never", "")


def _tunable_can_act() -> bool:
    return sys.platform == "linux" and ha.glibc_version() >= (2, 35) and \
        ha.transparent_huge_pages() in ("always", "madvise")


def _probe(tmp_path, single_process: bool, **env_changes) -> list[str]:
    """A module that calls the re-exec and prints what it sees: its PID and tunables at each start, then its
    arguments."""
    (tmp_path / "probe_reexec.py").write_text(
        "import os, sys\n"
        "print('start', os.getpid(), os.environ.get('GLIBC_TUNABLES', ''), flush=True)\n"
        "from diffusion_gemma import host_allocator\n"
        f"host_allocator.reexec_with_huge_pages('probe', single_process={single_process})\n"
        "print('args', sys.argv[1:], flush=True)\n")
    env = {k: v for k, v in os.environ.items() if k not in (ha.TUNABLES, ha.SWITCH)}
    env.update(env_changes, PYTHONPATH=os.pathsep.join([str(tmp_path), REPO, env.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "probe_reexec", "--x=1"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=60, check=True).stdout.splitlines()


@pytest.mark.skipif(not _tunable_can_act(), reason="needs Linux with glibc >= 2.35 and transparent huge pages, "
                    "where the re-exec applies")
def test_reexec_replaces_the_process_with_the_tunable_set_and_says_so_once(tmp_path):
    out = _probe(tmp_path, single_process=True, JAX_PLATFORMS="cpu")
    assert len(out) == 4, out
    first, line, second = out[0].split(" ", 2), out[1], out[2].split(" ", 2)
    assert first[0] == second[0] == "start" and first[1] == second[1]  # same process, run twice
    assert first[2] == "" and second[2] == ha.HUGE_PAGES
    assert line.startswith(f"probe: re-executing with {ha.TUNABLES}={ha.HUGE_PAGES}") and f"{ha.SWITCH}=0" in line
    assert out[3] == "args ['--x=1']"


@pytest.mark.skipif(not _tunable_can_act(), reason="needs Linux with glibc >= 2.35 and transparent huge pages, "
                    "where the re-exec would otherwise apply")
@pytest.mark.parametrize("single_process, env", [(False, {"JAX_PLATFORMS": "cpu"}),
                                                 (True, {"JAX_PLATFORMS": "cuda"}),
                                                 (True, {"JAX_PLATFORMS": "cpu", ha.SWITCH: "0"})])
def test_no_reexec_on_multi_process_accelerator_or_switched_off_launches(tmp_path, single_process, env):
    out = _probe(tmp_path, single_process=single_process, **env)
    assert len(out) == 2 and out[0].split(" ", 2)[2] == "" and out[1] == "args ['--x=1']", out


@pytest.fixture
def reexec_calls(monkeypatch):
    """Records the CLI's calls of the re-exec; `distributed.initialize` then stops `main` before any JAX work."""
    calls = []

    class Stop(Exception):
        pass

    def initialize(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(ha, "reexec_with_huge_pages", lambda prog, **kwargs: calls.append((prog, kwargs)))
    monkeypatch.setattr(distributed, "initialize", initialize)
    return calls, Stop


@pytest.mark.parametrize("flags, single_process", [
    ([], True),
    (["--coordinator_address=localhost:1234", "--num_processes=2", "--process_id=0"], False),
])
def test_the_cli_passes_the_launch_kind_and_in_process_calls_never_reexecute(tmp_path, reexec_calls, flags,
                                                                             single_process):
    calls, stop = reexec_calls
    config = write_config_file(TrainConfig(num_steps=2), str(tmp_path / "config.py"))
    argv = ["train", f"--config={config}", f"--workdir={tmp_path / 'run'}", *flags]
    with pytest.raises(stop):
        run_flag_main(functools.partial(train_cli.main, may_reexec=True), argv)
    assert calls == [("train", {"single_process": single_process})]
    with pytest.raises(stop):
        run_flag_main(train_cli.main, argv)  # a notebook or test calling main: never replaced
    assert len(calls) == 1


@pytest.mark.slow  # see tests/conftest.py
@pytest.mark.skipif(not _tunable_can_act(), reason="needs Linux with glibc >= 2.35 and transparent huge pages, "
                    "where the re-exec applies")
def test_the_training_cli_says_it_reexecutes_once_on_stdout(tmp_path):
    """A CPU launch that fails after the re-exec (its init checkpoint does not exist): one line on stdout about
    the re-exec, one error line on stderr; a usage error, found before, prints nothing on stdout."""
    base = TrainConfig(num_steps=2)
    config = write_config_file(dataclasses.replace(base, model=dataclasses.replace(base.model, init_checkpoint=str(
        tmp_path / "nope"))), str(tmp_path / "config.py"))
    env = {k: v for k, v in cli_env(1).items() if k not in (ha.TUNABLES, ha.SWITCH)}

    def run(*flags):
        return subprocess.run([sys.executable, "-m", "diffusion_gemma.train", f"--config={config}",
                               f"--workdir={tmp_path / 'run'}", *flags], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)

    result = run()
    assert result.returncode == 1, result.stderr
    assert [line for line in result.stdout.splitlines() if "re-executing" in line] == [
        f"train: re-executing with {ha.TUNABLES}={ha.HUGE_PAGES} (huge pages for XLA:CPU's large host buffers; "
        f"{ha.SWITCH}=0 turns this off)"]
    assert len(result.stderr.strip().splitlines()) == 1 and "no such checkpoint directory" in result.stderr
    result = run("--config.num_steps=abc")
    assert result.returncode == 2 and not result.stdout

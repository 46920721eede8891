"""Multi-process training on JAX's distributed runtime: two CLI processes x 4 CPU devices (gloo collectives)
train with experts spread over both processes, are killed, resume, and match one process on 8 devices. Plus
the pieces that make that work: launch detection, per-process data rows, process-local batch rows."""

import os
import signal
import threading

import jax
import numpy as np
import pytest

from cli_runs import (CRASHING_TRAIN, TRAIN_CLI, checkpoint_steps, cli_env, free_port, launch_train, read_metrics,
                      tails, wait_all, write_config_file)
from test_training import TINY_MODEL, read_params, tiny_config
from diffusion_gemma import distributed, sharding
from diffusion_gemma.data import pipeline
from diffusion_gemma.sharding import MeshConfig
from diffusion_gemma.training.config import CheckpointSection, ModelSection

pytestmark = pytest.mark.slow  # see tests/conftest.py

# Float tolerance between the two-process and the one-process run: same program, compiler flags and data rows,
# but the cross-process reductions run through gloo instead of XLA's in-process all-reduce, which may add
# partial sums in another order: fp32 rounding, ~1e-7 relative per step, compounded over a few Adam steps.
# The measured difference is printed with -s.
RTOL = 1e-5


def two_process_config():
    """Every expert on its own device, experts 0-3 in process 0 and 4-7 in process 1 (expert-parallel MoE); one
    layer, to keep compilation short. Checkpoints every 2 steps."""
    return tiny_config(num_steps=6, mesh=MeshConfig(data=1, expert=8),
                       model=ModelSection(preset="tiny", overrides={**TINY_MODEL, "num_layers": 1,
                                                                     "moe_impl": "expert_parallel"}),
                       checkpoint=CheckpointSection(every_steps=2, keep=10, async_save=True))


def test_two_processes_die_mid_save_resume_and_match_one_process(tmp_path):
    config = two_process_config()
    config_file = write_config_file(config, str(tmp_path / "config.py"))
    one_dir, workdir = str(tmp_path / "one_process"), str(tmp_path / "two_processes")

    def launch(run: int, *flags: str, program=TRAIN_CLI):
        port = free_port()
        logs = [str(tmp_path / f"run{run}_process{i}.log") for i in range(2)]
        processes = [launch_train(config_file, workdir, f"--coordinator_address=localhost:{port}",
                                  "--num_processes=2", f"--process_id={i}", *flags, program=program,
                                  env=cli_env(4, fast_compile=True), log=logs[i]) for i in range(2)]
        return processes, logs

    # The reference, one process on 8 devices (same compiler flags), runs alongside run 1.
    one_log = str(tmp_path / "one_process.log")
    one = launch_train(config_file, one_dir, env=cli_env(8, fast_compile=True), log=one_log)
    # Run 1: process 0 (the one that commits) dies just before committing checkpoint 4; then process 1 is killed.
    processes, logs = launch(1, "--kill_at_step=4", "--kill_point=commit", program=CRASHING_TRAIN)
    assert wait_all(processes[:1], 600, logs) == [-signal.SIGKILL], tails(logs)
    processes[1].kill()  # it may already have stopped itself, having lost the coordinator
    assert wait_all(processes[1:], 60, logs) != [0]
    assert "before committing checkpoint 4" in open(logs[0]).read()
    assert checkpoint_steps(workdir) == [2]
    crashed = read_metrics(workdir)  # the commit is asynchronous: step 5 may have run before the kill
    assert [record["step"] for record in crashed] == list(range(1, len(crashed) + 1)) and len(crashed) >= 4

    # Run 2: both resume from checkpoint 2 and finish.
    processes, logs = launch(2)
    assert wait_all(processes + [one], 600, logs + [one_log]) == [0, 0, 0], tails(logs + [one_log])
    # Process 0 alone writes metrics; the resumed run's lines for steps 3 on replaced the crashed run's.
    records = read_metrics(workdir)
    assert [record["step"] for record in records] == list(range(1, config.num_steps + 1))
    assert len(os.listdir(os.path.join(workdir, "tensorboard"))) == 2  # one event file per run, process 0's
    assert checkpoint_steps(workdir) == [2, 4, 6]

    two = np.array([record["loss"] for record in records])
    reference = np.array([record["loss"] for record in read_metrics(one_dir)])
    worst = float(np.max(np.abs(two - reference) / np.abs(reference)))
    print(f"two processes vs one: max relative loss difference {worst:.1e}")
    np.testing.assert_allclose(two, reference, rtol=RTOL, err_msg=f"max relative difference {worst:.1e}")
    # The resumed steps equal the crashed run's own: exact resume across processes.
    np.testing.assert_array_equal([record["loss"] for record in crashed[2:]], two[2:len(crashed)])
    one_params = read_params(one_dir, config.num_steps)
    two_params = read_params(workdir, config.num_steps)
    assert two_params.keys() == one_params.keys()
    for path, value in one_params.items():
        np.testing.assert_allclose(two_params[path], value, rtol=RTOL, atol=1e-6, err_msg="/".join(path))


def test_process_rows_side_by_side_are_the_single_process_batch():
    config = pipeline.DataConfig(num_synthetic_examples=20, global_batch_size=8)
    source = pipeline.make_source(config)
    whole = iter(pipeline.make_dataset(source, config, num_steps=4))
    shares = [iter(pipeline.make_dataset(source, config, num_steps=4, rows=rows)) for rows in ((0, 3), (3, 8))]
    for _ in range(5):  # crosses an epoch boundary (20 examples, 8 per step)
        batch, parts = next(whole), [next(share) for share in shares]
        for name, value in batch.items():
            np.testing.assert_array_equal(np.concatenate([part[name] for part in parts]), value, err_msg=name)
    assert [share.get_state() for share in shares] == [whole.get_state()] * 2  # what a checkpoint stores
    with pytest.raises(ValueError, match="not a block"):
        pipeline.make_dataset(source, config, num_steps=4, rows=(3, 9))


def test_process_batch_rows_cover_what_the_devices_hold():
    for mesh_config in (MeshConfig(data=1, expert=8), MeshConfig(data=2, expert=4)):
        mesh = sharding.make_mesh(mesh_config)
        assert sharding.process_batch_rows(mesh, 16) == (0, 16)  # one process holds every row
        assert sharding.process_batch_rows(mesh, 3) == (0, 3)  # replicated batch: every process loads it all


def test_launch_kind_detects_clusters_and_checks_manual_flags():
    assert distributed.launch_kind(environ={}) is None
    assert distributed.launch_kind("host:1234", 2, 1, environ={}) == "manual"
    assert distributed.launch_kind(environ={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) == "slurm"
    assert distributed.launch_kind(environ={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
    assert distributed.launch_kind(environ={"OMPI_COMM_WORLD_SIZE": "2"}) == "mpi"
    assert distributed.launch_kind(environ={"TPU_WORKER_HOSTNAMES": "a,b"}) == "tpu"
    assert distributed.launch_kind(environ={"TPU_WORKER_HOSTNAMES": "a"}) is None
    with pytest.raises(distributed.DistributedSetupError, match="missing --process_id"):
        distributed.launch_kind("host:1234", 2, None, environ={})
    with pytest.raises(distributed.DistributedSetupError, match="not in"):
        distributed.launch_kind("host:1234", 2, 2, environ={})
    assert distributed.initialize(environ={}) is None and jax.process_count() == 1


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="Python delivers signals to the main thread only")
def test_one_process_stop_signal_turns_sigterm_into_a_stop_and_restores_the_handler():
    previous = signal.getsignal(signal.SIGTERM)
    with distributed.StopSignal() as stop:
        assert not stop.check()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.check() and stop.reason == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is previous
    distributed.barrier("a_no_op_for_one_process")

"""Joining a multi-process job (fgpair_jax/distributed.py), without running one.

The environment a launcher sets decides everything: these tests pass environments as dicts. The runs
themselves are in test_multiprocess.py.
"""
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO
from fgpair_jax import distributed
from fgpair_jax.distributed import DistributedInitError, Job

# The reproduction: what SLURM sets for a 2-task allocation (+ SLURM_STEP_ID inside an srun step).
SLURM = {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1",
         "SLURM_STEP_NODELIST": "localhost"}


def test_explicit_variables_describe_the_job():
    job = distributed.describe_job({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
                                    "JAX_PROCESS_ID": "3"})
    assert job == Job("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234", 4, 3, None)
    assert distributed.describe_job({}) is None


@pytest.mark.parametrize("environ,named", [
    ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "JAX_COORDINATOR_ADDRESS set but JAX_NUM_PROCESSES, JAX_PROCESS_ID not"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "but JAX_COORDINATOR_ADDRESS not"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES='two'"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "JAX_PROCESS_ID=2 must lie"),
])
def test_an_incomplete_description_is_one_line_naming_the_variable(environ, named):
    with pytest.raises(DistributedInitError) as raised:
        distributed.describe_job(environ)
    assert named in str(raised.value) and "\n" not in str(raised.value)


def test_slurm_joins_inside_an_srun_step_only():
    # Outside a step (the batch script, an salloc shell): one process, and a hint.
    assert distributed.describe_job(SLURM) is None
    assert "start it with `srun`" in distributed.launch_hint(SLURM)
    for batch_step in ("batch", "4294967294", "extern"):
        assert distributed.describe_job(dict(SLURM, SLURM_STEP_ID=batch_step)) is None
    # Inside a step: every task joins; the coordinator is the step's first node.
    job = distributed.describe_job(dict(SLURM, SLURM_STEP_ID="0", SLURM_JOB_ID="12345",
                                        SLURM_STEP_NODELIST="gpu[007-009],cpu1"))
    assert job.coordinator_address == f"gpu007:{61440 + 12345 % 4096}"
    assert (job.num_processes, job.process_id) == (2, 1) and distributed.launch_hint(dict(SLURM, SLURM_STEP_ID="0")) is None
    assert distributed.describe_job(dict(SLURM, SLURM_STEP_ID="0", JAX_COORDINATOR_PORT="4000")).coordinator_address == "localhost:4000"
    assert distributed.describe_job(dict(SLURM, SLURM_STEP_ID="0", SLURM_NTASKS="1", SLURM_PROCID="0")) is None
    # Explicit variables win over SLURM's.
    explicit = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "3", "JAX_PROCESS_ID": "0"}
    assert distributed.describe_job(dict(SLURM, SLURM_STEP_ID="0", **explicit)).num_processes == 3


@pytest.mark.parametrize("nodelist,host", [("node1", "node1"), ("node1,node2", "node1"), ("a[3-5]", "a3"),
                                           ("a[07,9-11],b2", "a07"), ("gpu-a100-[12-13]", "gpu-a100-12")])
def test_first_host_of_a_slurm_host_list(nodelist, host):
    assert distributed.first_host(nodelist) == host


@pytest.mark.parametrize("extra,devices", [
    ({"SLURM_NTASKS": "2", "SLURM_STEP_NUM_NODES": "2", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, None),  # a task per node: all its GPUs
    ({"SLURM_NTASKS": "8", "SLURM_STEP_NUM_NODES": "1", "CUDA_VISIBLE_DEVICES": "5"}, None),  # --gpus-per-task=1: its one GPU
    ({"SLURM_NTASKS": "8", "SLURM_STEP_NUM_NODES": "1", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, (1,)),  # sharing: one each
    ({"SLURM_NTASKS": "8", "SLURM_STEP_NUM_NODES": "1", "JAX_LOCAL_DEVICE_IDS": "2,3"}, None),  # the user's choice: JAX reads it
])
def test_every_allocated_gpu_is_used_however_slurm_shows_them(extra, devices):
    """JAX's own SLURM detection would give each task GPU number SLURM_LOCALID only: 1 of 8 GPUs with a task
    per node, an invalid ordinal with a GPU per task (jax-ml/jax issues 23452, 28194)."""
    job = distributed.describe_job(dict(SLURM, SLURM_STEP_ID="0", **extra))
    assert job.local_device_ids == devices


def test_a_cloud_tpu_vm_is_left_to_jax_to_detect(monkeypatch, capsys):
    assert distributed.describe_job({}, on_tpu_vm=True) == Job("Cloud TPU VM")
    assert distributed.on_cloud_tpu_vm() is False  # this machine
    # A TPU VM whose metadata describes no slice (a single-host VM elsewhere than GCE): one process, a warning.
    calls = []

    def no_slice(*args, **kwargs):
        calls.append(kwargs)
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setattr(distributed, "on_cloud_tpu_vm", lambda: True)
    monkeypatch.setattr(distributed.jax.distributed, "initialize", no_slice)
    distributed.maybe_initialize({})
    assert calls and calls[0]["cluster_detection_method"] is None  # JAX's own detection
    assert "could not detect a pod slice (coordinator_address should be defined.)" in capsys.readouterr().err


def run_main(tmp_path, env_vars: dict, timeout=120):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES",
                                                                  "JAX_PROCESS_ID"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""), **env_vars)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "fgpair_jax.main", "--config=configs/cub.py:tiny",
                             f"--workdir={tmp_path / 'run'}", f"--config.data.manual_dir={tmp_path / 'none'}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return result, time.perf_counter() - started


def error_lines(result) -> list:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_peer_that_never_comes_ends_the_wait_in_one_line(tmp_path):
    """An srun step's task 0 whose peer never starts: one line after the timeout (JAX alone aborts from C++)."""
    result, elapsed = run_main(tmp_path, dict(SLURM, SLURM_STEP_ID="0", SLURM_PROCID="0", SLURM_LOCALID="0",
                                              JAX_COORDINATOR_PORT=str(free_port()), FGPAIR_INITIALIZATION_TIMEOUT="3"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert error_lines(result) == [error_lines(result)[0]] and "process 0 of 2 could not join the job (SLURM job 1 " \
        "step 0) at localhost:" in error_lines(result)[0]
    assert "within 3 s" in error_lines(result)[0] and "Traceback" not in result.stderr
    assert "Check failure stack trace" not in result.stderr and elapsed < 90


def test_half_an_explicit_description_is_one_line_before_any_jax_call(tmp_path):
    """The issue's reproduction: JAX_COORDINATOR_ADDRESS alone used to end in 'Number of processes must be defined'."""
    result, _ = run_main(tmp_path, {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}"})
    assert result.returncode == 2
    assert error_lines(result) == ["error: JAX_COORDINATOR_ADDRESS set but JAX_NUM_PROCESSES, JAX_PROCESS_ID not: a "
                                   "multi-process job needs all of JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
                                   "JAX_PROCESS_ID (launch/local.sh sets them), or none of them."], result.stderr[-2000:]


def test_nothing_before_joining_creates_a_jax_backend(tmp_path):
    """JAX refuses to join a job once a backend exists (the issue's first reproduction: the start-up banner
    asked for the device count first). What train and evaluate do before `maybe_initialize` must make no
    JAX call: validating the config, and reading a saved one."""
    code = ("import os, sys; sys.path.insert(0, 'tests')\n"
            "from jax._src import xla_bridge\n"
            "from conftest import tiny_config\n"
            "from fgpair_jax import run_config\n"
            "config = run_config.resolved(tiny_config())\n"
            "run_config.validate(config)\n"
            f"with open(os.path.join({str(tmp_path)!r}, 'config.json'), 'w') as f:\n"
            "    f.write(config.to_json_best_effort())\n"
            f"run_config.load({str(tmp_path)!r})\n"
            "assert not xla_bridge.backends_are_initialized(), 'a JAX backend exists'\n"
            "print('clean')\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "clean" in result.stdout, result.stderr[-2000:]


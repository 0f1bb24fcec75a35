"""The launch scripts (launch/): what they start, with fake `srun` and `gcloud`; local.sh for real."""
import os
import subprocess
import sys
import time

from conftest import REPO

LAUNCH = os.path.join(REPO, "launch")


def fake_command(directory, name: str) -> str:
    """An executable `name` in `directory` that appends its arguments, one per line, to `<name>.calls`, and
    copies every argument that is an existing file into `<directory>/copied/` (what scp would send)."""
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(f"""#!/usr/bin/env bash
printf "%s\\n" "$@" >> "{path}.calls"; echo ---- >> "{path}.calls"
mkdir -p "{directory}/copied"; for a in "$@"; do [ -f "$a" ] && cp "$a" "{directory}/copied/"; done; true
""")
    os.chmod(path, 0o755)
    return path


def calls(path: str) -> list:
    with open(f"{path}.calls") as f:
        return [call.strip("\n").split("\n") for call in f.read().split("----\n") if call.strip()]


def test_slurm_script_runs_one_srun_step_that_ends_all_tasks_when_one_fails(tmp_path):
    srun = fake_command(str(tmp_path), "srun")
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    subprocess.run(["bash", os.path.join(LAUNCH, "slurm_gpu.sh"), "configs/cub.py", "/runs/a b", "--config.seed=1"],
                   env=env, check=True, timeout=30)
    assert calls(srun) == [["--kill-on-bad-exit=1", "python", "-m", "fgpair_jax.main", "--config=configs/cub.py",
                            "--workdir=/runs/a b", "--config.seed=1"]]
    header = open(os.path.join(LAUNCH, "slurm_gpu.sh")).read()
    assert "#SBATCH --ntasks-per-node=1" in header and "#SBATCH --signal=TERM@120" in header


def test_tpu_script_installs_a_supported_python_and_trains_detached(tmp_path):
    gcloud = fake_command(str(tmp_path), "gcloud")
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    overrides = ["--config.fgpair.sigma=2", "--config.data.manual_dir=/mnt/my data/CUB's"]
    subprocess.run(["bash", os.path.join(LAUNCH, "tpu_pod.sh"), "pod", "zone-a", "configs/cub.py", "/mnt/runs/r 1",
                    *overrides], env=env, check=True, timeout=120, capture_output=True)
    scp, ssh = calls(gcloud)
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and ssh[:4] == ["compute", "tpus", "tpu-vm", "ssh"]
    assert "--worker=all" in scp and "--worker=all" in ssh
    command = ssh[ssh.index("--command") + 1]
    assert command.startswith("mkdir -p /mnt/runs/r\\ 1/logs && setsid nohup bash /tmp/fgpair_run.sh ")
    assert ">/mnt/runs/r\\ 1/logs/$(hostname).log 2>&1 </dev/null &" in command  # detached, its log in the workdir
    # What every host runs: valid bash; Python >= 3.11 (uv's CPython 3.11 where the image has an older one).
    script = os.path.join(tmp_path, "copied", "fgpair_run.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    text = open(script).read()
    assert "sys.version_info < (3, 11)" in text and "uv venv -q --seed --python 3.11 ~/.fgpair_venv" in text
    assert os.path.exists(os.path.join(tmp_path, "copied", "fgpair_jax.tgz"))
    # Its last line passes every argument through intact, spaces and quotes included.
    last = text.strip().splitlines()[-1]
    assert last.startswith("exec ~/.fgpair_venv/bin/python -m fgpair_jax.main ")
    echoed = subprocess.run(["bash", "-c", last.replace("exec ~/.fgpair_venv/bin/python", "printf '%s\\n'", 1)],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    assert echoed == ["-m", "fgpair_jax.main", "--config=configs/cub.py", "--workdir=/mnt/runs/r 1", *overrides]


def test_local_sh_gives_each_process_its_place_and_stops_all_when_one_fails(tmp_path):
    script = ('echo "$JAX_PROCESS_ID of $JAX_NUM_PROCESSES at $JAX_COORDINATOR_ADDRESS"; '
              '[ "$JAX_PROCESS_ID" = 1 ] && sleep 2 && exit 3; exec sleep 60')
    env = dict(os.environ, LOG_DIR=str(tmp_path / "logs"), PYTHON=sys.executable)
    started = time.perf_counter()
    result = subprocess.run([os.path.join(LAUNCH, "local.sh"), "3", "bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert time.perf_counter() - started < 15  # the sleeping processes were stopped
    assert result.returncode == 3
    assert result.stderr.strip().splitlines() == [
        f"local.sh: process 1 (pid {open(tmp_path / 'logs' / 'process_1.pid').read().strip()}) exited with status 3; "
        "stopping the other processes."]
    lines = [open(tmp_path / "logs" / f"process_{i}.log").read().split() for i in range(3)]
    assert [words[:3] for words in lines] == [[str(i), "of", "3"] for i in range(3)]
    assert len({words[4] for words in lines}) == 1 and lines[0][4].startswith("127.0.0.1:")


def test_local_sh_runs_the_repositorys_venv_python_else_python3_and_says_which(tmp_path):
    """After the README's quick start (a .venv, never activated) `python` may be absent or lack the packages."""
    repo, bin_dir = tmp_path / "repo", tmp_path / "bin"
    (repo / "launch").mkdir(parents=True)
    (repo / "launch" / "local.sh").write_text(open(os.path.join(LAUNCH, "local.sh")).read())
    (repo / "launch" / "local.sh").chmod(0o755)
    (repo / ".venv" / "bin").mkdir(parents=True)
    bin_dir.mkdir()
    venv_python = fake_command(str(repo / ".venv" / "bin"), "python")
    python3 = fake_command(str(bin_dir), "python3")
    env = {key: value for key, value in os.environ.items() if key != "PYTHON"}
    env.update(PORT="1", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    command = [str(repo / "launch" / "local.sh"), "1", "--config=configs/cub.py:tiny"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert calls(venv_python) == [["-m", "fgpair_jax.main", "--config=configs/cub.py:tiny"]]
    assert "local.sh: 1 process(es) of /" in result.stderr and "/.venv/bin/python -m fgpair_jax.main" in result.stderr
    os.remove(venv_python)  # no venv: python3 from PATH, never a bare `python`
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and calls(python3) == [["-m", "fgpair_jax.main", "--config=configs/cub.py:tiny"]]
    assert "of python3 -m fgpair_jax.main" in result.stderr

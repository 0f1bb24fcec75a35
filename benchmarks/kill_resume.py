"""Kill harness: interrupted runs (kill -9 at random moments, SIGTERM) must end exactly where an
uninterrupted run ends.

For each trial: train the `tiny` config on a synthetic CUB folder, interrupting it 1-3 times at random
moments of training — `kill -9` (also while an asynchronous checkpoint is being written, since the tiny
run saves every `--checkpoint_every` steps) or SIGTERM — and rerun the same command until it finishes.
Then compare its final checkpoint (every leaf of the train state), eval/features.npz, eval/metrics.json
and the training losses in metrics.jsonl with the uninterrupted reference. The reference is run twice:
the second copy checks determinism (same config and seed -> identical metrics.json).

    python benchmarks/kill_resume.py --trials=10 --out=results/bench/kill_resume.json

`tests/test_reliability.py` runs one short trial of the same code.
"""
import argparse
import glob
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from fgpair_jax.data.synthetic import write_tiny_cub  # noqa: E402
from fgpair_jax.metrics_writer import read_jsonl  # noqa: E402


def command(workdir: str, data_dir: str, overrides=()) -> list:
    return [sys.executable, "-m", "fgpair_jax.main", "--config=configs/cub.py:tiny", f"--workdir={workdir}",
            f"--config.data.manual_dir={data_dir}", *overrides]


def start(workdir, data_dir, overrides, log_path, compilation_cache=""):
    """Launch the run in the background. A shared persistent compilation cache makes relaunches cheap
    (the same compiled program is loaded, so results are unaffected)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if compilation_cache:
        env.update(JAX_COMPILATION_CACHE_DIR=compilation_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    log = open(log_path, "a")
    return subprocess.Popen(command(workdir, data_dir, overrides), cwd=REPO, env=env, stdout=log, stderr=log)


def run_to_end(workdir, data_dir, overrides, log_path, compilation_cache="", timeout=900) -> None:
    process = start(workdir, data_dir, overrides, log_path, compilation_cache)
    if process.wait(timeout=timeout) != 0:
        raise RuntimeError(f"run in {workdir} failed (exit {process.returncode}); see {log_path}")


def logged_steps(workdir: str) -> int:
    """The highest training step in metrics.jsonl so far (0 before the first)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    return max([0] + [entry["step"] for entry in read_jsonl(path) if "loss" in entry])


def saving_now(workdir: str) -> bool:
    """Whether an asynchronous checkpoint is being written (orbax's temporary folder exists)."""
    return bool(glob.glob(os.path.join(workdir, "checkpoints", "*.orbax-checkpoint-tmp*")))


def interrupt_once(workdir, data_dir, overrides, log_path, rng, how: str, total_steps: int,
                   compilation_cache="") -> dict:
    """Start the run, wait until training reaches a random step, then `how` ('kill' / 'term') it."""
    process = start(workdir, data_dir, overrides, log_path, compilation_cache)
    resumed_from = min(logged_steps(workdir), total_steps - 1)  # killed at the last step: its evaluation
    target = rng.randint(resumed_from + 1, total_steps)
    while process.poll() is None and logged_steps(workdir) < target:
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.3))  # land anywhere within a step or a save
    event = {"signal": how, "target_step": target, "during_save": saving_now(workdir)}
    if process.poll() is None:
        process.send_signal(signal.SIGKILL if how == "kill" else signal.SIGTERM)
    event["exit_code"] = process.wait(timeout=900)
    event["logged_step_at_signal"] = logged_steps(workdir)
    return event


def final_state_leaves(workdir: str) -> dict:
    """Every leaf of the latest checkpoint's train state, by path (read without a template)."""
    import orbax.checkpoint as ocp

    directory = os.path.join(workdir, "checkpoints")
    step = max(int(name) for name in os.listdir(directory) if name.isdigit())
    restored = ocp.StandardCheckpointer().restore(os.path.join(directory, str(step), "state"))
    import jax

    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(restored)}


def training_losses(workdir: str) -> dict:
    entries = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    return {entry["step"]: entry["loss"] for entry in entries if "loss" in entry}


def compare(reference: str, candidate: str) -> dict:
    """Largest absolute differences between two finished runs' states, features, metrics and losses."""
    ref_state, cand_state = final_state_leaves(reference), final_state_leaves(candidate)
    if ref_state.keys() != cand_state.keys():
        raise AssertionError("the two runs' checkpoints hold different leaves")
    state_diff = max(float(np.max(np.abs(ref_state[k].astype(np.float64) - cand_state[k].astype(np.float64))))
                     if ref_state[k].size else 0.0 for k in ref_state)
    ref_feat = np.load(os.path.join(reference, "eval", "features.npz"))
    cand_feat = np.load(os.path.join(candidate, "eval", "features.npz"))
    feature_diff = max(float(np.max(np.abs(ref_feat[k] - cand_feat[k]))) for k in ref_feat.files)
    with open(os.path.join(reference, "eval", "metrics.json")) as f:
        ref_metrics = json.load(f)
    with open(os.path.join(candidate, "eval", "metrics.json")) as f:
        cand_metrics = json.load(f)
    if ref_metrics.keys() != cand_metrics.keys():
        raise AssertionError(f"metrics.json keys differ: {sorted(ref_metrics)} vs {sorted(cand_metrics)}")
    numbers = [k for k, v in ref_metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    others = {k: (ref_metrics[k], cand_metrics[k]) for k in ref_metrics.keys() - set(numbers)
              if ref_metrics[k] != cand_metrics[k]}  # the evaluation config, flags, lists: equal or an error
    if others:
        raise AssertionError(f"metrics.json differs in non-numeric entries: {others}")
    metric_diff = max(abs(ref_metrics[k] - cand_metrics[k]) for k in numbers)
    ref_losses, cand_losses = training_losses(reference), training_losses(candidate)
    if sorted(ref_losses) != sorted(cand_losses):
        raise AssertionError(f"logged steps differ: {sorted(ref_losses)} vs {sorted(cand_losses)}")
    loss_diff = max(abs(ref_losses[s] - cand_losses[s]) for s in ref_losses)
    return {"state_max_abs_diff": state_diff, "feature_max_abs_diff": feature_diff,
            "metric_max_abs_diff": metric_diff, "loss_max_abs_diff": loss_diff}


def total_steps(num_train: int, overrides) -> int:
    epochs = next((int(o.split("=")[1]) for o in overrides if o.startswith("--config.num_epochs=")), 2)
    return epochs * (num_train // 8)


def run_trials(root: str, trials: int, seed: int, tolerance: float = 1e-6, method: str = "fgpair",
               kinds=("kill", "kill", "term"), max_interruptions: int = 3, replicate: bool = True,
               log=print) -> dict:
    """The whole experiment under `root`; returns the JSON-ready summary. `replicate` runs the reference
    twice to check determinism (an exact match after interruptions implies it too)."""
    data_dir = write_tiny_cub(os.path.join(root, "CUB_200_2011"), train_per_class=16, test_per_class=4)
    overrides = [f"--config.method={method}", "--config.num_epochs=3", "--config.checkpoint_every_steps=2",
                 "--config.eval.figures=false",  # figures are drawn from what is compared, and compare nothing
                 f"--config.data.data_dir={os.path.join(root, 'tfds')}"]
    steps = total_steps(3 * 16, overrides)
    log_path, cache = os.path.join(root, "runs.log"), os.path.join(root, "jax_cache")
    started = time.perf_counter()
    reference, replica = os.path.join(root, "reference"), os.path.join(root, "replica")
    run_to_end(reference, data_dir, overrides, log_path, cache)
    deterministic = None
    if replicate:
        run_to_end(replica, data_dir, overrides, log_path, cache)
        with open(os.path.join(reference, "eval", "metrics.json")) as f, \
                open(os.path.join(replica, "eval", "metrics.json")) as g:
            deterministic = f.read() == g.read()
    log(f"reference (+ replica): {time.perf_counter() - started:.0f} s, metrics.json identical: {deterministic}")

    rng = random.Random(seed)
    results = []
    for trial in range(trials):
        workdir = os.path.join(root, f"trial_{trial}")
        events = [interrupt_once(workdir, data_dir, overrides, log_path, rng, rng.choice(kinds), steps, cache)
                  for _ in range(rng.randint(1, max_interruptions))]
        run_to_end(workdir, data_dir, overrides, log_path, cache)
        differences = compare(reference, workdir)
        passed = max(differences.values()) <= tolerance
        results.append({"trial": trial, "interruptions": events, **differences, "passed": passed})
        log(f"trial {trial}: {[(e['signal'], e['logged_step_at_signal'], e['during_save']) for e in events]} "
            f"-> max diff {max(differences.values()):.3g} {'PASS' if passed else 'FAIL'}")
    return {
        "method": method, "config": "configs/cub.py:tiny", "overrides": overrides[:-1], "total_steps": steps,
        "trials": trials, "passed": sum(r["passed"] for r in results), "tolerance": tolerance,
        "deterministic_metrics_json": deterministic,
        "interruptions": sum(len(r["interruptions"]) for r in results),
        "interruptions_during_save": sum(e["during_save"] for r in results for e in r["interruptions"]),
        "wall_seconds": round(time.perf_counter() - started, 1), "results": results,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--method", default="fgpair")
    parser.add_argument("--out", default="results/bench/kill_resume.json")
    parser.add_argument("--root", default="", help="working folder (default: a temporary one)")
    args = parser.parse_args()
    root = args.root or tempfile.mkdtemp(prefix="kill_resume_")
    summary = run_trials(root, args.trials, args.seed, method=args.method)
    summary["command"] = "python benchmarks/kill_resume.py " + " ".join(sys.argv[1:])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=2)
    print(f"{summary['passed']}/{summary['trials']} trials equal within {summary['tolerance']}; "
          f"deterministic: {summary['deterministic_metrics_json']}; written to {args.out}")
    sys.exit(0 if summary["passed"] == summary["trials"] and summary["deterministic_metrics_json"] else 1)


if __name__ == "__main__":
    main()

"""The comparison table: methods x seeds under one budget, resumable, with a Markdown table and a plot.

    python -m fgpair_jax.experiments --config=configs/cub.py:quick --arms=moco,lcr,fgpair,variance,gradcam,random \
        --seeds=0,1,2

Every run gets the same config except its arm's overrides (`ARMS`) and its seed, so budget, image size,
init and augmentations are equal by construction. A run's workdir is `<root>/<arm>_seed<s>`: a half-done
run resumes from its checkpoint. A finished one (its `<results>/runs/<arm>_seed<s>.json` exists) is not
run again when it was trained under the same config (every key that defines training:
`run_config.training_fingerprint`, the check a resumed checkpoint gets); a record trained under another
config is refused, before any training, in one line naming the first differing key. So the experiment
can be spread over several sessions or machines sharing `--results`, and a results folder never hands
back another config's numbers. `--root` defaults to `workdirs/table_<config file>_<variant>` (outside the
tracked tree) and `--results` to `<root>/results`.
The table holds the requested arms x seeds (`--summary_only` without `--arms`/`--seeds`: every finished
run in `--results`). The summary gives, per arm, the mean and 95% confidence interval (Student t over
seeds) of each metric and, for arms run with the same seeds as `moco` (when `moco` is among the arms),
the paired gain over `moco` with its interval.
Nothing here chooses hyper-parameters: the test split is read once per run, by its final evaluation.
To tune, run the same command with `--config.data.eval_split=val` and another `--root` and `--results`
(a final run's checkpoint is refused for a tuning run and vice versa): every run
then trains on train minus a fixed class-stratified part and is scored on that part (`data/splits.py`).
"""
import itertools
import json
import os
import time

import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from fgpair_jax import cli, run_config
from fgpair_jax.atomic_files import write_atomically
from fgpair_jax.errors import ConfigError, UserError
from fgpair_jax.evaluation import HEADLINE_METRICS
from fgpair_jax.evaluation.similarity import linear_cka
from fgpair_jax.methods import BASELINE, COMPARED_ARMS, experiment_arms
from fgpair_jax.metrics_writer import announce

# arm -> config overrides (dotted keys): each method, each method's ablations, and `init` (a reference,
# not a method: the initial encoder evaluated without a single SSL step; the distance from `init` to the
# baseline is what the SSL budget buys, and differences between methods cannot be larger than what
# training moves at all).
ARMS = experiment_arms()
REFERENCE = "init"  # not a method: no gain over the baseline is computed for it, and the plot draws it apart
GAIN = f"gain_over_{BASELINE}"
DEFAULT_ARMS = [arm for arm in ARMS if arm not in (REFERENCE, "none")]

REPORT_FILES = ("table.md", "plot.png", "summary.json")  # what `write_report` writes under --results
RUNS = "runs"  # <results>/runs/<arm>_seed<s>.json: one finished run's record


def define_flags() -> None:
    """The command line's flags (defined when run as a program, not at import)."""
    config_flags.DEFINE_config_file("config", "configs/cub.py:quick", "Base config of every run.", lock_config=False)
    flags.DEFINE_list("arms", DEFAULT_ARMS, f"Arms to run and tabulate, of {list(ARMS)}.")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of every arm (integers).")
    flags.DEFINE_string("root", "", "Parent of the runs' workdirs (checkpoints, logs); default "
                        "workdirs/table_<config file>_<variant>, e.g. workdirs/table_cub_quick.")
    flags.DEFINE_string("results", "", "Where per-run JSONs, the table and the plot go; default <root>/results.")
    flags.DEFINE_bool("summary_only", False, "Only rebuild the table and plot from finished runs (without "
                      "--arms/--seeds: every finished run in --results).")


def default_root(config_argument: str) -> str:
    """`--root` when not given: `workdirs/table_<cli.config_label>`, e.g. workdirs/table_cub_quick."""
    return os.path.join("workdirs", "table_" + cli.config_label(config_argument))


def requested_arms(arms: list) -> list:
    """`--arms` as given; `ConfigError` naming the unknown ones and the choices."""
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown or not arms:
        problem = f"unknown arm(s) {', '.join(unknown)}" if unknown else "no arm given"
        raise ConfigError(f"--arms={','.join(arms)}: {problem}; choose from {', '.join(ARMS)}.")
    return list(arms)


def requested_seeds(seeds: list) -> list:
    """`--seeds` as integers; `ConfigError` for one that is not a non-negative integer."""
    bad = [seed for seed in seeds if not seed.strip().isdigit()]
    if bad or not seeds:
        raise ConfigError(f"--seeds={','.join(seeds)}: seeds are non-negative integers, e.g. --seeds=0,1,2.")
    return [int(seed) for seed in seeds]


def arm_config(base, arm: str, seed: int):
    """`base` with the arm's overrides and `seed`; an unknown arm is a one-line error."""
    if arm not in ARMS:
        raise ConfigError(f"Unknown arm {arm!r}; choose from {sorted(ARMS)}.")
    return run_config.override(base, {**ARMS[arm], "seed": seed})


def run_name(arm: str, seed: int) -> str:
    return f"{arm}_seed{seed}"


def record_path(results: str, arm: str, seed: int) -> str:
    return os.path.join(results, RUNS, run_name(arm, seed) + ".json")


def finished_record(base, arm: str, seed: int, results: str):
    """The record of `arm`/`seed` in `results` when that run finished under the config it would get now
    (`arm_config`: the same `run_config.training_fingerprint`, the check a resumed checkpoint gets; keys
    a record predates take `run_config.KEYS_ADDED_SINCE`'s values); None when it has not finished.

    Raises:
      ConfigError: the record was trained under another config (naming the first differing key, both
        values and the fix), or records none to compare.
    """
    path = record_path(results, arm, seed)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        record = json.load(f)
    fix = "give this experiment another --results folder, or delete that file to retrain the run"
    if not record.get("config"):
        raise ConfigError(f"{path} records no config, so it cannot be told whether it trained under this one: {fix}.")
    change = run_config.first_change(run_config.training_fingerprint(record["config"]),
                                     run_config.training_fingerprint(arm_config(base, arm, seed)))
    if change:
        key, was, now = change
        raise ConfigError(f"{path} was trained with config.{key}={was!r}, but this experiment asks for "
                          f"config.{key}={now!r}: {fix}.")
    return record


def run_one(base, arm: str, seed: int, root: str, results: str) -> dict:
    """Train + evaluate one arm/seed (resuming) unless it finished under the same config
    (`finished_record`, whose `ConfigError` it raises for a record of another config); returns its record."""
    record = finished_record(base, arm, seed, results)
    if record is not None:
        return record
    from fgpair_jax import train  # heavy (JAX, TFDS): imported only when something must run

    config = arm_config(base, arm, seed)
    started = time.perf_counter()
    metrics = train.train_and_evaluate(config, os.path.join(root, run_name(arm, seed)))
    if not metrics:  # stopped by SIGTERM / preemption: the checkpoint is saved, nothing to record yet
        raise SystemExit(f"{run_name(arm, seed)} was stopped before finishing; rerun to resume it.")
    record = {"arm": arm, "seed": seed, "overrides": ARMS[arm], "metrics": metrics,
              "wall_seconds_this_session": round(time.perf_counter() - started, 1),
              "config": json.loads(config.to_json_best_effort())}
    path = record_path(results, arm, seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    def write(temporary):
        with open(temporary, "w") as f:
            json.dump(record, f, indent=2, sort_keys=True)

    write_atomically(path, write)
    return record


def load_records(results: str) -> list:
    """Every finished run's record in `<results>/runs/`, by file name."""
    directory = os.path.join(results, RUNS)
    if not os.path.isdir(directory):
        return []
    records = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(".json"):
            with open(os.path.join(directory, name)) as f:
                records.append(json.load(f))
    return records


def mean_and_interval(values) -> tuple:
    """(mean, half-width of the two-sided 95% Student-t interval); the half-width is NaN for one value."""
    values = np.asarray(values, np.float64)
    if len(values) == 0:
        return float("nan"), float("nan")
    if len(values) < 2:
        return float(values.mean()), float("nan")
    from scipy import stats

    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean()), float(half)


def data_of(records: list) -> str:
    """What the runs were trained and scored on, e.g. 'cub (CUB_200_2011_subset100), eval split val', for the
    table and the plot; '' for records without a config. One results folder holds one data set and split:
    `ConfigError` naming both when its runs disagree (their table would compare unlike numbers)."""
    seen = {}
    for record in records:
        data = record.get("config", {}).get("data", {})
        if data:
            folder = os.path.basename(os.path.normpath(data.get("manual_dir", ""))) or "download"
            seen.setdefault(f"{data.get('name', 'cub')} ({folder}), eval split {data.get('eval_split', 'test')}",
                            f"{record['arm']} seed {record['seed']}")
    if len(seen) > 1:
        (first, a), (second, b) = list(seen.items())[:2]
        raise ConfigError(f"The results folder mixes data sets or splits: {a} ran on {first}, {b} on {second}; "
                          f"give each data set its own --results and --root.")
    return next(iter(seen), "")


def summarize(records: list) -> dict:
    """Per arm: seeds, mean and 95% CI of each headline metric, and the seed-paired gain over `BASELINE`."""
    by_arm = {}
    for record in records:
        by_arm.setdefault(record["arm"], {})[record["seed"]] = record["metrics"]
    baseline = by_arm.get(BASELINE, {})
    summary = {}
    for arm in [a for a in ARMS if a in by_arm]:
        runs = by_arm[arm]
        seeds = sorted(runs)
        entry = {"seeds": seeds, "metrics": {}, GAIN: {}}
        for metric in HEADLINE_METRICS:  # a metric a run could not compute (None: evaluate.py) is left out
            entry["metrics"][metric] = mean_and_interval([runs[s][metric] for s in seeds
                                                          if runs[s].get(metric) is not None])
            paired = [s for s in seeds if s in baseline
                      and runs[s].get(metric) is not None and baseline[s].get(metric) is not None]
            if arm not in (BASELINE, REFERENCE) and paired:
                gains = [runs[s][metric] - baseline[s][metric] for s in paired]
                entry[GAIN][metric] = (*mean_and_interval(gains), len(paired))
        summary[arm] = entry
    return summary


def _cell(mean: float, half: float) -> str:
    if np.isnan(mean):
        return "n/a"
    return f"{mean:.2f}" if np.isnan(half) else f"{mean:.2f} ± {half:.2f}"


def markdown_table(summary: dict) -> str:
    """The table: one row per arm, mean ± 95% CI per metric, then the paired gains over the baseline."""
    names = HEADLINE_METRICS
    header = "| arm | seeds | " + " | ".join(names[m] for m in HEADLINE_METRICS) + " |"
    lines = [header, "|" + " --- |" * (len(HEADLINE_METRICS) + 2)]
    for arm, entry in summary.items():
        cells = [_cell(*entry["metrics"][m]) for m in HEADLINE_METRICS]
        lines.append(f"| {arm} | {len(entry['seeds'])} | " + " | ".join(cells) + " |")
    gains = {arm: e[GAIN] for arm, e in summary.items() if e[GAIN]}
    if gains:
        lines += ["", f"Gain over {BASELINE}, paired by seed (mean ± 95% CI, points):", "",
                  "| arm | paired seeds | " + " | ".join(names[m] for m in HEADLINE_METRICS) + " |",
                  "|" + " --- |" * (len(HEADLINE_METRICS) + 2)]
        for arm, gain in gains.items():
            count = max(g[2] for g in gain.values())
            cells = [_cell(*gain[m][:2]) if m in gain else "n/a" for m in HEADLINE_METRICS]
            lines.append(f"| {arm} | {count} | " + " | ".join(cells) + " |")
    elif BASELINE not in summary and set(summary) - {REFERENCE}:
        lines += ["", f"No gain over {BASELINE}: {BASELINE} is not among the tabulated arms (add it to --arms)."]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: str, data: str = "") -> None:
    """plot.png: linear top-1 and retrieval rank-1 per arm from 0 to 100%, with a 95% CI bar only where
    an arm has two or more seeds, and the `init` reference marked (`figures.table`)."""
    from fgpair_jax.figures.table import save_table_plot  # matplotlib: imported only to draw

    save_table_plot(summary, path, BASELINE, data, reference=REFERENCE)


def finished_features(root: str, arms=None, seeds=None) -> dict:
    """{(arm, seed): path of eval/features.npz} of every run of `arms` x `seeds` (None: any) under `root`
    that finished its evaluation."""
    runs = {}
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        arm, _, seed = name.rpartition("_seed")  # the inverse of run_name
        path = os.path.join(root, name, "eval", "features.npz")
        if arm in ARMS and seed.isdigit() and os.path.isfile(path):
            runs[(arm, int(seed))] = path
    return {key: path for key, path in runs.items() if selected([{"arm": key[0], "seed": key[1]}], arms, seeds)}


def feature_drift(runs: dict) -> dict:
    """Linear CKA of the evaluation split's pooled features (1 = the same up to rotation and scale):
    `from_init` each run vs the `init` arm, `vs_moco` each arm vs `moco` of the same seed, and
    `moco_across_seeds` (what a seed alone changes). Answers whether training moved the features at all
    and whether methods moved them differently.

    A run is compared with the `init` run of its own seed, else with that of the lowest seed (exact for
    a pretrained start, whose encoder does not depend on the seed); `init_reference` names the one used.
    A pair that cannot be compared (other images, constant features) is recorded as None.
    """
    def test_features(path):
        with np.load(path) as saved:
            return saved["test_features"]

    def cka_or_none(x, y):
        try:
            value = linear_cka(x, y)
        except ValueError as error:
            logging.warning("feature drift: %s", error)
            return None
        return value if np.isfinite(value) else None

    features = {key: test_features(path) for key, path in runs.items()}
    init_seeds = sorted(seed for arm, seed in features if arm == REFERENCE)
    versus, across = f"vs_{BASELINE}", f"{BASELINE}_across_seeds"
    drift = {"from_init": {}, "init_reference": {}, versus: {}, across: {}}
    for (arm, seed), f in sorted(features.items()):
        if init_seeds and arm != REFERENCE:
            reference_seed = seed if seed in init_seeds else init_seeds[0]
            drift["from_init"][run_name(arm, seed)] = cka_or_none(features[(REFERENCE, reference_seed)], f)
            drift["init_reference"][run_name(arm, seed)] = run_name(REFERENCE, reference_seed)
        if arm not in (BASELINE, REFERENCE) and (BASELINE, seed) in features:
            drift[versus][run_name(arm, seed)] = cka_or_none(features[(BASELINE, seed)], f)
    baseline_seeds = sorted(seed for arm, seed in features if arm == BASELINE)
    for a, b in itertools.combinations(baseline_seeds, 2):
        drift[across][f"seed{a}_seed{b}"] = cka_or_none(features[(BASELINE, a)],
                                                                     features[(BASELINE, b)])
    return drift


def _nan_as_null(tree):
    """Strict JSON: a one-seed interval (NaN) is written as null."""
    if isinstance(tree, dict):
        return {key: _nan_as_null(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_nan_as_null(value) for value in tree]
    return None if isinstance(tree, float) and not np.isfinite(tree) else tree


def selected(records: list, arms=None, seeds=None) -> list:
    """The records of `arms` x `seeds` (None: any)."""
    return [record for record in records
            if (arms is None or record["arm"] in arms) and (seeds is None or record["seed"] in seeds)]


def write_report(results: str, root: str = "", arms=None, seeds=None) -> dict:
    """summary.json, table.md and plot.png under `results` from the finished runs there of `arms` x
    `seeds` (None: every one), and, given `root`, feature_drift.json and the side-by-side 2-D map of two
    runs' test features (`figures.embedding.write_side_by_side`) from the features those runs' workdirs
    still hold (once, at the end: a few D x D products per pair of runs, and a UMAP per map). Returns the
    summary ({} and nothing written when none of those runs has finished).

    Raises:
      ConfigError: the folder's runs were trained on different data sets or evaluation splits."""
    records = load_records(results)
    data = data_of(records)
    summary = summarize(selected(records, arms, seeds))
    if not summary:
        return summary
    with open(os.path.join(results, "summary.json"), "w") as f:
        json.dump(_nan_as_null(summary), f, indent=2, allow_nan=False)
    with open(os.path.join(results, "table.md"), "w") as f:
        f.write((f"Data: {data}\n\n" if data else "") + markdown_table(summary))
    plot(summary, os.path.join(results, "plot.png"), data)
    runs = finished_features(root, arms, seeds) if root else {}
    if runs:
        with open(os.path.join(results, "feature_drift.json"), "w") as f:
            json.dump(feature_drift(runs), f, indent=2, sort_keys=True)
        from fgpair_jax.figures.embedding import write_side_by_side  # matplotlib, maybe UMAP: only here

        write_side_by_side(results, runs, COMPARED_ARMS)
    return summary


def main(argv):
    del argv
    args = flags.FLAGS
    config_argument = args["config"].config_filename
    root = run_config.user_path(args.root or default_root(config_argument))
    results = run_config.user_path(args.results or os.path.join(root, "results"))
    arms, seeds = requested_arms(args.arms), requested_seeds(args.seeds)
    if args.summary_only and not (args["arms"].present or args["seeds"].present):
        arms = seeds = None  # the whole folder
    if args.summary_only and args.results and not args.root:
        root = ""  # the default root holds this config's runs, not necessarily those of the folder given
    if not args.summary_only:  # before any training: the folder's data must be this experiment's, and its
        this = {"arm": "this experiment", "seed": "", "config": {"data": args.config.data.to_dict()}}
        data_of(load_records(results) + [this])  # finished runs must have been trained under its config
        finished = {(arm, seed) for seed in seeds for arm in arms
                    if finished_record(args.config, arm, seed, results) is not None}
        os.makedirs(results, exist_ok=True)
        for seed in seeds:  # seed-major: a partial experiment still has every arm for the first seeds
            for arm in arms:
                if (arm, seed) in finished:
                    announce(f"{run_name(arm, seed)}: reused (same config), {record_path(results, arm, seed)}")
                    continue
                announce(f"=== {run_name(arm, seed)} ===")
                run_one(args.config, arm, seed, root, results)
                write_report(results, arms=arms, seeds=seeds)
    summary = write_report(results, root, arms, seeds) if os.path.isdir(results) else {}
    if not summary:
        wanted = "" if arms is None else f" of arms {','.join(arms)} x seeds {','.join(map(str, seeds))}"
        raise UserError(f"No finished run{wanted} in {os.path.join(results, RUNS)}: nothing to tabulate "
                        "(run without --summary_only to train them, or give the --results folder that holds them).")
    print(markdown_table(summary))
    drift = " and feature_drift.json" if root and finished_features(root, arms, seeds) else ""
    announce(f"Wrote {', '.join(REPORT_FILES)}{drift} to {results}/")


if __name__ == "__main__":
    define_flags()
    cli.run(main)

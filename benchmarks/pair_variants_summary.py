"""Issue 14, stage 1: does a pair variant act on the encoder at all? One table from finished runs.

    python benchmarks/pair_variants_summary.py --root=workdirs/stage1 --baseline=moco \
        --out=results/stage1/stage1_summary.json

`--root` holds one folder per variant (as `fgpair_jax.experiments --root=<root>/<variant>` writes them),
the baseline's with seeds 0 and 1. Per variant (seed 0), from its own files only:
- `pair_contrast`, `grad_share_pair`, `pair_accuracy`: means over the logged steps at full pair weight
  (metrics.jsonl); `figures/diagnostics.json`'s frozen-feature pair distance;
- `one_minus_cka_vs_baseline`: 1 - linear CKA between its evaluation-split features and the baseline's
  of the same seed, next to the baseline's own seed-to-seed 1 - CKA (the noise floor): stage 1 asks for
  at least twice that;
- the headline metrics of `eval/metrics.json`.
Nothing here chooses anything on a test split: the runs were scored on the validation split.

With `--seeds_root`, it instead writes the per-seed step means of the fgpair runs of one experiment root
(`<root>/fgpair_seed<N>`, as `fgpair_jax.experiments` names them), rounded to 3 digits:

    python benchmarks/pair_variants_summary.py --seeds_root=workdirs/stage2/residual \
        --out=results/stage2/residual/pair_diagnostics.json
"""
import json
import os

import numpy as np
from absl import app, flags

from fgpair_jax.evaluation import HEADLINE_METRICS
from fgpair_jax.evaluation.similarity import linear_cka
from fgpair_jax.metrics_writer import read_jsonl

_ROOT = flags.DEFINE_string("root", "workdirs/stage1", "Folder of the variants' experiment roots.")
_BASELINE = flags.DEFINE_string("baseline", "moco", "Variant folder (and arm) that is the baseline.")
_OUT = flags.DEFINE_string("out", "results/stage1/stage1_summary.json", "Output JSON (a .md beside it).")
_SEEDS_ROOT = flags.DEFINE_string("seeds_root", None, "An experiments root: write its fgpair runs' per-seed "
                                  "step means to --out instead of the variant table.")
STEP_LOGS = ("pair_contrast", "grad_share_pair", "pair_accuracy", "loss_pair")


def eval_features(run_dir: str) -> np.ndarray:
    with np.load(os.path.join(run_dir, "eval", "features.npz")) as saved:
        return saved["test_features"]


def step_means(run_dir: str) -> dict:
    """Means of the pair logs over the steps at full pair weight."""
    records = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "pair_weight" in r]
    full = [r for r in records if r["pair_weight"] >= max(x["pair_weight"] for x in records) > 0]
    return {name: float(np.mean([r[name] for r in full if name in r])) for name in STEP_LOGS
            if any(name in r for r in full)} | {"steps_at_full_weight": len(full), "logged_steps": len(records)}


def variant_row(run_dir: str, baseline_features: np.ndarray) -> dict:
    with open(os.path.join(run_dir, "eval", "metrics.json")) as f:
        metrics = json.load(f)
    row = {name: metrics[name] for name in HEADLINE_METRICS}
    row["one_minus_cka_vs_baseline"] = 1.0 - linear_cka(baseline_features, eval_features(run_dir))
    row.update(step_means(run_dir))
    diagnostics = os.path.join(run_dir, "figures", "diagnostics.json")
    if os.path.exists(diagnostics):
        with open(diagnostics) as f:
            row["figure_batch"] = json.load(f)
    return row


def per_seed_step_means(root: str, arm: str = "fgpair") -> dict:
    """{run name: `step_means` rounded to 3 digits} for every finished `<arm>_seed<N>` under `root`."""
    runs = sorted(name for name in os.listdir(root) if name.startswith(f"{arm}_seed")
                  and os.path.exists(os.path.join(root, name, "metrics.jsonl")))
    if not runs:
        raise SystemExit(f"No {arm}_seed* run with a metrics.jsonl under {root}: pass the --root given to "
                         "fgpair_jax.experiments.")
    return {name: {key: round(value, 3) for key, value in step_means(os.path.join(root, name)).items()}
            for name in runs}


def main(argv):
    del argv
    if _SEEDS_ROOT.value:
        text = json.dumps(per_seed_step_means(_SEEDS_ROOT.value), indent=2, sort_keys=True)
        os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
        with open(_OUT.value, "w") as f:
            f.write(text)
        print(text)
        return
    root, baseline = _ROOT.value, _BASELINE.value
    reference = eval_features(os.path.join(root, baseline, f"{baseline}_seed0"))
    other_seed = eval_features(os.path.join(root, baseline, f"{baseline}_seed1"))
    summary = {"noise_floor_one_minus_cka": 1.0 - linear_cka(reference, other_seed), "variants": {}}
    for seed in (0, 1):
        with open(os.path.join(root, baseline, f"{baseline}_seed{seed}", "eval", "metrics.json")) as f:
            metrics = json.load(f)
        summary[f"{baseline}_seed{seed}"] = {name: metrics[name] for name in HEADLINE_METRICS}
    for variant in sorted(os.listdir(root)):
        run_dir = os.path.join(root, variant, "fgpair_seed0")
        if variant != baseline and os.path.exists(os.path.join(run_dir, "eval", "metrics.json")):
            summary["variants"][variant] = variant_row(run_dir, reference)
    floor = summary["noise_floor_one_minus_cka"]
    lines = [f"Noise floor (1 - CKA, {baseline} seed 0 vs seed 1): {floor:.4f}", "",
             "| variant | pair_contrast | grad_share_pair | pair_accuracy | 1-CKA vs baseline | x floor | "
             "linear top-1 | R@1 |", "|" + " --- |" * 8]
    for name, row in summary["variants"].items():
        lines.append(f"| {name} | {row.get('pair_contrast', float('nan')):.3f} | "
                     f"{row.get('grad_share_pair', float('nan')):.2f} | {row.get('pair_accuracy', float('nan')):.3f} | "
                     f"{row['one_minus_cka_vs_baseline']:.4f} | {row['one_minus_cka_vs_baseline'] / floor:.1f} | "
                     f"{row['linear_top1']:.2f} | {row['retrieval_rank1']:.2f} |")
    for seed in (0, 1):
        m = summary[f"{baseline}_seed{seed}"]
        lines.append(f"| {baseline} seed {seed} | | | | | | {m['linear_top1']:.2f} | {m['retrieval_rank1']:.2f} |")
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    with open(os.path.splitext(_OUT.value)[0] + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)

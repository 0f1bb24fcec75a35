"""Score a checkpoint of another project as it is, under this project's evaluation (linear probe,
retrieval, kNN) into `<workdir>/eval/metrics.json` and `features.npz`, the contract of `evaluate.py`.

CLI: `python -m fgpair_jax.evaluate_checkpoint --checkpoint=FILE --config=configs/cub.py --workdir=NEW
[--config.key=value ...]`, e.g. MoCo v2's `moco_v2_800ep_pretrain.pth.tar` or LCR's `checkpoint_0099.pth.tar`,
so that published numbers can be re-measured side by side. FILE is anything `checkpoint_import.py` reads
(torch.save files of MoCo / LCR / DDP / SSL libraries, `.safetensors`); the config file gives the protocol
and the data set, `--config.model.name` the architecture.

It is a run of 0 epochs from `model.init=FILE` (`train.train_and_evaluate`): the file is checked before any
data is built (one line naming the closest prefix when it holds no usable encoder), the encoder loaded, the
state saved as step 0 and evaluated, so `fgpair_jax.evaluate --workdir` re-evaluates and `fgpair_jax.export`
exports it like any run. The method decides the feature evaluated: without `--config.method=`, the method
whose branches the file holds (LCR's conv16/bn16: `lcr`, its attention-pooled feature), else the baseline
(`moco`: the pooled feature).
"""
import sys

from absl import flags
from ml_collections import config_flags

from fgpair_jax import cli, models, run_config, train
from fgpair_jax.metrics_writer import announce
from fgpair_jax.methods import BASELINE, checkpoint_branches


def method_for(path: str, model_config) -> str:
    """The method whose `CHECKPOINT_BRANCHES` the checkpoint holds beside its encoder, else `BASELINE`
    (reads names and shapes only; `CheckpointError` for a file without a usable encoder)."""
    imported, _ = models.import_init(path, model_config, method_branches=checkpoint_branches(), with_data=False)
    found = [name for name, subtrees in imported["branches"].items() if subtrees]
    return found[0] if found else BASELINE


def evaluate_checkpoint(path: str, config, workdir: str, method: str = "") -> dict:
    """The metrics of checkpoint `path` evaluated as it is under `config` (0 epochs), written to
    `<workdir>/eval/`; `method` '' chooses by the branches the file holds (`method_for`). Raises
    `MissingFileError` / `pretrained.CheckpointError` / `ConfigError` (one line) before any data is built."""
    path = run_config.user_path(path)
    if not method:
        method = method_for(path, config.model)
        announce(f"Evaluating {path} with method {method} ({'its own branch' if method != BASELINE else 'pooled features'};"
                 " --config.method= chooses another).")
    config = run_config.override(config, {"model.init": path, "num_epochs": 0, "method": method})
    return train.train_and_evaluate(config, workdir)


def method_given(argv) -> str:
    """The value of a `--config.method=` on the command line, '' if none (the config file's default is no choice)."""
    given = [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config.method=")]
    return given[-1] if given else ""


def main(argv):
    del argv
    evaluate_checkpoint(flags.FLAGS.checkpoint, flags.FLAGS.config, flags.FLAGS.workdir, method_given(sys.argv))


if __name__ == "__main__":
    flags.DEFINE_string("checkpoint", None, "The checkpoint to evaluate: torch .pth / .pth.tar / .ckpt or .safetensors "
                        "(README: Checkpoints of other projects).", required=True)
    config_flags.DEFINE_config_file("config", None, "Config file of the protocol and data set, e.g. configs/cub.py.",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "A new run directory for the result (eval/, config.json, step 0).",
                        required=True)
    flags.mark_flags_as_required(["config"])
    cli.run(main)

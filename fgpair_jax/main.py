"""Command line: `python -m fgpair_jax.main --config=configs/cub.py[:quick] [--workdir=W] [--config.k=v]`.

Trains (resuming if W holds a checkpoint of the same config) and evaluates. Results: W/eval/. W defaults
to `workdirs/<config file>_<variant>` (`cli.default_workdir`: workdirs/cub_quick for configs/cub.py:quick,
workdirs/cub_tiny for :tiny), so runs of two variants never share a checkpoint folder.
A mistake of the user's (a config value, a path, a workdir of another run) is one line on stderr;
`--debug` shows its traceback (`cli.py`).
"""
from absl import flags
from ml_collections import config_flags

from fgpair_jax import cli, train


def define_flags() -> None:
    """The command line's flags (defined when run as a program, not at import)."""
    config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/cub.py:quick.", lock_config=True)
    flags.DEFINE_string("workdir", "", "Run directory: checkpoints, logs, eval/ (default: "
                        "workdirs/<config file>_<variant>, e.g. workdirs/cub_quick for configs/cub.py:quick).")
    flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    # No line of our own here: nothing may touch JAX before the multi-process job is joined (train.py
    # joins it, then names the workdir on its first line).
    workdir = flags.FLAGS.workdir or cli.default_workdir(flags.FLAGS["config"].config_filename)
    train.train_and_evaluate(flags.FLAGS.config, workdir)


if __name__ == "__main__":
    define_flags()
    cli.run(main)

"""Command line: `python -m fgpair_jax.main --config=configs/cub.py[:quick] --workdir=W [--config.k=v]`.

Trains (resuming if W holds a checkpoint of the same config) and evaluates. Results: W/eval/.
"""
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from fgpair_jax import train
from fgpair_jax.metrics_writer import announce

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/cub.py:quick.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/cub_quick", "Run directory: checkpoints, logs, eval/.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments {argv[1:]}: use --config.key=value for overrides.")
    if not flags.FLAGS["verbosity"].present:
        # orbax and grain log every save and read at INFO; our own progress goes to the console.
        logging.set_verbosity(logging.WARNING)
    announce(f"JAX {jax.__version__} on {jax.device_count()} {jax.default_backend()} device(s), "
             f"process {jax.process_index()} of {jax.process_count()}; workdir {_WORKDIR.value}")
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


def unknown_key_message(error: Exception, argv: list) -> str:
    """One line for an override naming no config field (ml_collections raises a bare AttributeError)."""
    key = str(error).strip("\"'")
    override = next((arg for arg in argv if arg.startswith("--config.") and key in arg), key)
    return (f"Unknown config key in {override}: the config has no field {key!r}. Check the spelling against "
            "the config file (configs/cub.py lists every key with its default).")


def run() -> None:
    flags.mark_flags_as_required(["config"])
    try:
        app.run(main)
    except (AttributeError, KeyError) as error:
        parsing_overrides = not flags.FLAGS.is_parsed() and any(a.startswith("--config.") for a in sys.argv)
        if not parsing_overrides:  # an error of the run itself, not of the command line
            raise
        sys.exit(unknown_key_message(error, sys.argv))


if __name__ == "__main__":
    run()

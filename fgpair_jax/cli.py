"""What the command lines share: absl's app runner with user errors printed as one line.

An error the user caused and can fix (`errors.UserError`: a config value, a path, a data folder, a
workdir of another run) prints `error: <one line>` on stderr and exits with status 2, no traceback;
`--debug` re-raises it with its traceback. Any other exception is a bug and keeps its traceback. A
mistyped `--config.key=value` override is a user error too. In a multi-process job a failing process
also tells the others, which stop with one line naming it (`liveness.stop_after_failure`).
"""
import sys

from absl import app, flags, logging

from fgpair_jax import liveness
from fgpair_jax.errors import UserError

EXIT_USER_ERROR = 2
EXIT_BUG = 1  # Python's own status for an uncaught exception


def _quiet_libraries() -> None:
    """orbax and grain log every save and read at INFO; progress goes to the console (`announce`)."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def _unknown_override(error: Exception, argv: list) -> str:
    """One line for a `--config.` override naming no config field. ml_collections raises an
    AttributeError wrapping a KeyError whose text is the quoted key, then maybe a "Did you mean" line."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    text = str(error.args[0]) if error.args else str(error)
    first, _, hint = text.partition("\n")
    key = first.strip("\"' ")
    override = next((arg for arg in argv if arg.startswith("--config.") and key and key in arg), f"--config...{key}")
    hint = hint.strip() or "Check the spelling against the config file (configs/cub.py lists every key)."
    return f"Unknown config key in {override}: the config has no field {key!r}. {hint}"


def run(main) -> None:
    """`app.run(main)` with the one-line handling of user errors described above (defines `--debug`)."""
    flags.DEFINE_bool("debug", False, "Show the traceback of user errors (bad config, paths, data).")

    def wrapped(argv):
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments {argv[1:]}: use --config.key=value for overrides.")
        _quiet_libraries()
        try:
            return main(argv)
        except UserError as error:
            line = None if flags.FLAGS.debug else f"error: {error}"
            liveness.stop_after_failure(error, line, EXIT_USER_ERROR)  # in a multi-process job: does not return
            if line is None:
                raise
            print(line, file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        except Exception as error:
            liveness.stop_after_failure(error, None, EXIT_BUG)  # in a multi-process job: does not return
            raise

    try:
        app.run(wrapped)
    except (AttributeError, KeyError) as error:
        parsing_overrides = not flags.FLAGS.is_parsed() and any(a.startswith("--config.") for a in sys.argv)
        if not parsing_overrides:  # an error of the run itself, not of the command line
            raise
        print(f"error: {_unknown_override(error, sys.argv)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)

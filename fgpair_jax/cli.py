"""What the command lines share: absl's app runner with user errors printed as one line.

An error the user caused and can fix (`errors.UserError`: a config value, a path, a data folder, a
workdir of another run) prints `error: <one line>` on stderr and exits with status 2, no traceback;
`--debug` re-raises it with its traceback. Any other exception is a bug and keeps its traceback. The
command line itself is the user's too: an unknown `--config.key=value` key, a value of the wrong type
(`--config.num_epochs=two`), a config variant the file does not have (`configs/cub.py:quik`), a config
file that does not exist or an unknown flag is one line with the same status, before any work. In a multi-process job a failing process
also tells the others, which stop with one line naming it (`liveness.stop_after_failure`).
"""
import os
import re
import sys
from typing import Optional

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


def _root_cause(error: BaseException) -> BaseException:
    """The first exception of the chain: absl re-raises a parser's ValueError as its own flag error, and
    ml_collections re-raises a config file's `get_config` error with a traceback in its text."""
    while error.__context__ is not None:
        error = error.__context__
    return error


def flag_error_line(error: Exception, flag_values: flags.FlagValues = flags.FLAGS) -> str:
    """One line for a command line absl cannot parse (`flags.Error`, its flags in `flag_values`), e.g.
    `--config.num_epochs=two: config.num_epochs takes an int (the config has 2), not 'two'.` or, from
    the root of the exception chain, `--config=configs/cub.py:quik: configs/cub.py has no variant 'quik': ...`."""
    text = str(error)
    match = re.match(r"flag --([^=\s]+)=(.*?): ", text)
    cause = _root_cause(error)
    if match is None or cause is error:  # an unknown flag, a missing value: absl's own line
        return " ".join(text.split())
    name, value = match.groups()
    if name.startswith("config.") and name in flag_values:  # a typed config field
        flag = flag_values[name]
        kind = flag.parser.flag_type()
        return (f"--{name}={value}: {name} takes {'an' if kind[0] in 'aeiou' else 'a'} {kind} "
                f"(the config has {flag.default!r}), not {value!r}.")
    return f"--{name}={value}: {' '.join(str(cause).split())}"


def missing_config_file(argv: list) -> Optional[str]:
    """One line when `--config=` names a file that does not exist (ml_collections defers that error to
    the config's first use, deep in the run), listing the config files beside where it was looked for."""
    argument = next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")), "")
    path = argument.split(":", 1)[0]
    if not path or os.path.isfile(path):
        return None
    folder = os.path.dirname(path) or "."
    files = sorted(name for name in os.listdir(folder) if name.endswith(".py")) if os.path.isdir(folder) else []
    return (f"--config={argument}: no config file {path!r} (from {os.getcwd()})"
            + (f"; {folder}/ has {', '.join(files)}." if files else "."))


def _parse_flags(argv: list) -> list:
    """absl's flag parse, with a command line it cannot parse said in one line (status 2), no traceback;
    `--debug` shows the traceback instead."""
    debug = any(arg in ("--debug", "--debug=true", "--debug=True") for arg in argv)
    try:
        remaining = flags.FLAGS(argv)
    except flags.Error as error:
        if debug:
            raise
        line = flag_error_line(error)
    except (AttributeError, KeyError) as error:  # ml_collections: a `--config.` key the config does not have
        if debug or not any(arg.startswith("--config.") for arg in argv):
            raise
        line = _unknown_override(error, argv)
    except OSError:  # ml_collections: an override of a config file that did not load
        line = missing_config_file(argv)
        if line is None or debug:
            raise
    else:
        line = missing_config_file(argv)
        if line is None or debug:
            return remaining
    print(f"error: {line}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def config_label(config_argument: str) -> str:
    """A folder name for a `--config=` argument: 'cub_quick' for 'configs/cub.py:quick', 'cub_paper' for
    'configs/cub.py' (the paper protocol), 'cub_ablations_variance_tiny' for
    'configs/cub_ablations.py:variance,tiny'."""
    path, _, variant = config_argument.partition(":")
    stem = os.path.splitext(os.path.basename(path))[0]
    return "_".join([stem, *(re.findall(r"[A-Za-z0-9.]+", variant) or ["paper"])])


def default_workdir(config_argument: str) -> str:
    """The run directory when `--workdir` is not given: `workdirs/<config_label>` (relative to the working
    directory; `workdirs/` is git-ignored at the repository root)."""
    return os.path.join("workdirs", config_label(config_argument))


def run(main) -> None:
    """`app.run(main)` with the one-line handling of user errors described above (defines `--debug`)."""
    flags.DEFINE_bool("debug", False, "Show the traceback of user errors (bad config, paths, data).")

    def wrapped(argv):
        _quiet_libraries()
        try:
            if len(argv) > 1:
                raise UserError(f"Unexpected arguments {argv[1:]}: use --config.key=value for overrides.")
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

    app.run(wrapped, flags_parser=_parse_flags)

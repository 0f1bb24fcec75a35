"""FGVC-Aircraft 2013b (100 variants) configs: `get_config()` is the paper's protocol, `get_config("quick")` fits a 2-core CPU.

Use: python -m fgpair_jax.main --config=configs/aircraft.py[:quick] --config.data.manual_dir=DIR --workdir=W
DIR: fgvc-aircraft-2013b/ or fgvc-aircraft-2013b.tar.gz (or set --config.data.download=True) (README: Data sets); $FGPAIR_AIRCRAFT_DIR sets the default. Every knob and its reason: configs/common.py.
"""
import importlib.util
import os

_HERE = os.path.dirname(os.path.abspath(__file__))


def _common():
    """configs/common.py, loaded by path (config files are not a package; no sys.path edit)."""
    spec = importlib.util.spec_from_file_location("fgpair_configs_common", os.path.join(_HERE, "common.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str = ""):
    """configs/common.py's `get_config(arg)` on aircraft. Raises ValueError for an unknown variant."""
    return _common().get_config(arg, data_set="aircraft", manual_dir=os.environ.get("FGPAIR_AIRCRAFT_DIR", ""),
                                config_file="configs/aircraft.py")

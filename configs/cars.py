"""Stanford Cars (196 classes) configs: `get_config()` is the paper's protocol, `get_config("quick")` fits a 2-core CPU.

Use: python -m fgpair_jax.main --config=configs/cars.py[:quick] --config.data.manual_dir=DIR --workdir=W
DIR: the folder holding cars_train/, cars_test/, devkit/ and cars_test_annos_withlabels.mat, or the official tarballs (README: Data sets); $FGPAIR_CARS_DIR sets the default. Every knob and its reason: configs/common.py.
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
    """configs/common.py's `get_config(arg)` on cars. Raises ValueError for an unknown variant."""
    return _common().get_config(arg, data_set="cars", manual_dir=os.environ.get("FGPAIR_CARS_DIR", ""),
                                config_file="configs/cars.py")

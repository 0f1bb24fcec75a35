"""CUB-200-2011 configs: `get_config()` is the paper's protocol, `get_config("quick")` fits a 2-core CPU.

Use: python -m fgpair_jax.main --config=configs/cub.py[:quick|medium|scratch|tiny] --workdir=W [--config.key=value]
Every knob and its reason: configs/common.py (shared by every data set). Here only the data set and its folder.
"""
import importlib.util
import os

_HERE = os.path.dirname(os.path.abspath(__file__))
# The shared CUB subset beside the repository; FGPAIR_CUB_DIR points elsewhere (e.g. the full data set).
DEFAULT_CUB_DIR = os.environ.get(
    "FGPAIR_CUB_DIR", os.path.join(os.path.dirname(os.path.dirname(_HERE)), "shared", "data", "CUB_200_2011_subset100")
)


def _common():
    """configs/common.py, loaded by path (config files are not a package; no sys.path edit)."""
    spec = importlib.util.spec_from_file_location("fgpair_configs_common", os.path.join(_HERE, "common.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str = ""):
    """configs/common.py's `get_config(arg)` on CUB (default folder: the shared 100-class subset, or
    $FGPAIR_CUB_DIR). Raises ValueError for an unknown variant."""
    return _common().get_config(arg, data_set="cub", manual_dir=DEFAULT_CUB_DIR, config_file="configs/cub.py")

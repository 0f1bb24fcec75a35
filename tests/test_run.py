"""A run is built or restored in one place: resume and re-evaluation read only the workdir; a changed
training config is refused in one line; the config is validated before anything is built; the package
has no import cycle and names no method outside `methods/`; importing it changes no global state."""
import ast
import json
import importlib
import os
import pkgutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import fgpair_jax
from conftest import REPO, tiny_config, write_tiny_cub
from fgpair_jax import evaluate, features, parallel, run, run_config, train
from fgpair_jax.errors import ConfigError
from fgpair_jax.methods import METHODS, moco

PACKAGE = os.path.dirname(fgpair_jax.__file__)


def save_as_torch_checkpoint(encoder_variables: dict, path: str) -> None:
    """The flax ResNet variables under torchvision's names (the inverse of `pretrained.torch_to_flax`)."""
    torch = pytest.importorskip("torch")
    leaves = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
    modules = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
    state = {}
    for collection in ("params", "batch_stats"):
        for keys, value in jax.tree_util.tree_flatten_with_path(encoder_variables[collection])[0]:
            *path_keys, leaf = [k.key for k in keys]
            names = [modules.get(k, k.replace("_", ".") if k.startswith("layer") else k) for k in path_keys]
            value = np.array(value)  # a writable copy: torch.from_numpy needs one
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value  # HWIO -> OIHW
            state[".".join(names + [leaves[leaf]])] = torch.from_numpy(np.ascontiguousarray(value))
    torch.save(state, path)


def test_resume_and_reevaluation_need_no_initial_weights_and_a_changed_schedule_is_refused(tmp_path):
    data = write_tiny_cub(str(tmp_path / "CUB_200_2011"))
    variables = moco.init_variables(jax.random.key(7), tiny_config())
    init_path = str(tmp_path / "start.pth")
    save_as_torch_checkpoint({c: variables[c]["encoder"] for c in ("params", "batch_stats")}, init_path)
    workdir = str(tmp_path / "run")
    config = tiny_config(method="moco", **{"data.manual_dir": data, "model.init": init_path})
    first = train.train_and_evaluate(config, workdir)

    os.remove(init_path)  # the run's own checkpoint holds every weight from now on
    again = train.train_and_evaluate(config, workdir)  # finished and evaluated: the saved metrics, nothing loaded
    assert again["linear_top1"] == pytest.approx(first["linear_top1"]) and again["step"] == first["step"]
    reevaluated = evaluate.evaluate_workdir(workdir, force=True)
    assert reevaluated["retrieval_map"] == pytest.approx(first["retrieval_map"], abs=1e-6)

    saved = open(os.path.join(workdir, "config.json")).read()
    longer = tiny_config(method="moco", **{"data.manual_dir": data, "model.init": init_path, "num_epochs": 2})
    with pytest.raises(ConfigError, match=r"config\.num_epochs is 1 in the checkpoint but 2 now .*set it back to 1"):
        train.train_and_evaluate(longer, workdir)
    assert open(os.path.join(workdir, "config.json")).read() == saved  # still describes what trained
    assert json.loads(saved)["data"]["manual_dir"] == os.path.abspath(data)


def test_the_restore_template_is_abstract_and_sharded(tmp_path):
    config = tiny_config()
    mesh = parallel.make_mesh()
    plan = run.plan(config, num_train_examples=18, mesh=mesh)
    leaves = jax.tree.leaves(plan.abstract_state)
    assert leaves and all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
    assert all(leaf.sharding == parallel.replicated(mesh) for leaf in leaves)
    assert plan.steps_per_epoch == 2 and plan.total_steps == 2 and plan.method_sizes == {"queue_size": 8}


@pytest.mark.parametrize("key,value,named", [
    ("method", "mocco", "config.method='mocco'"),
    ("model.name", "resnet51", "config.model.name='resnet51'"),
    ("data.name", "stanford_dogs", "config.data.name='stanford_dogs'"),
    ("fgpair.criterion", "low", "config.fgpair.criterion='low'"),
    ("fgpair.variance_fraction", 1.5, "config.fgpair.variance_fraction=1.5"),
    ("optim.learning_rate", -0.1, "config.optim.learning_rate=-0.1"),
    ("eval.knn_temperature", 0.0, "config.eval.knn_temperature=0.0"),
    ("global_batch_size", 0, "config.global_batch_size=0"),
    ("moco.temperature", 0.0, "config.moco.temperature=0.0"),
    ("on_nonfinite", "ignore", "config.on_nonfinite='ignore'"),
])
def test_validation_names_the_key(key, value, named):
    with pytest.raises(ConfigError) as error:
        run_config.validate(tiny_config(**{key: value}))
    assert named in str(error.value) and "\n" not in str(error.value)


def test_every_shipped_config_validates():
    from configs import cub, cub_ablations

    for config in (cub.get_config(), cub.get_config("quick"), cub.get_config("medium"), cub.get_config("tiny"),
                   cub_ablations.get_config("random,quick")):
        run_config.validate(config)
    for name in ("cars", "aircraft", "image_folder"):  # each data set's own file, e.g. configs/cars.py:tiny
        module = importlib.import_module(f"configs.{name}")
        for variant in ("", "quick", "tiny"):
            config = module.get_config(variant)
            assert config.data.name == name
            run_config.validate(config)


def run_main(*args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "fgpair_jax.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_user_errors_print_one_line_without_a_traceback(tmp_path, tiny_cub):
    nowhere = f"--config.data.manual_dir={tmp_path / 'nowhere'}"  # not even read: validation comes first
    cases = [
        (["--config.method=mocco", nowhere], "error: Unknown config.method='mocco'; choose one of"),
        (["--config.optim.lerning_rate=0.1"], "error: Unknown config key in --config.optim.lerning_rate=0.1:"),
        ([nowhere], "does not exist"),
        ([f"--config.data.manual_dir={tiny_cub}", f"--config.model.init={tmp_path / 'gone.pth'}"],
         "error: Pretrained checkpoint"),
    ]
    for args, expected in cases:
        result = run_main("--config=configs/cub.py:tiny", f"--workdir={tmp_path / 'run'}", *args)
        assert result.returncode == 2, result.stderr[-2000:]
        assert "Traceback" not in result.stderr, result.stderr[-2000:]
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and expected in lines[0], result.stderr[-2000:]
    debug = run_main("--config=configs/cub.py:tiny", f"--workdir={tmp_path / 'run'}", "--config.method=mocco",
                     nowhere, "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


def _imports(path: str, module: str) -> set:
    """Modules of this package that `module` (file `path`) imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fgpair_jax"):
            base = node.module
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if _is_module(candidate) else base)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("fgpair_jax"))
    found.discard(module)
    return found


def _is_module(name: str) -> bool:
    relative = os.path.join(os.path.dirname(PACKAGE), *name.split("."))
    return os.path.isfile(relative + ".py") or os.path.isdir(relative)


def _package_modules() -> dict:
    modules = {}
    for info in pkgutil.walk_packages([PACKAGE], "fgpair_jax."):
        spec = info.module_finder.find_spec(info.name)
        modules[info.name] = spec.origin
    return modules


def test_the_package_has_no_import_cycle():
    modules = _package_modules()
    graph = {name: {m for m in _imports(path, name) if m in modules} for name, path in modules.items()}
    visiting, done = set(), set()

    def visit(name, trail):
        if name in done:
            return
        assert name not in visiting, "import cycle: " + " -> ".join(trail + [name])
        visiting.add(name)
        for dependency in sorted(graph[name]):
            visit(dependency, trail + [name])
        visiting.discard(name)
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_every_registered_method_implements_the_protocol():
    from fgpair_jax.methods import Method

    members = [name for name in vars(Method) if not name.startswith("_")] + list(Method.__annotations__)
    for name, method in METHODS.items():
        missing = [member for member in members if not hasattr(method, member)]
        assert not missing, f"method {name!r} lacks {missing}"


def test_no_method_is_named_outside_methods():
    names = set(METHODS)
    for name, path in _package_modules().items():
        if name.startswith("fgpair_jax.methods"):
            continue
        tree = ast.parse(open(path).read())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                      and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in names and id(node) not in docstrings:
                pytest.fail(f"{name} line {node.lineno} names the method {node.value!r}")
            if isinstance(node, ast.ImportFrom) and node.module == "fgpair_jax.methods":
                assert not names & {a.name for a in node.names}, f"{name} imports a method module"


def test_importing_the_package_changes_no_global_state():
    code = (
        "import pkgutil, sys, importlib, fgpair_jax\n"
        "path = list(sys.path)\n"
        "for info in pkgutil.walk_packages(fgpair_jax.__path__, 'fgpair_jax.'):\n"
        "    importlib.import_module(info.name)\n"
        "from fgpair_jax.data import pipeline\n"
        "list(pipeline.eval_batches([{'image': __import__('numpy').zeros((8, 8, 3), 'uint8'), 'label': 0}],"
        " batch_size=1, image_size=8))\n"
        "from absl import flags\n"
        "assert not flags.FLAGS.is_parsed(), 'absl flags marked as parsed'\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
        "assert sys.path == path, 'sys.path edited'\n"
        "print('clean')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 0 and "clean" in result.stdout, result.stderr[-2000:]


def test_eval_crop_fraction_is_what_evaluation_reads():
    from fgpair_jax.data import pipeline

    image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    source = [{"image": image, "label": 0}]
    for fraction in (0.5, 1.0):
        config = tiny_config(**{"data.eval_crop_fraction": fraction, "eval.batch_size": 1})
        batch = next(iter(features.split_batches(source, config)))
        np.testing.assert_array_equal(batch["image"][0], pipeline.eval_transform(image, 32, fraction))


def test_fgpair_figure_masks_by_the_variance_the_run_ranks_by():
    from fgpair_jax import optim, state as state_lib

    config = tiny_config(method="fgpair", **{"fgpair.criterion": "variance", "fgpair.variance_ema_decay": 0.9})
    tx = optim.make_optimizer(config, steps_per_epoch=2)
    state = state_lib.create_train_state(config, jax.random.key(0), tx, state_lib.method_sizes(config, None))
    ema = np.arange(64, dtype=np.float32)[::-1].copy()  # the last dimensions have the lowest EMA variance
    state = state.replace(method_state=dict(state.method_state, feature_variance=ema, variance_initialized=np.bool_(True)))
    images = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
    arrays = METHODS["fgpair"].figure_arrays(state, images, jax.random.key(2), config)
    expected = np.zeros(64, np.float32)
    expected[-16:] = 1.0  # variance_fraction 0.25 of 64 dimensions, lowest by the EMA
    np.testing.assert_array_equal(arrays["mask"], expected)
    assert arrays["pair_a"].shape == arrays["pair_b"].shape == (8, 32, 32, 3) and arrays["cam"].shape == (8, 32, 32)


def test_a_config_sized_for_an_accelerator_warns_on_a_cpu(capsys):
    from configs import cub

    train._warn_if_sized_for_an_accelerator(cub.get_config())  # the paper protocol
    assert "sized for a GPU/TPU" in capsys.readouterr().out
    train._warn_if_sized_for_an_accelerator(cub.get_config("quick"))
    assert capsys.readouterr().out == ""

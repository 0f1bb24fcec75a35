"""The Colab notebook: its cells parse and call functions that exist with those arguments, and every cell runs.

The run executes the notebook as written, outside Colab (its Colab-only steps skip), with its parameters cell
overridden the way papermill does it (an injected cell after it): a tiny synthetic CUB folder, the `tiny` config
and a one-run table, everything written under tmp_path. The kernel inherits this process's environment, so it
shares the test session's persistent compilation cache (conftest.py).
"""
import ast
import importlib
import importlib.util
import inspect
import json
import os

import nbformat

from conftest import REPO
from fgpair_jax.data.synthetic import write_tiny
from fgpair_jax.evaluation import HEADLINE_METRICS

NOTEBOOK = os.path.join(REPO, "notebooks", "fgpair_colab.ipynb")
CELL_TIMEOUT_S = 900  # per cell, for a loaded 2-core CPU (the whole run: 1-2.5 CPU-minutes, warm or cold cache)


def read_notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def code_sources():
    for cell in read_notebook().cells:
        if cell.cell_type == "code":
            yield "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!")))


def test_notebook_cells_parse_and_their_fgpair_calls_resolve():
    calls, modules = set(), {}  # the cells share one namespace: a module imported by one is used by later ones
    for source in code_sources():
        tree = ast.parse(source)
        imported = {alias.asname or alias.name: (node.module, alias.name)
                    for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
                    and node.module.split(".")[0] in ("fgpair_jax", "configs") for alias in node.names}
        modules.update({name: importlib.import_module(f"{package}.{attribute}") for name, (package, attribute)
                        in imported.items() if importlib.util.find_spec(f"{package}.{attribute}")})  # not constants
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in modules):
                function = getattr(modules[node.func.value.id], node.func.attr)  # AttributeError: a removed name
                inspect.signature(function).bind(*node.args, **{k.arg: k.value for k in node.keywords})
                calls.add(f"{node.func.value.id}.{node.func.attr}")
    assert calls == {"distributed.maybe_initialize", "cub.get_config", "run_config.override", "experiments.run_name",
                     "train.train_and_evaluate", "evaluate.evaluate_workdir", "experiments.run_one",
                     "experiments.write_report", "experiments.markdown_table"}


def test_notebook_is_valid_with_cell_ids_and_a_parameters_cell_of_plain_assignments():
    notebook = read_notebook()
    nbformat.validate(notebook)  # nbformat 4.5: every cell has an id
    assert (notebook.nbformat, notebook.nbformat_minor) >= (4, 5)
    first_code = next(cell for cell in notebook.cells if cell.cell_type == "code")
    assert first_code.id == "parameters" and "parameters" in first_code.metadata.get("tags", [])
    assert all(isinstance(node, ast.Assign) for node in ast.parse(first_code.source).body)  # CI can override them


def outputs_of(notebook, cell_id):
    """{mime type or stream name: [data, ...]} of one executed cell."""
    found = {}
    for output in next(cell for cell in notebook.cells if cell.get("id") == cell_id).outputs:
        for key, value in output.get("data", {"stream": output.get("text", "")}).items():
            found.setdefault(key, []).append(value)
    return found


def test_notebook_runs_every_cell_on_a_tiny_folder(tmp_path):
    from nbclient import NotebookClient  # the dev extra's; imported where it is used

    drive_root = tmp_path / "drive"
    parameters = {"DRIVE_ROOT": str(drive_root), "CUB": write_tiny("cub", str(tmp_path / "CUB_200_2011")),
                  "CONFIG": "tiny", "TABLE_ARMS": ("fgpair",), "TABLE_SEEDS": (0,)}
    notebook = read_notebook()
    position = next(i for i, cell in enumerate(notebook.cells) if cell.get("id") == "parameters") + 1
    notebook.cells.insert(position, nbformat.v4.new_code_cell(
        "\n".join(f"{name} = {value!r}" for name, value in parameters.items()), id="injected-parameters"))

    NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}).execute()  # raises on a cell's error

    workdir = drive_root / "runs" / "cub_tiny" / "fgpair_seed0"
    with open(workdir / "eval" / "metrics.json") as f:
        metrics = json.load(f)
    assert set(HEADLINE_METRICS) <= set(metrics) and isinstance(metrics["linear_top1"], float)
    assert (drive_root / "tensorflow_datasets").is_dir()  # the build went where the notebook says
    assert (drive_root / "runs" / "cub_tiny" / "table" / "runs" / "fgpair_seed0.json").is_file()
    for cell_id in ("train", "evaluate"):
        assert "linear top-1" in outputs_of(notebook, cell_id)["text/markdown"][0]
    assert len(outputs_of(notebook, "figures")["image/png"]) >= 2  # gradcam.png, pairs.png (loss curves too)
    table = outputs_of(notebook, "table")
    assert "| fgpair | 1 |" in table["text/markdown"][0] and table["image/png"]

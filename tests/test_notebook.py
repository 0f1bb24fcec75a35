"""The Colab notebook's code still parses and still calls functions that exist with those arguments."""
import ast
import importlib
import inspect
import json
import os

from conftest import REPO

NOTEBOOK = os.path.join(REPO, "notebooks", "fgpair_colab.ipynb")


def code_cells():
    with open(NOTEBOOK) as f:
        cells = json.load(f)["cells"]
    for cell in cells:
        if cell["cell_type"] == "code":
            lines = "".join(cell["source"]).splitlines()
            yield "\n".join(line for line in lines if not line.lstrip().startswith(("%", "!")))


def test_notebook_cells_parse_and_their_fgpair_calls_resolve():
    calls = set()
    for source in code_cells():
        tree = ast.parse(source)
        modules = {alias.asname or alias.name: f"{node.module}.{alias.name}"
                   for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
                   and node.module.split(".")[0] in ("fgpair_jax", "configs") for alias in node.names}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in modules):
                module = importlib.import_module(modules[node.func.value.id])
                function = getattr(module, node.func.attr)  # AttributeError: the notebook calls a removed name
                inspect.signature(function).bind(*node.args, **{k.arg: k.value for k in node.keywords})
                calls.add(f"{node.func.value.id}.{node.func.attr}")
    assert calls == {"cub.get_config", "train.train_and_evaluate", "experiments.run_one",
                     "experiments.write_report", "experiments.markdown_table"}

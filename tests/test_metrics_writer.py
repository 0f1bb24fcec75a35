"""The metrics writer: JSONL lines and TensorBoard event files, without importing torch."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

# In a fresh process (this one may have torch imported by other tests): writing metrics must not import
# torch (seconds per training process where it is installed), and torch must still import afterwards.
WRITE_THEN_IMPORT_TORCH = """
import sys
from fgpair_jax.metrics_writer import MetricsWriter
writer = MetricsWriter(sys.argv[1])
writer.write_scalars(1, {"loss": 2.5})
writer.close()
assert "torch" not in sys.modules, "writing metrics imported torch"
import torch
print(torch.zeros(2).sum().item())
"""


def test_metrics_go_to_jsonl_and_tensorboard_without_importing_torch(tmp_path):
    pytest.importorskip("torch")  # the dev extra has it: the case the writer guards against
    workdir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", WRITE_THEN_IMPORT_TORCH, str(workdir)], cwd=REPO,
                            capture_output=True, text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "0.0"
    assert [json.loads(line) for line in open(workdir / "metrics.jsonl")] == [{"step": 1, "loss": 2.5}]
    events = os.listdir(workdir / "tensorboard")
    assert len(events) == 1 and events[0].startswith("events.out.tfevents.")
    assert os.path.getsize(workdir / "tensorboard" / events[0]) > 0

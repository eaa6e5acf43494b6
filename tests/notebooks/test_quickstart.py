"""Executes notebooks/quickstart.ipynb top to bottom with tiny settings."""
import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
  monkeypatch.setenv("QUICKSTART_STEPS", "4")
  monkeypatch.setenv("QUICKSTART_IMAGES", "24")
  monkeypatch.setenv("QUICKSTART_DIR", str(tmp_path / "quickstart"))
  # The kernel imports the checkout's package, not an installed one.
  monkeypatch.setenv("PYTHONPATH", str(REPO))
  nb = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
  client = NotebookClient(nb, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": str(REPO)}})
  client.execute()
  outputs = {i: "".join(o.get("text", "") for o in cell.get("outputs", []))
             for i, cell in enumerate(nb.cells) if cell.cell_type == "code"}
  text = "\n".join(outputs.values())
  assert "mask AP after training:" in text
  assert "3-class mask AP:" in text
  # The fine-tuning table skipped the class-dependent variables only.
  assert "shape differs" in text
  assert "variables restored" in text
  # The last cell drew a figure.
  last = nb.cells[-1]
  assert any("image/png" in o.get("data", {}) for o in last.outputs)
  assert (tmp_path / "quickstart" / "checkpoints").is_dir()

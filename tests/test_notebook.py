"""The example notebook runs top to bottom in a real Jupyter kernel, on this checkout's memsched,
and shows the plan's HTML view and its figures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")
pytest.importorskip("pandas")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "inspect_plan.ipynb"


def test_example_notebook_runs(monkeypatch):
    # the kernel is a subprocess: point it at this checkout, whatever is installed
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit it without outputs"
    nb.cells.append(nbformat.v4.new_code_cell("import memsched; print(memsched.__file__)"))
    client = nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # raises CellExecutionError, naming the cell, on the first error

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    mimes = [m for o in outputs if o.output_type in ("display_data", "execute_result") for m in o.data]
    figures = [m for m in mimes if m in ("image/png", "image/svg+xml")]
    assert len(figures) >= 2, f"expected the timeline and memory figures, got {mimes}"
    html = [o.data["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("memsched-plan" in h and "data:image/png;base64," in h and "predicted vs measured" in h
               for h in html), "the plan's HTML view (with plots and the measured run) is missing"
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "def program(" in printed and "prefetch(" in printed, "the listing should show streamed weights"
    used = nb.cells[-1].outputs[0].text.strip()
    assert Path(used).resolve().is_relative_to(ROOT / "memsched"), f"the kernel imported {used}"

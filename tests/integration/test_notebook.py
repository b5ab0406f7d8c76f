"""The optimizer-comparison notebook runs end to end (offline) and writes its JSON, CSVs and plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "optimizer_comparison.ipynb"


def test_notebook_is_stored_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


def test_notebook_runs_offline_and_writes_its_files(tmp_path, monkeypatch):
    # A kernel spec that runs this interpreter, found first on JUPYTER_PATH: the kernel sees this venv's packages.
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (test)", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    out = tmp_path / "output"
    monkeypatch.setenv("PERSONA_DSPY_NOTEBOOK_OUT", str(out))
    for name in ("PERSONA_DSPY_LM", "PERSONA_DSPY_API_BASE", "PERSONA_DSPY_OPTIMIZER_LM", "PERSONA_DSPY_NOTEBOOK_USERS",
                 "PERSONA_DSPY_NOTEBOOK_TASK"):
        monkeypatch.delenv(name, raising=False)  # the defaults: offline stand-in, 2 users of LaMP_3
    monkeypatch.setenv("MPLBACKEND", "Agg")

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, kernel_name="python3", timeout=180,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on the first failing cell

    text = "\n".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                     for output in cell.outputs)
    assert f"python: {sys.executable}" in text
    assert "NOTE: offline stand-in" in text
    report = json.loads((out / "comparison.json").read_text(encoding="utf-8"))
    assert report["offline"] is True and report["task"] == "LaMP_3" and len(report["user_ids"]) == 2
    assert [r["name"] for r in report["results"]] == ["initial", "non_personalized", "persona_aligner", "gepa",
                                                      "miprov2", "copro", "bootstrap_fewshot"]
    assert all(r["status"] == "ok" for r in report["results"])
    rows = (out / "comparison.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0].startswith("optimizer,") and len(rows) == 1 + 7
    assert (out / "comparison_users.csv").is_file()
    assert (out / "score_vs_calls.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    images = [o for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the plot is shown in the notebook"

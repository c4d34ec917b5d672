"""The quickstart notebook runs from top to bottom (on a tiny model, so it cannot rot unnoticed)."""

from __future__ import annotations

from pathlib import Path

import nbformat
from cli_assets import save_tiny_model
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs_on_a_tiny_model(tmp_path, monkeypatch):
    monkeypatch.setenv("TREE_LORA_NOTEBOOK_MODEL", str(save_tiny_model(tmp_path / "tiny-model")))
    monkeypatch.setenv("TREE_LORA_NOTEBOOK_STEPS", "4")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [
        "".join(o.get("text", "") for o in cell.get("outputs", []))
        for cell in notebook.cells
        if cell.cell_type == "code"
    ]
    text = "\n".join(outputs)
    assert "held-out loss" in text
    assert "reloaded adapter gives the same logits: True" in text
    assert "adapter_model.safetensors" in text

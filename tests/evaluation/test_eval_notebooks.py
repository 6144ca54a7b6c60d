"""The notebooks are stored without outputs, hold no logic of their own, and run on small results.

Executing them needs nbformat, nbclient, ipykernel and matplotlib (skipped when absent).
"""

import json
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "evaluation" / "notebooks"


def _read(name):
    return json.loads((NOTEBOOKS / name).read_text())


@pytest.mark.parametrize("name", ["results.ipynb", "sweep.ipynb", "study.ipynb"])
def test_stored_without_outputs_and_without_logic(name):
    nb = _read(name)
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code
    for c in code:
        assert c["outputs"] == [] and c["execution_count"] is None
        src = "".join(c["source"])
        assert not re.search(r"^\s*(def|class|for|while|lambda)\b", src, re.M), src
    assert any("from evaluation." in "".join(c["source"]) for c in code)
    assert any("parameters" in c.get("metadata", {}).get("tags", []) for c in code)


def _results_fixture(tmp_path):
    from evaluation.tasks import PAPER_BENCHMARKS, get_benchmark
    from evaluation.report import build_report, write_report

    def results(v):
        return {
            b: {"headline": get_benchmark(b).headline, get_benchmark(b).headline: v}
            for b in (*PAPER_BENCHMARKS, "easyvqa")
        }

    write_report(build_report({"SAN+LoRA (ours)": results(0.7)}, reference=False), tmp_path / "runs" / "a")
    write_report(build_report({"LoRA (ours)": results(0.6)}, reference=False), tmp_path / "runs" / "b")
    return tmp_path / "runs"


def _multirun_fixture(tmp_path):
    root = tmp_path / "multirun" / "2025-01-01" / "00-00-00"
    for n, (peft, seed, v) in enumerate(
        [("lora", 0, 0.7), ("lora", 1, 0.72), ("san_lora", 0, 0.8), ("san_lora", 1, 0.82)]
    ):
        d = root / str(n)
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(f"- peft={peft}\n- seed={seed}\n")
        (d / "metrics.json").write_text(json.dumps({"val": {"easyvqa_accuracy": v}}))
    return tmp_path / "multirun"


def _execute(name, tmp_path, monkeypatch, env):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter-runtime"))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    return text, images


def test_results_notebook_runs(tmp_path, monkeypatch):
    runs = _results_fixture(tmp_path)
    text, images = _execute("results.ipynb", tmp_path, monkeypatch, {"LLAVA_SAN_RESULTS": str(runs)})
    assert "| SAN+DoRA (paper) | 79.2 | 64.4 | 54.5 | 71.1 | 58.3 | 88.0 | 67.4 | 68.9 | – |" in text
    assert "| SAN+LoRA (ours) | 70.0 | 70.0 | 70.0 | 70.0 | 70.0 | 70.0 | 70.0 | 70.0 | 70.0 |" in text
    assert "| LoRA (ours) | 60.0" in text
    assert len(images) == 1


def test_sweep_notebook_runs(tmp_path, monkeypatch):
    multirun = _multirun_fixture(tmp_path)
    text, images = _execute(
        "sweep.ipynb",
        tmp_path,
        monkeypatch,
        {"LLAVA_SAN_MULTIRUN": str(multirun), "LLAVA_SAN_SWEEP_SCALE": "100"},
    )
    assert "| peft | n | val/easyvqa_accuracy |" in text
    assert "| lora | 2 | 71.000 ± 1.414 |" in text and "| san_lora | 2 | 81.000 ± 1.414 |" in text
    assert len(images) == 1

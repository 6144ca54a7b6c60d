"""Hydra multirun collection: grouping by overrides, mean and sample std over seeds."""

import json
import statistics

import pytest

from evaluation.sweep import aggregate, collect_multirun, flatten_metrics, parse_overrides, sweep_markdown

VALUES = {
    ("lora", 0): 0.70,
    ("lora", 1): 0.74,
    ("lora", 2): 0.72,
    ("san_lora", 0): 0.80,
    ("san_lora", 1): 0.78,
}


def make_multirun(root):
    """peft x seed jobs as Hydra lays them out; job 5 crashed (no metrics.json)."""
    sweep = root / "2025-01-01" / "12-00-00"
    jobs = list(VALUES) + [("san_lora", 2)]
    for n, (peft, seed) in enumerate(jobs):
        d = sweep / str(n)
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(
            f"- peft={peft}\n- seed={seed}\n- +trainer.max_steps=5\n"
        )
        (d / ".hydra" / "config.yaml").write_text(f"seed: {seed}\npeft:\n  name: {peft}\n")
        if (peft, seed) in VALUES:
            v = VALUES[(peft, seed)]
            (d / "metrics.json").write_text(
                json.dumps({"val": {"pope_f1": v}, "train/loss": 1 - v, "done": True, "tag": "x"})
            )
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    return root


def test_parse_and_flatten():
    assert parse_overrides(["peft=lora", "+x.y=1", "++z=2", "~w"]) == {
        "peft": "lora",
        "x.y": "1",
        "z": "2",
        "w": "",
    }
    assert flatten_metrics({"a": {"b": 1, "c": "s"}, "d": True, "e": float("nan"), "f": 2}) == {
        "a/b": 1.0,
        "f": 2.0,
    }


def test_collect_and_aggregate(tmp_path, caplog):
    root = make_multirun(tmp_path / "multirun")
    jobs = collect_multirun(root)
    assert len(jobs) == 5 and "no metrics.json" in caplog.text
    assert jobs[0].overrides == {"peft": "lora", "seed": "0", "trainer.max_steps": "5"}
    assert jobs[0].metrics == {"val/pope_f1": 0.70, "train/loss": pytest.approx(0.30)}
    rows = aggregate(jobs)
    assert [r["group"] for r in rows] == [
        {"peft": "lora", "trainer.max_steps": "5"},
        {"peft": "san_lora", "trainer.max_steps": "5"},
    ]
    lora, san = (r["metrics"]["val/pope_f1"] for r in rows)
    assert lora["mean"] == pytest.approx(0.72) and lora["n"] == 3
    assert lora["std"] == pytest.approx(statistics.stdev([0.70, 0.74, 0.72])) == pytest.approx(0.02)
    assert san["mean"] == pytest.approx(0.79) and san["std"] == pytest.approx(0.0141421356)
    assert rows[0]["seeds"] == ["0", "1", "2"]
    one = aggregate(jobs[:1], by=["peft"])
    assert one[0]["metrics"]["val/pope_f1"]["std"] is None  # a single seed has no spread
    with pytest.raises(FileNotFoundError, match="no metrics.json"):
        collect_multirun(root, strict=True)


def test_seed_from_config_when_not_overridden(tmp_path):
    root = make_multirun(tmp_path / "m")
    for ov in root.rglob("overrides.yaml"):
        ov.write_text("\n".join(line for line in ov.read_text().splitlines() if "seed" not in line) + "\n")
    rows = aggregate(collect_multirun(root), by=["peft"])
    assert rows[0]["seeds"] == [0, 1, 2]


def test_markdown(tmp_path):
    rows = aggregate(collect_multirun(make_multirun(tmp_path / "m")), by=["peft"])
    md = sweep_markdown(rows, metrics=["val/pope_f1"], scale=100, digits=1).splitlines()
    assert md[0] == "| peft | n | val/pope_f1 |"
    assert md[2] == "| lora | 3 | 72.0 ± 2.0 |" and md[3] == "| san_lora | 2 | 79.0 ± 1.4 |"


def test_plot_sweep(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from evaluation.sweep import plot_sweep

    rows = aggregate(collect_multirun(make_multirun(tmp_path / "m")), by=["peft"])
    fig = plot_sweep(rows, "val/pope_f1", scale=100)
    assert [round(p.get_height(), 6) for p in fig.axes[0].patches] == [72.0, 79.0]


def test_empty_multirun(tmp_path):
    with pytest.raises(FileNotFoundError):
        collect_multirun(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no job"):
        collect_multirun(tmp_path / "empty")

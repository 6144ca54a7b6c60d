"""The SAN study (evaluation.study): the smoke study through its CLI from real runs, the statistics,
the study-file checks, the γ similarity, and every study file's arms composed with conf/train.yaml."""
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from evaluation.study.gamma import gamma_similarity
from evaluation.study.report import load_runs, summarize, summary_markdown
from evaluation.study.runner import choose_lr
from evaluation.study.spec import CONF_STUDY, load_study, parse_study
from evaluation.study.stats import mean_std, paired_bootstrap_ci

ROOT = Path(__file__).resolve().parents[2]


def _study_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "evaluation.study", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke study run once through its CLI: (results folder, run folders)."""
    tmp = tmp_path_factory.mktemp("study")
    res, runs = tmp / "results", tmp / "runs"
    proc = _study_cli("run", "--study", "smoke", "--results-dir", str(res), "--runs-dir", str(runs))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return res, runs


def test_smoke_study_runs_and_reports_from_real_runs(smoke):
    res, runs = smoke
    summary = json.loads((res / "summary.json").read_text())
    node = summary["regimes"]["pretrained"]
    assert set(node["arms"]) == {"lora", "san_lora"}

    def run_metric(arm, seed):  # independent of the result files: the run folders' own metrics.json
        return json.loads((runs / "pretrained" / arm / f"seed{seed}" / "metrics.json").read_text())[
            "test/easyvqa_accuracy"]

    for arm in ("lora", "san_lora"):
        a = node["arms"][arm]
        accs = [run_metric(arm, s) for s in (0, 1)]
        assert a["n_seeds"] == 2 and a["seeds"] == [0, 1]
        assert a["accuracy_mean"] == pytest.approx(statistics.fmean(accs))
        assert a["accuracy_std"] == pytest.approx(statistics.stdev(accs))
        assert set(a["by_type"]) == {"colour"}  # the pretrained regime asks colour questions only
    d = node["arms"]["san_lora"]["diff_vs_parent"]
    diffs = [run_metric("san_lora", s) - run_metric("lora", s) for s in (0, 1)]
    assert d["parent"] == "lora" and d["mean"] == pytest.approx(statistics.fmean(diffs))
    assert d["ci95_low"] <= d["mean"] <= d["ci95_high"]
    # the learning rate was chosen from the grid runs of the non-SAN arm, and both arms used it
    choice = node["lr_choice"]["lora"]
    grid = {lr: json.loads((runs / "pretrained" / f"grid_lora_lr{lr}" / "seed100" / "metrics.json").read_text())
            ["test/easyvqa_accuracy"] for lr in ("0.001", "0.002")}
    assert choice["scores"] == {k: [v] for k, v in grid.items()}
    assert choice["lr"] == choose_lr({float(k): [v] for k, v in grid.items()})
    assert node["arms"]["lora"]["lr"] == node["arms"]["san_lora"]["lr"] == choice["lr"]
    # γ: curves and the Fig. 8 similarity for the SAN arm only
    assert "gamma_final" in node["arms"]["san_lora"] and "gamma_final" not in node["arms"]["lora"]
    record = json.loads((res / "runs" / "pretrained" / "san_lora" / "seed0.json").read_text())
    assert set(record["gamma_curves"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"}
    assert record["gamma_curves"]["q_proj"]["step"]
    md = (res / "summary.md").read_text()
    assert "| san_lora | 2 |" in md and "vs lora" in md
    # resumable: a second run finds every result file and runs nothing
    again = _study_cli("run", "--study", "smoke", "--results-dir", str(res), "--runs-dir", str(runs))
    assert again.returncode == 0 and "0 jobs run" in again.stdout


def test_study_notebook_runs_on_the_smoke_results(smoke, tmp_path, monkeypatch):
    from test_eval_notebooks import _execute  # same folder (pytest puts it on sys.path)

    text, images = _execute("study.ipynb", tmp_path, monkeypatch, {"LLAVA_SAN_STUDY_RESULTS": str(smoke[0])})
    assert "## Regime `pretrained`" in text and "| san_lora | 2 |" in text
    assert len(images) == 2  # accuracy with intervals, γ curves


def test_report_without_runs_names_the_command(tmp_path):
    proc = _study_cli("report", "--study", "smoke", "--results-dir", str(tmp_path))
    assert proc.returncode != 0 and "python -m evaluation.study run --study smoke" in proc.stderr


def test_an_earlier_protocols_runs_are_not_read(tmp_path):
    """runs/scratch_3500steps/ keeps the first protocol's records (regime "scratch") beside the rerun in
    runs/scratch/: only the latter are the regime's results."""
    def record(folder, arm, seed, acc):
        path = tmp_path / "runs" / folder / arm / f"seed{seed}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"regime": "scratch", "arm": arm, "seed": seed, "metrics": {"acc": acc}}))

    record("scratch_3500steps", "lora", 0, 0.1)
    record("scratch_3500steps", "lora", 1, 0.2)
    record("scratch", "lora", 0, 0.9)
    runs = load_runs(tmp_path)
    assert list(runs) == ["scratch"] and list(runs["scratch"]["lora"]) == [0]
    assert runs["scratch"]["lora"][0]["metrics"]["acc"] == 0.9


def test_mean_std_and_bootstrap():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([0.5]) == (0.5, None)
    assert paired_bootstrap_ci([0.02] * 5) == (0.02, 0.02)
    lo, hi = paired_bootstrap_ci([-0.01, 0.0, 0.01, 0.02, 0.03], samples=2000)
    assert -0.01 <= lo < 0.01 < hi <= 0.03
    assert paired_bootstrap_ci([0.1, -0.2, 0.3], seed=3) == paired_bootstrap_ci([0.1, -0.2, 0.3], seed=3)


def test_choose_lr_best_mean_ties_to_smaller():
    assert choose_lr({1e-3: [0.5, 0.7], 2e-3: [0.6, 0.61]}) == 2e-3
    assert choose_lr({2e-3: [0.6], 1e-3: [0.6]}) == 1e-3
    with pytest.raises(ValueError):
        choose_lr({1e-3: []})


def _raw(**regime):
    base = {"seeds": [0, 1], "arms": {"lora": {}}, "lr": {"lora": 1e-3}}
    base.update(regime)
    return {"metric": "m", "arms": {"lora": {"family": "lora", "overrides": ["peft=lora"]},
                                    "san_lora": {"family": "lora", "parent": "lora", "overrides": ["peft=san_lora"]}},
            "regimes": {"r": base}}


@pytest.mark.parametrize("regime, message", [
    ({"lr_grid": {"lora": [1e-3]}, "grid_seeds": [1], "lr": {}}, "overlap"),
    ({"arms": {"nope": {}}}, "not defined"),
    ({"arms": {"san_lora": {}}}, "parent 'lora'"),
    ({"lr": {}}, "neither an lr_grid nor a fixed lr"),
    ({"seeds": [0, 0]}, "repeats a seed"),
])
def test_bad_study_files_are_named(regime, message):
    with pytest.raises(ValueError, match=message):
        parse_study(_raw(**regime))


def test_gamma_similarity_exact():
    ema = {(0, "q_proj"): [1.1, 0.9], (1, "q_proj"): [1.2, 0.8],   # deviations (.1,-.1), (.2,-.2): cos 1
           (0, "k_proj"): [0.9, 1.1],                               # (-.1,.1) vs q block 0: cos -1
           (0, "up_proj"): [1.0, 1.0, 1.5]}                         # other width, no deviation pairs
    sim = gamma_similarity(ema)
    assert sim["same_type_next_block"] == pytest.approx(1.0)
    assert sim["other_type_same_block"] == pytest.approx(-1.0)
    assert sim["same_type_next_block/q_proj"] == pytest.approx(1.0)


def _compose(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=["paths.output_dir=/tmp/unused", *overrides])


@pytest.mark.parametrize("name", sorted(p.stem for p in CONF_STUDY.glob("*.yaml")))
def test_every_study_arm_composes(name):
    """Each regime x arm of each study file composes with conf/train.yaml, and its adapter and SAN
    configs instantiate (the study_base checkpoint itself is built by the smoke test)."""
    from peft import LoraConfig

    study = load_study(name)
    for regime in study.regimes:
        for arm in regime.arms:
            cfg = _compose([*study.common_overrides, *regime.overrides, *arm.overrides,
                            *(f"{k}=0.001" for k in regime.lr_keys), "seed=3"])
            lora = instantiate(cfg.peft.lora_config)
            assert isinstance(lora, LoraConfig) and lora.use_dora == (arm.family == "dora")
            if cfg.peft.san is not None:
                instantiate(cfg.peft.san)
            assert cfg.optim.lr == 0.001 and cfg.seed == 3
    base = _compose(["experiment=study/base", *study.base_overrides])
    from llava_san.peft import FullFinetune

    assert isinstance(instantiate(base.peft), FullFinetune) and base.export


def test_study_experiments_choose_their_data():
    pre = _compose(["experiment=study/pretrained"])
    assert list(pre.data.question_types) == ["colour"] and list(pre.evaluate.question_types) == ["colour"]
    assert pre.evaluate.answer_map == pre.data.answer_map and pre.data.answer_map["red"] == "teal"
    assert pre.model.build.path.endswith("study/full/base/merged") and not pre.model.train_projector
    scratch = _compose(["experiment=study/scratch"])
    default = _compose([])
    for key in ("model", "peft", "data", "optim", "trainer"):
        assert scratch[key] == default[key], key  # the scratch regime is the default run


def test_one_runner_per_study(tmp_path):
    """A second `run` of a study that is already running is refused (it would delete the first's runs)."""
    import fcntl

    runs = tmp_path / "runs"
    runs.mkdir()
    with open(runs / ".study.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = _study_cli("run", "--study", "smoke", "--results-dir", str(tmp_path / "res"), "--runs-dir", str(runs))
    assert proc.returncode == 1 and "another `python -m evaluation.study run`" in proc.stderr


def test_committed_summary_is_the_report_of_the_committed_runs():
    """results/study/summary.{json,md} are exactly what `report --study full` makes from the committed
    per-run files, and every row of summary.md's tables stands in the README (the README's figures are
    the committed results, not copies that drifted)."""
    study = load_study("full")
    res = ROOT / "results" / "study"
    expected = summarize(study, res)
    assert json.loads((res / "summary.json").read_text()) == json.loads(json.dumps(expected))
    md = (res / "summary.md").read_text()
    assert md == summary_markdown(expected)
    readme = (ROOT / "README.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| arm ")]
    assert rows and [r for r in rows if r not in readme] == []

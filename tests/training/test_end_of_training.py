"""What `python -m train` does after the last step: the easy-vqa check only after training on easy-vqa
(evaluate.when)."""
import logging
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
QUIET = ["trainer.accelerator=cpu", "callbacks.progress_bar.refresh_rate=0", "peft=lora", "trainer.max_steps=2"]


def _cfg(out, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=[f"paths.output_dir={out}", *QUIET, *overrides])


def test_own_data_skips_the_easyvqa_check_and_says_why(tmp_path, caplog):
    from train.run import run

    with caplog.at_level(logging.INFO, logger="train.run"):
        metrics = run(_cfg(tmp_path, "data=synthetic"))
    assert not any(k.startswith("test/easyvqa") for k in metrics)
    (line,) = [r.getMessage() for r in caplog.records if "easy-vqa test accuracy skipped" in r.getMessage()]
    assert "SyntheticDataModule" in line and "not easy-vqa" in line and "evaluate.when=always" in line


def test_when_always_scores_easyvqa_after_other_data(tmp_path):
    from train.run import run

    metrics = run(_cfg(tmp_path, "data=synthetic", "evaluate.when=always", "evaluate.limit=4",
                       "evaluate.batch_size=4"))
    assert metrics["test/easyvqa_n"] == 4 and 0.0 <= metrics["test/easyvqa_accuracy"] <= 1.0


def test_easyvqa_runs_still_score_easyvqa(tmp_path):
    """The default `python -m train` and every SAN-study experiment train on easy-vqa: their check runs."""
    from llava_san.training.easyvqa_eval import should_evaluate

    experiments = [None] + [f"study/{p.stem}" for p in (CONF / "experiment" / "study").glob("*.yaml")]
    for experiment in experiments:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="train", overrides=[f"paths.output_dir={tmp_path}"] + (
                [f"experiment={experiment}"] if experiment else []))
        assert cfg.evaluate.when == "auto"
        assert should_evaluate(cfg.evaluate.when, cfg.data._target_)[0], experiment
    with pytest.raises(ValueError, match="evaluate.when must be one of"):
        should_evaluate("sometimes", cfg.data._target_)

"""What `python -m train` does after the last step: the easy-vqa check only after training on easy-vqa
(evaluate.when), and val/loss on the held-out split."""
import copy
import logging
import math
from pathlib import Path

import pytest
import torch
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


def test_val_loss_on_the_held_out_split(tmp_path, recwarn):
    """val/loss is the token-weighted mean loss of the trained model over the held-out split, computed
    here again with transformers' own loss on the saved adapter."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from llava_san.models import build_from_config
    from llava_san.peft import load_adapter
    from train.run import run

    cfg = _cfg(tmp_path, "evaluate=null", "data.max_train_samples=16", "data.max_val_samples=6",
               "data.batch_size=4", "data.num_workers=0")
    metrics = run(cfg)
    assert not [w for w in recwarn if "validation_step" in str(w.message)]  # Lightning's warning is gone
    assert metrics["val/tokens"] > 0 and math.isfinite(metrics["val/loss"])

    base, processor = build_from_config(OmegaConf.load(tmp_path / "config.yaml").model)
    model = load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    datamodule = instantiate(cfg.data, processor=processor)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            n = int((batch["labels"][:, 1:] != -100).sum())
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        pixel_values=batch["pixel_values"], labels=batch["labels"])
            total, tokens = total + float(out.loss) * n, tokens + n
    assert tokens == metrics["val/tokens"]
    assert metrics["val/loss"] == pytest.approx(total / tokens, rel=1e-5)

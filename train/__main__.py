"""``python -m train [overrides]``; see conf/train.yaml.

Multirun: ``python -m train -m peft=lora,san_lora seed=0,1`` (one folder and ``metrics.json`` per job under
``multirun/<task>/<time>/<job>``); the table: ``python -m evaluation.sweep multirun/<task>/<time>``.
"""
import hydra
from omegaconf import DictConfig


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from train.run import run

    metrics = run(cfg)
    return metrics.get("test/easyvqa_accuracy", metrics.get("train/loss_last"))


if __name__ == "__main__":
    main()

"""``python -m train [overrides]``; see conf/train.yaml.

Multirun: ``python -m train -m peft=lora,san_lora seed=0,1`` (one folder and ``metrics.json`` per job under
``multirun/<task>/<time>/<job>``); the table: ``python -m evaluation.sweep multirun/<task>/<time>``.
"""
import os

# Before torch loads libgomp: threads that finish a parallel region sleep instead of spinning, so they
# do not take the CPU from the dataloader workers. An explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from train.run import run  # torch + lightning: not loaded for --help / --cfg / config errors
    from llava_san.training.log_routing import route_lightning_to_root

    route_lightning_to_root()  # each Lightning message once on the console, and in the run's log file
    metrics = run(cfg)
    return metrics.get("test/easyvqa_accuracy", metrics.get("train/loss_last"))


if __name__ == "__main__":
    main()

"""``python -m train [overrides]``; see conf/train.yaml.

A run started in a new folder that stops on an exception leaves ``FAILED`` there (:mod:`train.marker`).

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
    from train.marker import clear_failed, is_fresh, mark_failed

    folder = cfg.paths.output_dir
    fresh = is_fresh(folder)  # a new run: a failure marks the folder FAILED (train/marker.py)
    try:
        from train.run import run  # torch + lightning: not loaded for --help / --cfg / config errors
        from llava_san.training.log_routing import route_lightning_to_root

        route_lightning_to_root()  # each Lightning message once on the console, and in the run's log file
        metrics = run(cfg)
    except BaseException as e:
        if fresh:
            mark_failed(folder, e)
        raise
    clear_failed(folder)
    return metrics.get("test/easyvqa_accuracy", metrics.get("train/loss_last"))


if __name__ == "__main__":
    main()

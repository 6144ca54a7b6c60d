"""``python -m evaluation [overrides]``: generate LLaVA answer files, score them, write the report.

See ``conf/eval.yaml`` for every option, e.g.::

    python -m evaluation path=outputs/train/<run> benchmarks=[gqa,pope] eval_root=playground/data/eval
    python -m evaluation benchmarks=[easyvqa] limit=64

The work is :func:`evaluation.run.run` (tests call it directly). A wrong input (missing file,
unknown benchmark, damaged answer file) logs ``error: ...`` and exits with status 1.
"""
import logging
import sys

import hydra
from omegaconf import DictConfig

log = logging.getLogger("evaluation")


@hydra.main(config_path="../conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from evaluation.files import DataFileError
    from evaluation.run import run

    try:
        results = run(cfg)
    except (FileNotFoundError, ValueError, DataFileError) as e:
        log.error("error: %s", e)  # Hydra's logging: the console and <output_dir>/__main__.log
        sys.exit(1)
    for name, res in results.items():  # the first headline metric, for Hydra sweepers
        value = res.get(res.get("headline", ""))
        if isinstance(value, (int, float)):
            return float(value)
    return None


if __name__ == "__main__":
    main()

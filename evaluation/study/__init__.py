"""The SAN study: SAN vs LoRA/DoRA and the paper's ablations, as runs of ``python -m train``.

``python -m evaluation.study run --study full`` plans and runs every job of ``conf/study/full.yaml``
(resumable: a job whose result file exists is not run again), ``python -m evaluation.study report``
turns the committed per-run result files into ``summary.json`` / ``summary.md``. Modules:

* :mod:`.spec`    -- the study file (regimes, arms, seeds, learning-rate grid) as validated dataclasses;
* :mod:`.runner`  -- the job plan, the learning-rate choice, the process pool, per-run result files;
* :mod:`.gamma`   -- γ curves from a run's CSV log and the Fig. 8 cosine similarities from its γ̄;
* :mod:`.stats`   -- mean ± std and the paired bootstrap confidence interval;
* :mod:`.report`  -- ``summary.json`` and the Markdown table.
"""

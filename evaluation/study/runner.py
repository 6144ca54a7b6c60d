"""Plan and run a study's jobs as ``python -m train`` processes; write one result file per run.

Order: the pretrained base (if a regime needs it) and every learning-rate grid job first; a family's
rate is chosen as soon as its grid jobs are done (:func:`choose_lr`: best mean metric over the grid
seeds, ties to the smaller rate) and written to ``runs/<regime>/lr_choice.json``; then every arm x seed.
Jobs run ``workers`` at a time, each in its own process with one intra-op thread and one dataloader
worker (``OMP_NUM_THREADS=1``): on small models two such processes do about twice the work of one
process with two threads. A job whose result file exists is skipped, so an interrupted study resumes
by running the same command; a failed job leaves no result file and is named in the error.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from llava_san.utils.atomic import atomic_file

from .gamma import gamma_curves, gamma_similarity, load_gamma_ema
from .spec import Regime, Study

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]


class StudyJobError(RuntimeError):
    """One or more study jobs failed (their logs are named)."""


@dataclass
class Job:
    """One ``python -m train`` run of the study."""

    key: str                     # "<regime>/<arm or grid name>/seed<k>"
    overrides: list[str]
    run_dir: Path
    result: Path
    info: dict = field(default_factory=dict)


def cache_dir() -> Path:
    """The project cache (``LLAVA_SAN_CACHE`` or ``<repo>/.cache``), as ``conf/paths/default.yaml``."""
    return Path(os.environ.get("LLAVA_SAN_CACHE", REPO / ".cache")).resolve()


def base_dir(study: Study) -> Path:
    """Where the study's pretrained base is built (``<cache>/study/<study>/base``; ``merged/`` is the
    checkpoint). One per study, so the smoke study never touches the full study's base."""
    return cache_dir() / "study" / study.name / "base"


def _fmt_lr(lr: float) -> str:
    return f"{lr:g}"


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
        fh.write("\n")


def choose_lr(scores: dict[float, list[float]]) -> float:
    """The learning rate with the best mean score over its grid seeds (ties: the smaller rate)."""
    if not scores or any(not v for v in scores.values()):
        raise ValueError(f"choose_lr needs at least one score per rate, got {scores}")
    return max(sorted(scores), key=lambda lr: sum(scores[lr]) / len(scores[lr]))


class StudyRunner:
    """Runs one study (see the module docstring). ``python_cmd`` is the interpreter of the jobs."""

    def __init__(self, study: Study, workers: int = 2, python_cmd: Optional[str] = None,
                 regimes: Optional[list[str]] = None, extra_overrides: tuple[str, ...] = ()):
        self.study, self.workers = study, max(1, int(workers))
        self.python = python_cmd or sys.executable
        self.regimes = [study.regime(r) for r in regimes] if regimes else list(study.regimes)
        self.extra = tuple(extra_overrides)
        self.results = Path(study.results_dir)
        self.runs = Path(study.runs_dir)

    # ------------------------------------------------------------------ paths
    def result_path(self, regime: str, name: str, seed: int) -> Path:
        return self.results / "runs" / regime / name / f"seed{seed}.json"

    def lr_choice_path(self, regime: str) -> Path:
        return self.results / "runs" / regime / "lr_choice.json"

    # ------------------------------------------------------------------ jobs
    def _job(self, regime: Regime, name: str, arm_overrides: tuple[str, ...], seed: int, lr: float,
             info: dict) -> Job:
        run_dir = (self.runs / regime.name / name / f"seed{seed}").resolve()
        overrides = [*self.study.common_overrides, *regime.overrides, *arm_overrides,
                     *(f"{k}={_fmt_lr(lr)}" for k in regime.lr_keys), f"seed={seed}", *self.extra]
        if regime.needs_base:
            overrides.append(f"model.build.path={base_dir(self.study) / 'merged'}")
        overrides.append(f"hydra.run.dir={run_dir}")
        return Job(f"{regime.name}/{name}/seed{seed}", overrides, run_dir,
                   self.result_path(regime.name, name, seed),
                   {"regime": regime.name, "seed": seed, "lr": lr, **info})

    def grid_jobs(self, regime: Regime) -> list[Job]:
        jobs = []
        for family, lrs in regime.lr_grid.items():
            arm = regime.arm(family)  # the non-SAN arm of the family
            for lr in lrs:
                for seed in regime.grid_seeds:
                    jobs.append(self._job(regime, f"grid_{family}_lr{_fmt_lr(lr)}", arm.overrides, seed, lr,
                                          {"arm": arm.name, "family": family, "grid": True}))
        return jobs

    def lr_for(self, regime: Regime, family: str) -> float:
        """The family's rate: fixed in the study file, or chosen from its finished grid jobs."""
        if family in regime.lr:
            return regime.lr[family]
        path = self.lr_choice_path(regime.name)
        choice = json.loads(path.read_text()) if path.is_file() else {}
        if family in choice:
            return float(choice[family]["lr"])
        scores: dict[float, list[float]] = {}
        for job in self.grid_jobs(regime):
            if job.info["family"] == family:
                metrics = json.loads(job.result.read_text())["metrics"]
                scores.setdefault(job.info["lr"], []).append(float(metrics[self.study.metric]))
        lr = choose_lr(scores)
        choice[family] = {"lr": lr, "metric": self.study.metric,
                          "scores": {_fmt_lr(k): v for k, v in sorted(scores.items())},
                          "rule": "best mean over the grid seeds, ties to the smaller rate"}
        _write_json(path, choice)
        log.info("%s: %s learning rate %s (%s)", regime.name, family, _fmt_lr(lr), choice[family]["scores"])
        return lr

    def arm_jobs(self, regime: Regime) -> list[Callable[[], Job]]:
        """Factories (the rate is read when the grid is done) for every arm x seed of ``regime``."""
        # order: family by family (first listed first), seed by seed, arm by arm -- an interrupted study
        # then holds complete SAN-vs-base pairs for its first seeds rather than whole arms
        families = list(dict.fromkeys(a.family for a in regime.arms))
        order = sorted(((families.index(a.family), seed, i, a) for i, a in enumerate(regime.arms)
                        for seed in (a.seeds or regime.seeds)), key=lambda t: t[:3])
        return [lambda arm=arm, seed=seed: self._job(
                    regime, arm.name, arm.overrides, seed, self.lr_for(regime, arm.family),
                    {"arm": arm.name, "family": arm.family, "parent": arm.parent, "grid": False})
                for _, seed, _, arm in order]

    def base_job(self) -> Job:
        d = base_dir(self.study)
        return Job("base", ["experiment=study/base", *self.study.base_overrides, *self.extra,
                            f"hydra.run.dir={d}"], d, d / "study_base.json", {"base": True})

    # ------------------------------------------------------------------ running
    def _launch(self, job: Job) -> Job:
        if job.run_dir.exists():  # a run killed half-way: start it afresh
            shutil.rmtree(job.run_dir)
        job.run_dir.mkdir(parents=True)
        env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1",
                   PYTHONUNBUFFERED="1")
        env.setdefault("PROJECT_ROOT", str(REPO))
        t0 = time.perf_counter()
        with open(job.run_dir.parent / f"{job.run_dir.name}.log", "w") as logf:
            rc = subprocess.run([self.python, "-m", "train", *job.overrides], cwd=REPO, env=env,
                                stdout=logf, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise StudyJobError(f"{job.key} failed (exit {rc}); log: {job.run_dir.parent / (job.run_dir.name + '.log')}")
        self._collect(job, time.perf_counter() - t0)
        return job

    def _collect(self, job: Job, wall_s: float) -> None:
        metrics = json.loads((job.run_dir / "metrics.json").read_text())
        if job.info.get("base"):
            _write_json(job.result, {"overrides": job.overrides, "metrics": metrics, "wall_s": wall_s})
            return
        ema = load_gamma_ema(job.run_dir / "adapter")
        record = {**job.info, "overrides": job.overrides, "wall_s": round(wall_s, 1), "metrics": metrics,
                  "gamma_curves": gamma_curves(job.run_dir), "gamma_similarity": gamma_similarity(ema) if ema else {}}
        _write_json(job.result, record)

    def _base_ready(self) -> bool:
        job = self.base_job()
        if not job.result.is_file():
            return False
        return json.loads(job.result.read_text()).get("overrides") == job.overrides

    def run(self) -> list[str]:
        """Run every missing job; return the keys of the jobs run. Raises :class:`StudyJobError` at the end
        if any failed (the others still run). One runner per study at a time (a lock in ``runs_dir``)."""
        import fcntl

        self.runs.mkdir(parents=True, exist_ok=True)
        with open(self.runs / ".study.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StudyJobError(f"another `python -m evaluation.study run` is running this study "
                                    f"(lock {self.runs / '.study.lock'}); wait for it or stop it") from None
            return self._run_locked()

    def _run_locked(self) -> list[str]:
        pending: list[tuple[Callable[[], Job], Callable[[], bool]]] = []
        base_needed = any(r.needs_base for r in self.regimes)
        base_done = (lambda: self._base_ready()) if base_needed else (lambda: True)
        if base_needed and not self._base_ready():
            pending.append((self.base_job, lambda: True))
        for regime in self.regimes:
            ready = base_done if regime.needs_base else (lambda: True)
            grid = self.grid_jobs(regime)
            pending += [(lambda j=j: j, ready) for j in grid]
            grid_done = (lambda grid=grid, ready=ready: ready() and all(j.result.is_file() for j in grid))
            pending += [(f, grid_done) for f in self.arm_jobs(regime)]
        ran, failures = [], []
        with cf.ThreadPoolExecutor(self.workers) as pool:
            running: dict[cf.Future, str] = {}
            while pending or running:
                started = True
                while started and len(running) < self.workers:
                    started = False
                    for i, (factory, ready) in enumerate(pending):
                        if ready():
                            pending.pop(i)
                            job = factory()
                            if job.result.is_file():
                                started = True
                                break
                            log.info("start %s", job.key)
                            running[pool.submit(self._launch, job)] = job.key
                            started = True
                            break
                if not running:
                    if pending:  # nothing can start: a dependency failed
                        failures.append(f"{len(pending)} jobs not run: a job they depend on failed")
                    break
                done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    key = running.pop(fut)
                    try:
                        fut.result()
                        ran.append(key)
                        log.info("done %s", key)
                    except Exception as err:  # keep going: other jobs do not depend on this one
                        failures.append(str(err))
                        log.error("%s", err)
        if failures:
            raise StudyJobError("; ".join(failures))
        return ran

"""The study file (``conf/study/<name>.yaml``) as validated dataclasses.

A study has *regimes* (a base experiment each, e.g. ``experiment=study/scratch``) and *arms* (PEFT
variants as ``python -m train`` overrides). Every arm of a regime runs with the same seeds, so a seed
fixes the initialisation and the data order for all arms alike and differences are paired. An arm's
``family`` (``lora`` or ``dora``) picks which of the regime's chosen learning rates it trains with: the
rate is chosen on the non-SAN arm of the family alone (``lr_grid``, ``grid_seeds``) and then shared
with every SAN arm of that family. ``parent`` is the arm a paired difference is taken against.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

FAMILIES = ("lora", "dora")
CONF_STUDY = Path(__file__).resolve().parents[2] / "conf" / "study"


@dataclass(frozen=True)
class Arm:
    """One PEFT variant: ``overrides`` for ``python -m train``; ``family`` selects its learning rate."""

    name: str
    family: str
    overrides: tuple[str, ...]
    parent: Optional[str] = None
    seeds: Optional[tuple[int, ...]] = None  # None: the regime's seeds


@dataclass(frozen=True)
class Regime:
    """A base experiment and the arms run on it."""

    name: str
    overrides: tuple[str, ...]
    seeds: tuple[int, ...]
    arms: tuple[Arm, ...]
    lr_keys: tuple[str, ...] = ("optim.lr",)
    lr_grid: dict[str, tuple[float, ...]] = field(default_factory=dict)
    grid_seeds: tuple[int, ...] = ()
    lr: dict[str, float] = field(default_factory=dict)  # fixed rates for families without a grid
    needs_base: bool = False

    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise KeyError(f"regime {self.name!r} has no arm {name!r}; arms: {[a.name for a in self.arms]}")


@dataclass(frozen=True)
class Study:
    """The whole study file."""

    name: str
    results_dir: str
    runs_dir: str
    metric: str
    regimes: tuple[Regime, ...]
    base_overrides: tuple[str, ...] = ()
    common_overrides: tuple[str, ...] = ()
    bootstrap_samples: int = 10000

    def regime(self, name: str) -> Regime:
        for r in self.regimes:
            if r.name == name:
                return r
        raise KeyError(f"study {self.name!r} has no regime {name!r}; regimes: {[r.name for r in self.regimes]}")


def _strs(v: Any, where: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
        raise ValueError(f"{where} must be a list of 'key=value' strings, got {v!r}")
    return tuple(v)


def _ints(v: Any, where: str) -> tuple[int, ...]:
    if not isinstance(v, (list, tuple)) or not v or not all(isinstance(x, int) for x in v):
        raise ValueError(f"{where} must be a non-empty list of integers, got {v!r}")
    if len(set(v)) != len(v):
        raise ValueError(f"{where} repeats a seed: {v!r}")
    return tuple(v)


def _arms(raw: dict, defs: dict, where: str) -> tuple[Arm, ...]:
    arms = []
    for name in raw:
        if name not in defs:
            raise ValueError(f"{where}: arm {name!r} is not defined under 'arms' ({sorted(defs)})")
        d = dict(defs[name])
        family = d.get("family")
        if family not in FAMILIES:
            raise ValueError(f"arm {name!r}: family must be one of {FAMILIES}, got {family!r}")
        seeds = raw[name].get("seeds") if isinstance(raw[name], dict) else None
        arms.append(Arm(name=name, family=family, overrides=_strs(d.get("overrides"), f"arm {name!r} overrides"),
                        parent=d.get("parent"),
                        seeds=None if seeds is None else _ints(seeds, f"{where} arm {name!r} seeds")))
    names = {a.name for a in arms}
    for a in arms:
        if a.parent is not None and a.parent not in names:
            raise ValueError(f"{where}: arm {a.name!r} has parent {a.parent!r}, which this regime does not run")
    return tuple(arms)


def parse_study(raw: dict, name: str = "study") -> Study:
    """A :class:`Study` from the plain dict of a study file; ``ValueError`` names what is wrong."""
    defs = raw.get("arms") or {}
    regimes = []
    for rname, r in (raw.get("regimes") or {}).items():
        where = f"regime {rname!r}"
        arms = _arms(r.get("arms") or {}, defs, where)
        if not arms:
            raise ValueError(f"{where} runs no arm")
        grid = {k: tuple(float(x) for x in v) for k, v in (r.get("lr_grid") or {}).items()}
        fixed = {k: float(v) for k, v in (r.get("lr") or {}).items()}
        for fam in {a.family for a in arms}:
            if fam not in grid and fam not in fixed:
                raise ValueError(f"{where}: family {fam!r} has neither an lr_grid nor a fixed lr")
        grid_seeds = _ints(r["grid_seeds"], f"{where} grid_seeds") if grid else ()
        seeds = _ints(r.get("seeds"), f"{where} seeds")
        if set(grid_seeds) & set(seeds):
            raise ValueError(f"{where}: grid_seeds {grid_seeds} overlap the comparison seeds {seeds}; "
                             "the learning rate must be chosen on seeds the comparison does not use")
        regimes.append(Regime(name=rname, overrides=_strs(r.get("overrides"), f"{where} overrides"),
                              seeds=seeds, arms=arms, lr_keys=_strs(r.get("lr_keys") or ["optim.lr"], where),
                              lr_grid=grid, grid_seeds=grid_seeds, lr=fixed,
                              needs_base=bool(r.get("needs_base", False))))
    if not regimes:
        raise ValueError(f"study {name!r} has no regime")
    return Study(name=str(raw.get("name", name)), results_dir=str(raw.get("results_dir", f"results/study/{name}")),
                 runs_dir=str(raw.get("runs_dir", f"outputs/study/{name}")), metric=str(raw.get("metric")),
                 regimes=tuple(regimes), base_overrides=_strs(raw.get("base_overrides"), "base_overrides"),
                 common_overrides=_strs(raw.get("common_overrides"), "common_overrides"),
                 bootstrap_samples=int(raw.get("bootstrap_samples", 10000)))


def load_study(name_or_path: str) -> Study:
    """Load ``conf/study/<name>.yaml`` (or a path to a study file)."""
    from omegaconf import OmegaConf

    path = Path(name_or_path)
    if not path.suffix:
        path = CONF_STUDY / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONF_STUDY.glob("*.yaml"))
        raise FileNotFoundError(f"no study file {path}; studies in conf/study: {known}")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return parse_study(raw, path.stem)

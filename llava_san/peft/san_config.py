"""``SanConfig``: the options of SAN (``docs/san.md``), validated, and their JSON form.

Saved beside every SAN adapter (``san_config.json``), with the resolved source → target pairs, so a
folder rebuilds exactly the SAN it was trained with.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

from .adapters import LLAMA_MODULE_TYPES

PROPAGATIONS = ("blockwise", "layerwise", "random", "off")
POOLS = ("lsq", "mean")
DORA_NORMS = ("base", "scaled")
WEIGHT_SIDE_SCALINGS = ("auto", True, False)


@dataclass
class SanConfig:
    """SAN options (``docs/san.md``). Every field is validated; a bad one raises ``ValueError``.

    Attributes:
        propagation: ``blockwise`` (default) | ``layerwise`` | ``random`` | ``off``.
        pool: ``lsq`` (least-squares scale, default) | ``mean`` (mean of clipped ratios).
        modules: module types that take part (subset of the seven LLaMA projections).
        clamp: ``(lo, hi)`` bounds of γ.
        eps: below this Σh², the lsq γ of a channel is 1 (dead channels pass no 0 down the chain).
        detach_cross_block: detach γ when it crosses a decoder-block boundary.
        ema: momentum of the running γ̄ used in eval and merge.
        reg_lambda: weight of the regulariser ``mean_l Σ_j (γ_lj − 1)²`` (see :func:`san_regularization`).
        dora_norm: DoRA row norm from the unscaled (``base``) or SAN-scaled (``scaled``) weight.
        seed: seed of the ``random`` pairing.
        weight_side_scaling: where the frozen path applies the γ it receives, an implementation choice
            (exact either way, see :func:`llava_san.peft.san.plan_frozen_path`): ``"auto"`` (default;
            the weight when the batch has at least ``in_features`` tokens), ``True`` (the weight
            whenever possible) or ``False`` (always the activations).
        fused_gamma: compute the ``lsq`` sums of γ (when γ needs no gradient) in one ``torch.compile``'d
            kernel that reads ``h'`` and ``h`` once in their own dtype with fp32 accumulation, an
            implementation choice (equal to the eager sums within fp32 round-off). Meant for GPUs, where
            the eager path widens both activations to fp32 copies first; on a CPU the eager path (row
            blocks folded into cache-sized accumulators) is faster. Off by default: not yet measured on
            a GPU here, and the first forward pays the compilation.
        pairs: the resolved source → target pairs (filled when SAN is attached; saved with the config).
    """

    propagation: str = "blockwise"
    pool: str = "lsq"
    modules: tuple[str, ...] = LLAMA_MODULE_TYPES
    clamp: tuple[float, float] = (0.0, 2.0)
    eps: float = 1e-12
    detach_cross_block: bool = True
    ema: float = 0.99
    reg_lambda: float = 0.0
    dora_norm: str = "base"
    seed: int = 0
    weight_side_scaling: Union[bool, str] = "auto"
    fused_gamma: bool = False
    pairs: Optional[list[tuple[str, str, str]]] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        def choice(name: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"SanConfig.{name} must be one of {list(allowed)}, got {value!r}")

        choice("propagation", PROPAGATIONS)
        choice("pool", POOLS)
        choice("dora_norm", DORA_NORMS)
        if isinstance(self.modules, str) or not all(isinstance(m, str) for m in self.modules):
            raise ValueError(f"SanConfig.modules must be a list of module types, got {self.modules!r}")
        unknown = [m for m in self.modules if m not in LLAMA_MODULE_TYPES]
        if unknown or not self.modules:
            raise ValueError(
                f"SanConfig.modules must be a non-empty subset of {list(LLAMA_MODULE_TYPES)}, got {list(self.modules)}"
            )
        self.modules = tuple(m for m in LLAMA_MODULE_TYPES if m in self.modules)
        try:
            lo, hi = (float(v) for v in self.clamp)
        except (TypeError, ValueError):
            raise ValueError(f"SanConfig.clamp must be a pair (lo, hi), got {self.clamp!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= 1.0 <= hi):
            raise ValueError(f"SanConfig.clamp must be finite with lo <= 1 <= hi, got {self.clamp!r}")
        self.clamp = (lo, hi)
        if not (isinstance(self.eps, (int, float)) and self.eps > 0):
            raise ValueError(f"SanConfig.eps must be a positive number, got {self.eps!r}")
        if not (isinstance(self.ema, (int, float)) and 0.0 <= self.ema < 1.0):
            raise ValueError(f"SanConfig.ema must be in [0, 1), got {self.ema!r}")
        if not (isinstance(self.reg_lambda, (int, float)) and self.reg_lambda >= 0):
            raise ValueError(f"SanConfig.reg_lambda must be >= 0, got {self.reg_lambda!r}")
        if not isinstance(self.detach_cross_block, bool):
            raise ValueError(f"SanConfig.detach_cross_block must be a bool, got {self.detach_cross_block!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"SanConfig.seed must be an int, got {self.seed!r}")
        if self.weight_side_scaling not in WEIGHT_SIDE_SCALINGS or (
                isinstance(self.weight_side_scaling, int) and not isinstance(self.weight_side_scaling, bool)):
            raise ValueError(f"SanConfig.weight_side_scaling must be 'auto', true or false, "
                             f"got {self.weight_side_scaling!r}")
        if not isinstance(self.fused_gamma, bool):
            raise ValueError(f"SanConfig.fused_gamma must be a bool, got {self.fused_gamma!r}")
        if self.pairs is not None:
            try:
                self.pairs = [(str(s), str(t), str(k)) for s, t, k in self.pairs]
            except (TypeError, ValueError):
                raise ValueError("SanConfig.pairs must be a list of (source, target, 'row'|'col') triples") from None
            if any(k not in ("row", "col") for _, _, k in self.pairs):
                raise ValueError("SanConfig.pairs kinds must be 'row' or 'col'")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (round-trips through :meth:`from_dict`)."""
        d = asdict(self)
        d["modules"] = list(self.modules)
        d["clamp"] = list(self.clamp)
        d["pairs"] = None if self.pairs is None else [list(p) for p in self.pairs]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SanConfig":
        """Build from :meth:`to_dict` output; unknown keys raise ``ValueError``."""
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown SanConfig fields {sorted(unknown)}; valid fields: {sorted(known)}")
        d = dict(d)
        if d.get("modules") is not None:
            d["modules"] = tuple(d["modules"])
        if d.get("clamp") is not None:
            d["clamp"] = tuple(d["clamp"])
        return cls(**d)


def san_config_json(cfg: SanConfig) -> str:
    """The config as pretty JSON (saved beside the adapter)."""
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)


__all__ = ["DORA_NORMS", "POOLS", "PROPAGATIONS", "SanConfig", "WEIGHT_SIDE_SCALINGS", "san_config_json"]

"""AdamW with separate adapter / projector learning rates, and the cosine schedule with linear warm-up.

LLaVA-1.5 LoRA recipe (``scripts/v1_5/finetune_lora.sh``): adapters ``2e-4`` (DoRA runs of the paper use
``1e-4``), projector ``mm_projector_lr=2e-5``, ``weight_decay=0``, ``warmup_ratio=0.03``, cosine to 0.
The schedule is HF's ``get_cosine_schedule_with_warmup`` written as a plain function (a ``LambdaLR``
whose lambda is a function keeps nothing pickled in its state dict: checkpoints load with
``weights_only=True``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch

from ..peft import is_adapter_param, is_projector_param


@dataclass
class OptimConfig:
    """Optimiser and schedule options (``conf/train.yaml: optim``).

    Attributes:
        lr: learning rate of the adapters (LoRA/DoRA/SAN tensors) and of anything else trained.
        projector_lr: learning rate of LLaVA's multimodal projector (``None``: same as ``lr``).
        weight_decay: AdamW weight decay (0 in LLaVA's recipe).
        betas: AdamW betas.
        eps: AdamW eps.
        warmup_ratio: fraction of the total optimiser steps spent in linear warm-up.
        min_lr_ratio: the cosine decays to ``min_lr_ratio * lr`` (0 in LLaVA's recipe).
    """

    lr: float = 2e-4
    projector_lr: float | None = 2e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"OptimConfig.lr must be > 0, got {self.lr!r}")
        if self.projector_lr is not None and not self.projector_lr > 0:
            raise ValueError(f"OptimConfig.projector_lr must be > 0 or null, got {self.projector_lr!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"OptimConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"OptimConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.weight_decay < 0:
            raise ValueError(f"OptimConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        self.betas = tuple(float(b) for b in self.betas)


def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], cfg: OptimConfig) -> list[dict]:
    """Split trainable parameters into ``adapter`` / ``projector`` / ``other`` groups (empty ones dropped).

    Names are matched with :func:`llava_san.peft.is_projector_param` after stripping a peft
    ``base_model.model.`` prefix, so the same rule serves peft-wrapped and plain models.
    """
    groups: dict[str, list] = {"adapter": [], "projector": [], "other": []}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        short = name.split("base_model.model.", 1)[-1]
        if is_adapter_param(short):
            groups["adapter"].append(p)
        elif is_projector_param(short):
            groups["projector"].append(p)
        else:
            groups["other"].append(p)
    lrs = {"adapter": cfg.lr, "projector": cfg.projector_lr or cfg.lr, "other": cfg.lr}
    return [{"name": k, "params": v, "lr": lrs[k]} for k, v in groups.items() if v]


def build_optimizer(named_params: Iterable[tuple[str, torch.nn.Parameter]],
                    cfg: OptimConfig, cpu_offload: bool = False) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups` (``adapter`` / ``projector`` / ``other`` learning rates).

    ``cpu_offload``: DeepSpeed's ``DeepSpeedCPUAdam`` in AdamW mode (same update, vectorised C++ on the
    host), for ZeRO with ``offload_optimizer`` on the CPU, where the optimizer states live in host memory
    and torch's AdamW would step them element-wise in Python-dispatched ops. This is what LLaVA's
    ``zero3_offload.json`` gets from its ``"optimizer": {"type": "AdamW"}`` block. Its C++ op is compiled
    by DeepSpeed on first use (a minute, cached in ``~/.cache/torch_extensions``).
    """
    groups = param_groups(named_params, cfg)
    if not groups:
        raise ValueError("nothing to train: no parameter requires grad "
                         "(peft=none with model.train_projector=false?)")
    if cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                adamw_mode=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def optimizer_offloaded(strategy: object) -> bool:
    """Whether ``strategy`` is DeepSpeed with ``zero_optimization.offload_optimizer`` on the CPU or NVMe."""
    config = getattr(strategy, "config", None)
    if not isinstance(config, dict):
        return False
    offload = (config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return offload.get("device") in ("cpu", "nvme")


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float,
                       min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``ceil(warmup_ratio * total_steps)`` steps, then cosine to ``min_lr_ratio``."""
    total_steps = max(int(total_steps), 1)
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

r"""SAN — "Synapse and Neuron" (Dai et al., ICML 2025, arXiv 2409.06706) on stock peft LoRA/DoRA.

SAN adds no trainable parameter. Each adapted layer measures, per output channel, how much its
adapter scales the frozen path, and hands that scaling vector γ to the *frozen weight* of a related
later layer. The full specification (with every ambiguity of the paper resolved) is
``docs/san.md``; section numbers below refer to it.

Notation (torch layout): frozen weight ``W`` is ``[out, in]``, ``y = W x``, LoRA scale ``s = alpha/r``,
activations ``x`` are ``(B, T, in)``, outputs ``(B, T, out)``.

1. Scaling vector of a layer (§1)::

       h  = g_row ⊙ (W (g_col ⊙ x))              frozen path, no bias, with the SAN scaling it receives
       h' = h + s · B A drop(x)                    LoRA
       h' = h + (ns−1) ⊙ W_SAN drop(x) + ns ⊙ s·B A drop(x),  ns = m / ‖W + s·B A‖_row (detached)   DoRA
       γ  = clamp(Pool(h' ⊘ h), lo, hi)            one value per output channel, fp32

   ``Pool`` runs over the non-padding tokens only: ``lsq`` → γ_j = Σ h'_j h_j / Σ h_j² (1 if Σ h_j² < eps);
   ``mean`` → mean of clamp(1 + (h'_j − h_j)/h_safe_j, −10, 10).

2. Propagation (§2): the γ of a *source* layer scales the frozen weight of its *target*::

       blockwise  γ(type t, block i)  ─rows→  W(type t, block i+1)          W ← diag(γ) W
       layerwise  v→o, o→gate, o→up, up→down, down(i)→q,k,v(i+1)  ─cols→     W ← W diag(γ)
       random     source drawn among earlier layers with equal out_features ─rows→
       off        γ computed and logged, never applied (the control arm)

   The stored ``W`` is never modified: the scaling is applied to activations
   (``g_row ⊙ (W (g_col ⊙ x))``), which also works when ZeRO-3 partitions ``W``. γ is detached across
   blocks (``detach_cross_block``) and keeps its gradient within a block.

3. State (§4): each layer keeps an fp32 buffer ``san_gamma_ema`` (γ̄, starts at 1), updated as
   ``γ̄ ← ema·γ̄ + (1−ema)·γ`` once per top-level forward in train mode. In ``eval()`` no γ is computed:
   targets read their sources' γ̄, so cached generation is consistent, and :func:`merge_san` folds
   γ̄ into the weights::

       LoRA  W_merged = diag(g_row) W diag(g_col) + s·B A
       DoRA  W_merged = diag(m / ‖W + s·B A‖_row) (diag(g_row) W diag(g_col) + s·B A)

At initialisation (B = 0, m = ‖W‖) every γ is exactly 1 and SAN computes exactly what LoRA/DoRA does.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel
from peft.tuners.lora import layer as lora_layer
from torch import nn

from .adapters import (
    LANGUAGE_LAYER_RE,
    LLAMA_MODULE_TYPES,
    apply_lora,
    base_transformers_model,
    language_tower_prefix,
)

PROPAGATIONS = ("blockwise", "layerwise", "random", "off")
POOLS = ("lsq", "mean")
DORA_NORMS = ("base", "scaled")
#: Layerwise pairs inside a block: target type -> source type (the source's output feeds the target).
LAYERWISE_IN_BLOCK = {"o_proj": "v_proj", "gate_proj": "o_proj", "up_proj": "o_proj", "down_proj": "up_proj"}
#: Layerwise pairs across blocks: down_proj of block i feeds q, k, v of block i+1.
LAYERWISE_NEXT_BLOCK = {"q_proj": "down_proj", "k_proj": "down_proj", "v_proj": "down_proj"}
_MEAN_RATIO_CLIP = 10.0
_MEAN_H_FLOOR = 1e-3


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# Pooling: γ from (h', h) over the non-padding tokens
# ----------------------------------------------------------------------------------------------
def pool_gamma(
    h_prime: torch.Tensor, h: torch.Tensor, token_mask: Optional[torch.Tensor], cfg: SanConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """γ (fp32 or wider, ``(out,)``, clamped) of one layer and the number of clamped entries.

    Args:
        h_prime: adapted output without bias, ``(..., out)``.
        h: frozen-path output without bias (with the SAN scaling the layer receives), ``(..., out)``.
        token_mask: ``(...)`` bool, True on tokens that count (non-padding), or None for all tokens.
    """
    acc = torch.promote_types(h.dtype, torch.float32)
    weights = None if token_mask is None else token_mask.reshape(-1, 1).to(acc)
    raw = _raw_gamma(h_prime, h, weights, cfg)
    lo, hi = cfg.clamp
    return raw.clamp(lo, hi), _count_clamped(raw, cfg)


def _raw_gamma(
    h_prime: torch.Tensor, h: torch.Tensor, weights: Optional[torch.Tensor], cfg: SanConfig
) -> torch.Tensor:
    """Unclamped γ, ``(out,)``, in ``acc`` = fp32 or wider; ``weights`` is the ``(N, 1)`` 0/1 token mask
    in ``acc`` (or None: every token counts). Differentiable unless called under ``no_grad``."""
    if torch.is_autocast_enabled(h.device.type):  # autocast would run vecdot and @ in bf16/fp16
        with torch.autocast(h.device.type, enabled=False):
            return _raw_gamma(h_prime, h, weights, cfg)
    out = h.shape[-1]
    acc = torch.promote_types(h.dtype, torch.float32)  # fp32 at least (bf16 activations), fp64 stays fp64
    hp = h_prime.reshape(-1, out)  # (N, out)
    hh = h.reshape(-1, out)  # (N, out)
    if hp.dtype != acc or hh.dtype != acc:
        hp, hh = hp.to(acc), hh.to(acc)
    if cfg.pool == "lsq":
        hk = hh if weights is None else hh * weights  # padded rows -> 0: they add nothing to either sum
        if torch.is_grad_enabled() and (hp.requires_grad or hh.requires_grad):
            num, den = torch.linalg.vecdot(hp, hk, dim=0), torch.linalg.vecdot(hk, hh, dim=0)
        else:  # the same products and sums (= vecdot), the second product reusing the first's buffer
            prod = hp * hk  # (N, out)
            num = prod.sum(0)
            den = torch.mul(hk, hh, out=prod).sum(0)
        # γ = 1 where Σh² < eps; the clamped divisor keeps the unused branch (and its gradient) finite
        return torch.where(den >= cfg.eps, num / den.clamp(min=cfg.eps), 1.0)
    # mean of the clipped ratio, exactly 1 where h' == h
    h_safe = torch.where(hh >= 0, hh.clamp(min=_MEAN_H_FLOOR), hh.clamp(max=-_MEAN_H_FLOOR))
    ratio = (1.0 + (hp - hh) / h_safe).clamp(-_MEAN_RATIO_CLIP, _MEAN_RATIO_CLIP)
    if weights is None:
        return ratio.mean(0)
    w = weights.reshape(-1)  # (N,)
    return (w @ ratio) / w.sum().clamp(min=1.0)


def _count_clamped(raw: torch.Tensor, cfg: SanConfig) -> torch.Tensor:
    """How many entries of the unclamped γ the clamp changes (0-d tensor: no device sync)."""
    lo, hi = cfg.clamp
    raw = raw.detach()
    return ((raw < lo) | (raw > hi)).sum()


# ----------------------------------------------------------------------------------------------
# Runtime state: one controller per model, one slot per taking-part layer
# ----------------------------------------------------------------------------------------------
class _SanState:
    """Per-model controller: config, the forward counter and the current batch's token mask."""

    def __init__(self, cfg: SanConfig):
        self.cfg = cfg
        self.forward_id = 0
        self.token_mask: Optional[torch.Tensor] = None  # (B, T) bool of the current top-level forward
        self._token_weights: dict[torch.dtype, torch.Tensor] = {}  # the mask as (B·T, 1) weights, by dtype
        self.record_all = cfg.propagation == "off" or cfg.reg_lambda > 0
        self.slots: list[_SanSlot] = []
        self.hook: Optional[torch.utils.hooks.RemovableHandle] = None

    def new_forward(self, token_mask: Optional[torch.Tensor]) -> None:
        """Start a top-level forward (called by the backbone pre-hook)."""
        self.forward_id += 1
        self.token_mask = token_mask
        self._token_weights = {}

    def token_weights(self, slot: "_SanSlot", h: torch.Tensor) -> Optional[torch.Tensor]:
        """The current forward's non-padding tokens as ``(B·T, 1)`` 0/1 weights in γ's accumulation dtype
        (made once per forward and dtype, shared by every layer), or None when every token counts."""
        mask = self.token_mask
        if mask is None:
            return None
        if mask.shape != h.shape[:-1]:
            raise RuntimeError(
                f"SAN: attention mask of shape {tuple(mask.shape)} does not match the activations "
                f"{tuple(h.shape[:-1])} of {slot.name}; train-mode forwards must see the whole sequence"
            )
        acc = torch.promote_types(h.dtype, torch.float32)
        weights = self._token_weights.get(acc)
        if weights is None:
            weights = self._token_weights[acc] = mask.reshape(-1, 1).to(acc)
        return weights


class _SanSlot:
    """What one taking-part layer knows: where it sits, its sources, and its latest batch γ."""

    def __init__(self, state: _SanState, name: str, block: int, mtype: str, module: "SanLoraLinear"):
        self.state, self.name, self.block, self.mtype, self.module = state, name, block, mtype, module
        self.row_src: Optional[_SanSlot] = None
        self.col_src: Optional[_SanSlot] = None
        self.has_consumer = False
        self.grad_consumer = False  # some consumer keeps γ's gradient (same block, or no detach)
        self.batch_gamma: Optional[torch.Tensor] = None
        self.batch_fid = -1
        self.ema_fid = -1
        self.raw_gamma: Optional[torch.Tensor] = None  # batch γ before the clamp (for the statistics)

    @property
    def n_clamped(self) -> Optional[torch.Tensor]:
        """Entries of the latest batch γ that the clamp changed (0-d tensor), counted only when asked."""
        return None if self.raw_gamma is None else _count_clamped(self.raw_gamma, self.state.cfg)

    def detach_from(self, src: "_SanSlot") -> bool:
        return self.state.cfg.detach_cross_block and src.block != self.block

    def incoming(self, src: Optional["_SanSlot"], dtype: torch.dtype, training: bool) -> Optional[torch.Tensor]:
        """The scaling this layer receives from ``src`` (batch γ in training, γ̄ in eval), as ``dtype``."""
        if src is None:
            return None
        if not training:
            return src.module.san_gamma_ema.to(dtype)
        if src.batch_fid != self.state.forward_id or src.batch_gamma is None:
            raise RuntimeError(
                f"SAN: source {src.name} of {self.name} did not compute γ in this forward; call the model "
                "through its top-level forward (the language model backbone hook counts forwards)"
            )
        g = src.batch_gamma
        return (g.detach() if self.detach_from(src) else g).to(dtype)

    def wants_gamma(self) -> bool:
        return self.has_consumer or self.state.record_all

    def record(self, gamma: torch.Tensor, raw: torch.Tensor) -> None:
        """Store this forward's γ (clamped, and ``raw`` before the clamp) and update γ̄ once per top-level
        forward (not in a recompute)."""
        state = self.state
        self.batch_gamma, self.batch_fid, self.raw_gamma = gamma, state.forward_id, raw
        if self.ema_fid != state.forward_id:
            self.ema_fid = state.forward_id
            momentum = state.cfg.ema
            with torch.no_grad():
                ema = self.module.san_gamma_ema
                ema.mul_(momentum).add_(gamma.to(ema), alpha=1.0 - momentum)


#: Apply SAN's scaling to the frozen weight inside a custom autograd function (see
#: :class:`_ScaledFrozenLinear`) rather than to the activations. Exact either way; the weight side
#: touches ``out·in`` elements instead of ``tokens·out`` and is used when the batch has at least
#: ``in_features`` tokens (and no ZeRO-3 partitioning, no row-γ gradient). ``"auto"`` (that rule),
#: ``True`` (whenever it applies) or ``False`` (never; activations are rescaled).
WEIGHT_SIDE_SCALING = "auto"


class _ScaledFrozenLinear(torch.autograd.Function):
    """``y = x (diag(g_row) W diag(g_col))ᵀ`` for a frozen ``W``, without keeping the scaled weight.

    The scaled ``(out, in)`` weight is made transiently in forward and again in backward, so no
    ``(tokens, out)`` activation is rescaled and nothing beyond ``x`` (only when ``g_col`` needs its
    gradient) is saved. ``g_row`` must not need a gradient (the caller falls back otherwise).
    Shapes: x ``(..., in)``, W ``(out, in)``, g_row ``(out,)``, g_col ``(in,)``.
    """

    @staticmethod
    def forward(ctx, x, weight, g_row, g_col):
        need_g_col = g_col is not None and ctx.needs_input_grad[3]
        ctx.save_for_backward(x if need_g_col else None, weight, g_row, g_col)
        ctx.dtype = x.dtype
        return F.linear(x, _scaled(weight, g_row, g_col, x.dtype))

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, g_row, g_col = ctx.saved_tensors
        grad_x = grad_g_col = None
        # the scaled weight as forward made it, in grad_y's dtype (they differ only under autocast, where
        # forward's F.linear ran in bf16/fp16 on the weight scaled in x's dtype)
        if ctx.needs_input_grad[3]:
            u = grad_y @ _scaled(weight, g_row, None, ctx.dtype).to(grad_y.dtype)  # grad w.r.t. (g_col ⊙ x)
            grad_x = u * g_col if ctx.needs_input_grad[0] else None
            grad_g_col = (u * x).reshape(-1, u.shape[-1]).sum(0)
        elif ctx.needs_input_grad[0]:
            grad_x = grad_y @ _scaled(weight, g_row, g_col, ctx.dtype).to(grad_y.dtype)
        return grad_x, None, None, grad_g_col


def _scaled(weight: torch.Tensor, g_row: Optional[torch.Tensor], g_col: Optional[torch.Tensor],
            dtype: torch.dtype) -> torch.Tensor:
    """``diag(g_row) W diag(g_col)`` in ``dtype`` (a new tensor; ``W`` itself is never modified)."""
    w = weight.to(dtype)
    if g_row is not None:
        w = w * g_row[:, None]
    if g_col is not None:
        w = w * g_col[None, :]
    return w


# ----------------------------------------------------------------------------------------------
# The layer: a peft lora.Linear whose frozen path receives SAN scaling and which emits γ
# ----------------------------------------------------------------------------------------------
class SanLoraLinear(lora_layer.Linear):
    """peft ``lora.Linear`` (LoRA or DoRA) with SAN. Created by :func:`attach_san` by re-classing the
    stock peft module in place, so every peft tensor keeps its name, dtype and device."""

    _san: Optional[_SanSlot]
    san_gamma_ema: torch.Tensor

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        slot = getattr(self, "_san", None)
        if (
            slot is None
            or self.disable_adapters
            or self.merged
            or kwargs.get("adapter_names") is not None
            or len(self.active_adapters) != 1
            or self.active_adapters[0] not in self.lora_A
        ):
            return super().forward(x, *args, **kwargs)
        self._check_forward_args(x, *args, **kwargs)
        adapter = self.active_adapters[0]
        training = self.training
        base = self.get_base_layer()
        lora_A, lora_B = self.lora_A[adapter], self.lora_B[adapter]
        dropout, scaling = self.lora_dropout[adapter], self.scaling[adapter]
        g_row = slot.incoming(slot.row_src, x.dtype, training)  # (out,) or None
        g_col = slot.incoming(slot.col_src, x.dtype, training)  # (in,) or None

        tokens = x.numel() // x.shape[-1]
        zero3 = hasattr(base.weight, "ds_id")  # ZeRO-3 partitions W: only a module call gathers it
        weight_side = (
            WEIGHT_SIDE_SCALING is not False
            and (g_row is not None or g_col is not None)
            # rescaling W touches out·in elements, rescaling activations tokens·out (+ tokens·in): take the
            # smaller (long sequences: the weight; short ones, e.g. 2 × 81 tokens at in = 768: activations)
            and (WEIGHT_SIDE_SCALING is True or tokens >= base.in_features)
            and not zero3
            and not (g_row is not None and g_row.requires_grad)
            and not args
            and not kwargs
        )
        # rescale the activations in place where that is exact and safe: y is the base layer's own new tensor
        # and nn.Linear does not save it for backward; not when g_row needs its gradient (autograd would save
        # y), nor when a hook on the base layer may hold y (ZeRO-3 hooks wrap it)
        row_in_place = (
            g_row is not None
            and not zero3
            and not base._forward_hooks
            and not (g_row.requires_grad and torch.is_grad_enabled())
        )

        def frozen(inp: torch.Tensor) -> torch.Tensor:
            """g_row ⊙ (W (g_col ⊙ inp)), no bias."""
            if weight_side:  # scale the (out, in) weight transiently instead of the (N, out) activations
                return _ScaledFrozenLinear.apply(inp, base.weight, g_row, g_col)
            # the base layer is called as a module, so ZeRO-3 gathers W
            y = base(inp * g_col if g_col is not None else inp, *args, **kwargs)
            if base.bias is not None:
                y = y - base.bias
            if g_row is None:
                return y
            if row_in_place and y.dtype == g_row.dtype:  # (under autocast y * g_row may be wider than y)
                return y.mul_(g_row)  # in place: one (N, out) tensor less
            return y * g_row

        h = frozen(x)  # (B, T, out)
        result_dtype = h.dtype
        x_lora = self._cast_input_dtype(x, lora_A.weight.dtype)
        if adapter not in self.lora_variant:  # LoRA: h' = h + s·B A drop(x)
            h_prime = h + lora_B(lora_A(dropout(x_lora))) * scaling
        else:  # DoRA: h' = h + (ns − 1) ⊙ W_SAN drop(x) + ns ⊙ s·B A drop(x)
            if isinstance(dropout, nn.Identity) or not training:
                x_drop, h_drop = x_lora, h
            else:
                x_drop = dropout(x_lora)
                h_drop = frozen(x_drop.to(x.dtype))
            ns = self._san_dora_scale(adapter, x_lora.dtype, g_row, g_col)  # (1, out)
            h_prime = h + ((ns - 1) * h_drop + ns * lora_B(lora_A(x_drop)) * scaling)
        if training and slot.wants_gamma():
            _emit_gamma(slot, h_prime, h)
        out = h_prime if base.bias is None else h_prime + base.bias
        return out.to(result_dtype)

    def _san_dora_scale(
        self, adapter: str, dtype: torch.dtype, g_row: Optional[torch.Tensor], g_col: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """``ns = m / ‖V‖_row`` with the norm detached (DoRA §4.3); ``V`` per ``SanConfig.dora_norm``."""
        dora = self.lora_magnitude_vector[adapter]  # peft DoraLinearLayer; .weight is the magnitude m, (out,)
        base = self.get_base_layer()
        with torch.no_grad(), _gathered(base.weight):
            # peft's own helpers (no adapter_name: no caching), so `propagation=off` is bit-equal to peft DoRA
            lora_weight = dora.get_lora_weight(lora_A=self.lora_A[adapter], lora_B=self.lora_B[adapter]).to(dtype)
            weight = base.weight.to(dtype)  # (out, in)
            if self._san.state.cfg.dora_norm == "scaled":
                if g_row is not None:
                    weight = weight * g_row.to(dtype)[:, None]
                if g_col is not None:
                    weight = weight * g_col.to(dtype)[None, :]
            weight_norm = dora.get_weight_norm(weight=weight, lora_weight=lora_weight, scaling=self.scaling[adapter])
        magnitude = dora.weight
        return (magnitude / weight_norm).view(1, -1)

    def __repr__(self) -> str:
        slot = getattr(self, "_san", None)
        src = "" if slot is None else f", san_row={slot.row_src and slot.row_src.name}, san_col={slot.col_src and slot.col_src.name}"
        return "san." + super().__repr__() + src


def _emit_gamma(slot: _SanSlot, h_prime: torch.Tensor, h: torch.Tensor) -> None:
    """Pool this layer's γ (§1) over the current forward's non-padding tokens and record it.

    γ keeps its graph only when a consumer keeps its gradient or the regulariser needs it; otherwise it is
    computed under ``no_grad`` (no activation is saved for it).
    """
    cfg = slot.state.cfg
    weights = slot.state.token_weights(slot, h)  # (B·T, 1) or None
    if torch.is_grad_enabled() and (slot.grad_consumer or cfg.reg_lambda > 0):
        raw = _raw_gamma(h_prime, h, weights, cfg)
    else:
        with torch.no_grad():
            raw = _raw_gamma(h_prime, h, weights, cfg)
    lo, hi = cfg.clamp
    slot.record(raw.clamp(lo, hi), raw)


def _gathered(*params: torch.Tensor) -> contextlib.AbstractContextManager:
    """Gather ZeRO-3 partitioned parameters for a read (no-op for ordinary tensors)."""
    # Only parameters that are partitioned right now. In a DeepSpeed forward ZeRO-3 gathers W itself: a
    # parameter read outside its owner's forward is registered as an "external parameter" of the running
    # (SAN) layer, and from the next step on that layer's pre-forward hook fetches it. Wrapping it in
    # GatheredParameters then re-partitions it on exit while the hook still holds it: "Cannot free a
    # ZeRO-3 parameter while it is still active" at the 2nd ZeRO-3 step of SAN-DoRA.
    zero = [p for p in params if hasattr(p, "ds_id") and p.ds_status.name == "NOT_AVAILABLE"]
    if not zero:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(zero, modifier_rank=None)


# ----------------------------------------------------------------------------------------------
# Attaching SAN: find the taking-part layers, resolve the pairs, re-class the peft modules
# ----------------------------------------------------------------------------------------------
def _san_sites(model: nn.Module, cfg: SanConfig) -> list[tuple[str, int, str, lora_layer.Linear]]:
    """Taking-part layers in forward order: (name, block, type, module)."""
    sites = []
    for name, module in base_transformers_model(model).named_modules():
        m = LANGUAGE_LAYER_RE.match(name)
        if not m or not isinstance(module, lora_layer.Linear) or m.group(3) not in cfg.modules:
            continue
        if type(module) not in (lora_layer.Linear, SanLoraLinear):
            raise NotImplementedError(f"SAN supports plain peft lora.Linear layers, {name} is {type(module).__name__}")
        sites.append((name, int(m.group(2)), m.group(3), module))
    sites.sort(key=lambda s: (s[1], LLAMA_MODULE_TYPES.index(s[2])))
    return sites


def resolve_pairs(sites: list[tuple[str, int, str, nn.Module]], cfg: SanConfig) -> list[tuple[str, str, str]]:
    """Source → target pairs ``(source, target, 'row'|'col')`` for ``cfg.propagation`` (§2)."""
    by_key = {(b, t): (n, m) for n, b, t, m in sites}

    def out_f(m: nn.Module) -> int:
        return m.get_base_layer().out_features

    def in_f(m: nn.Module) -> int:
        return m.get_base_layer().in_features

    pairs: list[tuple[str, str, str]] = []
    if cfg.propagation == "blockwise":
        for name, block, mtype, _ in sites:
            nxt = by_key.get((block + 1, mtype))
            if nxt is not None:
                pairs.append((name, nxt[0], "row"))
    elif cfg.propagation == "layerwise":
        for name, block, mtype, module in sites:
            src_key = None
            if mtype in LAYERWISE_IN_BLOCK:
                src_key = (block, LAYERWISE_IN_BLOCK[mtype])
            elif mtype in LAYERWISE_NEXT_BLOCK:
                src_key = (block - 1, LAYERWISE_NEXT_BLOCK[mtype])
            src = by_key.get(src_key) if src_key else None
            if src is not None and out_f(src[1]) == in_f(module):  # e.g. grouped-query v -> o is skipped
                pairs.append((src[0], name, "col"))
    elif cfg.propagation == "random":
        gen = torch.Generator().manual_seed(cfg.seed)
        for i, (name, _, _, module) in enumerate(sites):
            candidates = [s for s in sites[:i] if out_f(s[3]) == out_f(module)]
            if candidates:
                j = int(torch.randint(len(candidates), (1,), generator=gen))
                pairs.append((candidates[j][0], name, "row"))
    return pairs


def attach_san(model: PeftModel, san_config: SanConfig) -> PeftModel:
    """Attach SAN to the LoRA/DoRA layers of ``model`` (a PeftModel from :func:`apply_lora`), in place.

    The resolved pairing is written to ``san_config.pairs`` (a given ``pairs`` list is used as is, so a
    saved ``random`` pairing is restored exactly).
    """
    if getattr(model, "_san_state", None) is not None:
        raise ValueError("SAN is already attached to this model")
    cfg = san_config
    sites = _san_sites(model, cfg)
    if not sites:
        raise ValueError(f"no adapted language-tower layer of types {list(cfg.modules)} to attach SAN to")
    names = {s[0] for s in sites}
    if cfg.pairs is None:
        cfg.pairs = resolve_pairs(sites, cfg)
    else:
        missing = [n for s, t, _ in cfg.pairs for n in (s, t) if n not in names]
        if missing:
            raise ValueError(f"SanConfig.pairs names layers this model does not have, e.g. {missing[:3]}")

    state = _SanState(cfg)
    slots: dict[str, _SanSlot] = {}
    for name, block, mtype, module in sites:
        module.__class__ = SanLoraLinear
        weight = module.get_base_layer().weight
        if "san_gamma_ema" not in module._buffers:
            module.register_buffer("san_gamma_ema", torch.ones(module.get_base_layer().out_features,
                                                               dtype=torch.float32, device=weight.device))
        slot = _SanSlot(state, name, block, mtype, module)
        module._san = slot
        slots[name] = slot
    for src, tgt, kind in cfg.pairs:
        s, t = slots[src], slots[tgt]
        if kind == "row":
            t.row_src = s
        else:
            t.col_src = s
        s.has_consumer = True
        if not t.detach_from(s):
            s.grad_consumer = True
    state.slots = list(slots.values())

    backbone = base_transformers_model(model).get_submodule(language_tower_prefix(model))
    state.hook = backbone.register_forward_pre_hook(_make_backbone_hook(state), with_kwargs=True)
    model._san_state = state
    base_transformers_model(model)._san_state = state
    return model


def _make_backbone_hook(state: _SanState):
    """Pre-hook on the decoder backbone: counts top-level forwards and captures the padding mask."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) >= 2:  # LlamaModel.forward(input_ids, attention_mask, ...)
            mask = args[1]
        if mask is None or not module.training:
            state.new_forward(None)
            return
        if mask.dim() != 2:
            state.new_forward(None)
            raise ValueError(
                f"SAN pools γ over non-padding tokens and needs a 2-D attention mask (B, T); got {tuple(mask.shape)}"
            )
        state.new_forward(None if bool(mask.all()) else mask.bool())

    return hook


def get_san_model(model: nn.Module, lora_config: LoraConfig, san_config: Optional[SanConfig] = None) -> PeftModel:
    """Apply peft LoRA/DoRA to the language tower of ``model`` and, if ``san_config`` is given, SAN.

    Works on ``LlavaForConditionalGeneration`` and on LLaMA-family causal LMs. ``lora_config.target_modules``
    may be None (the seven projections), module types, or a regex (checked to stay in the language tower).
    With ``san_config=None`` the result is stock peft.
    """
    peft_model = apply_lora(model, lora_config)
    if san_config is not None:
        attach_san(peft_model, san_config)
    return peft_model


def get_san_state(model: nn.Module) -> Optional[_SanState]:
    """The SAN controller of a model (PeftModel or its transformers model), or None without SAN."""
    state = getattr(model, "_san_state", None)
    if state is None and isinstance(model, PeftModel):
        state = getattr(base_transformers_model(model), "_san_state", None)
    return state


def san_layers(model: nn.Module) -> list[SanLoraLinear]:
    """The SAN layers of ``model`` in forward order (empty without SAN)."""
    state = get_san_state(model)
    return [] if state is None else [s.module for s in state.slots]


# ----------------------------------------------------------------------------------------------
# Training-time helpers: regulariser, statistics, data-parallel sync
# ----------------------------------------------------------------------------------------------
def san_regularization(model: nn.Module) -> torch.Tensor:
    """``reg_lambda · mean over SAN layers of Σ_j (γ_lj − 1)²`` on the current forward's γ (eq. 13).

    Returns a zero tensor when ``reg_lambda == 0`` or no γ was computed in the current forward.
    """
    state = get_san_state(model)
    if state is None or state.cfg.reg_lambda == 0:
        return torch.zeros(())
    terms = [((s.batch_gamma - 1.0) ** 2).sum() for s in state.slots
             if s.batch_fid == state.forward_id and s.batch_gamma is not None]
    if not terms:
        return torch.zeros(())
    return state.cfg.reg_lambda * torch.stack(terms).mean()


def set_gamma_logging(model: nn.Module, enabled: bool) -> None:
    """Compute γ in every SAN layer (not only sources) so :func:`san_gamma_stats` covers all of them."""
    state = get_san_state(model)
    if state is not None:
        state.record_all = enabled or state.cfg.propagation == "off" or state.cfg.reg_lambda > 0


@torch.no_grad()
def san_gamma_stats(model: nn.Module) -> dict[str, float]:
    """γ statistics per module type: ``san/<type>/{mean,std,min,max,clamped,ema_mean}``.

    ``mean/std/min/max/clamped`` use the γ of the latest train-mode forward (layers that computed one);
    ``clamped`` is the share of entries the clamp changed; ``ema_mean`` is the mean of γ̄.
    """
    state = get_san_state(model)
    if state is None:
        return {}
    stats: dict[str, float] = {}
    for mtype in state.cfg.modules:
        slots = [s for s in state.slots if s.mtype == mtype]
        if not slots:
            continue
        emas = torch.cat([s.module.san_gamma_ema.float() for s in slots])
        stats[f"san/{mtype}/ema_mean"] = float(emas.mean())
        fresh = [s for s in slots if s.batch_gamma is not None and s.batch_fid == state.forward_id]
        if not fresh:
            continue
        g = torch.cat([s.batch_gamma.detach().float() for s in fresh])
        stats[f"san/{mtype}/mean"] = float(g.mean())
        stats[f"san/{mtype}/std"] = float(g.std(unbiased=False))
        stats[f"san/{mtype}/min"] = float(g.min())
        stats[f"san/{mtype}/max"] = float(g.max())
        stats[f"san/{mtype}/clamped"] = float(sum(s.n_clamped for s in fresh)) / g.numel()
    return stats


@torch.no_grad()
def sync_gamma_ema(model: nn.Module) -> None:
    """Average γ̄ across data-parallel ranks (call on every rank before saving)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for layer in san_layers(model):
        buf = layer.san_gamma_ema
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        buf.div_(dist.get_world_size())


# ----------------------------------------------------------------------------------------------
# Merging
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def merged_weight(layer: SanLoraLinear) -> torch.Tensor:
    """The merged frozen weight of one SAN layer (§4), fp32, ``(out, in)``."""
    slot = layer._san
    adapter = layer.active_adapters[0]
    w = layer.get_base_layer().weight.float()  # (out, in)
    ws = w
    if slot.row_src is not None:
        ws = slot.row_src.module.san_gamma_ema.float()[:, None] * ws
    if slot.col_src is not None:
        ws = ws * slot.col_src.module.san_gamma_ema.float()[None, :]
    delta = layer.scaling[adapter] * (layer.lora_B[adapter].weight.float() @ layer.lora_A[adapter].weight.float())
    if adapter not in layer.lora_variant:
        return ws + delta
    norm_of = ws if slot.state.cfg.dora_norm == "scaled" else w
    norm = torch.linalg.norm(norm_of + delta, dim=1)
    magnitude = layer.lora_magnitude_vector[adapter].weight.float()
    return (magnitude / norm)[:, None] * (ws + delta)


@torch.no_grad()
def merge_san(model: PeftModel) -> nn.Module:
    """Fold LoRA/DoRA and the SAN scaling γ̄ into the weights; returns the plain transformers model.

    The result has no peft or SAN module and computes the eval-mode output of ``model``. ``model`` is
    consumed (its modules are merged in place), as with peft's ``merge_and_unload``.
    """
    if not isinstance(model, PeftModel):
        raise TypeError(f"merge_san expects a peft.PeftModel, got {type(model).__name__}")
    state = get_san_state(model)
    merged: dict[str, torch.Tensor] = {}
    if state is not None:
        merged = {s.name: merged_weight(s.module) for s in state.slots}
        state.hook.remove()
    plain = model.merge_and_unload()
    for name, weight in merged.items():
        target = plain.get_submodule(name).weight
        target.copy_(weight.to(target.dtype))
    if hasattr(plain, "_san_state"):
        del plain._san_state
    return plain


def san_config_json(cfg: SanConfig) -> str:
    """The config as pretty JSON (saved beside the adapter)."""
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)


__all__ = [
    "SanConfig",
    "SanLoraLinear",
    "attach_san",
    "get_san_model",
    "get_san_state",
    "merge_san",
    "merged_weight",
    "pool_gamma",
    "resolve_pairs",
    "san_config_json",
    "san_gamma_stats",
    "san_layers",
    "san_regularization",
    "set_gamma_logging",
    "sync_gamma_ema",
]

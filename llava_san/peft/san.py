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

   The stored ``W`` is never modified: the scaling is applied either to the activations
   (``g_row ⊙ (W (g_col ⊙ x))``, which also works when ZeRO-3 partitions ``W``) or to a transient copy
   of the weight (:func:`scaled_weight`); :func:`plan_frozen_path` picks one. γ is detached across
   blocks (``detach_cross_block``) and keeps its gradient within a block.

3. State (§4): each layer keeps an fp32 buffer ``san_gamma_ema`` (γ̄, starts at 1), updated as
   ``γ̄ ← ema·γ̄ + (1−ema)·γ`` once per top-level forward in train mode. In ``eval()`` no γ is computed:
   targets read their sources' γ̄, so cached generation is consistent, and :func:`merge_san` folds
   γ̄ into the weights::

       LoRA  W_merged = diag(g_row) W diag(g_col) + s·B A
       DoRA  W_merged = diag(m / ‖W + s·B A‖_row) (diag(g_row) W diag(g_col) + s·B A)

This module holds the maths (γ, the SAN layer, the merged weight); the configuration is
:mod:`.san_config` and the model-level wiring (pairs, the backbone hook, γ bookkeeping, merging a
whole model) :mod:`.san_model`.

At initialisation (B = 0, m = ‖W‖) every γ is exactly 1 and SAN computes exactly what LoRA/DoRA does.

Cost: γ is computed only where a consumer (or the logger, or the regulariser) needs it, under ``no_grad``
unless its gradient is used; its two sums read ``h'`` and ``h`` once (CPU: row blocks folded into
cache-sized accumulators, :func:`_lsq_sums_blocked`; ``SanConfig.fused_gamma``: one compiled kernel).
The incoming scaling goes on the smaller side (:func:`plan_frozen_path`); DoRA's ``W x`` and
``W drop(x)`` share one transient scaled weight.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from itertools import repeat
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
import torch.nn.functional as F
from peft.tuners.lora import layer as lora_layer
from torch import nn

from ..distributed.zero3 import gathered, is_partitioned
from .san_config import SanConfig

if TYPE_CHECKING:
    from .san_model import _SanSlot

_MEAN_RATIO_CLIP = 10.0
_MEAN_H_FLOOR = 1e-3


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
    if cfg.pool == "lsq":
        if torch.is_grad_enabled() and (hp.requires_grad or hh.requires_grad):
            if hp.dtype != acc or hh.dtype != acc:
                hp, hh = hp.to(acc), hh.to(acc)
            hk = hh if weights is None else hh * weights  # padded rows -> 0: they add nothing to either sum
            num, den = torch.linalg.vecdot(hp, hk, dim=0), torch.linalg.vecdot(hk, hh, dim=0)
        elif cfg.fused_gamma:  # one compiled kernel: h' and h read once, fp32 accumulation
            num, den = _lsq_sums_compiled()(hp, hh, weights, acc)
        elif hh.device.type == "cpu":  # one pass over row blocks, no (N, out) temporary
            num, den = _lsq_sums_blocked(hp, hh, weights, acc)
        else:  # the same products and sums (= vecdot), the second product reusing the first's buffer
            if hp.dtype != acc or hh.dtype != acc:
                hp, hh = hp.to(acc), hh.to(acc)
            hk = hh if weights is None else hh * weights
            prod = hp * hk  # (N, out)
            num = prod.sum(0)
            den = torch.mul(hk, hh, out=prod).sum(0)
        # γ = 1 where Σh² < eps; the clamped divisor keeps the unused branch (and its gradient) finite
        return torch.where(den >= cfg.eps, num / den.clamp(min=cfg.eps), 1.0)
    # mean of the clipped ratio, exactly 1 where h' == h
    if hp.dtype != acc or hh.dtype != acc:
        hp, hh = hp.to(acc), hh.to(acc)
    h_safe = torch.where(hh >= 0, hh.clamp(min=_MEAN_H_FLOOR), hh.clamp(max=-_MEAN_H_FLOOR))
    ratio = (1.0 + (hp - hh) / h_safe).clamp(-_MEAN_RATIO_CLIP, _MEAN_RATIO_CLIP)
    if weights is None:
        return ratio.mean(0)
    w = weights.reshape(-1)  # (N,)
    return (w @ ratio) / w.sum().clamp(min=1.0)


#: CPU lsq sums: the two accumulators of :func:`_lsq_sums_blocked` take about this many bytes (they stay in
#: the core's L2 cache), but at least :data:`_LSQ_MIN_ROWS` rows each (fewer, longer ops for wide layers)
_LSQ_BLOCK_BYTES = 1 << 19
_LSQ_MIN_ROWS = 32
_scratch_local = threading.local()


def _scratch(key: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat ``numel`` buffer kept by this thread for ``key`` (grown when too small, never shrunk).

    For transient CPU work done in every layer: the buffer is allocated (and its pages faulted in) once,
    not at every call. A caller must be done with the buffer before the next call with the same key; the
    contents are garbage on return.
    """
    cache = getattr(_scratch_local, "buffers", None)
    if cache is None:
        cache = _scratch_local.buffers = {}
    k = (key, dtype, device)
    buf = cache.get(k)
    if buf is None or buf.numel() < numel:
        buf = cache[k] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def _lsq_sums_blocked(
    hp: torch.Tensor, hh: torch.Tensor, weights: Optional[torch.Tensor], acc: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Σ_n w_n h'_n ⊙ h_n`` and ``Σ_n w_n h_n ⊙ h_n`` (``(out,)`` each, in ``acc``) without an ``(N, out)``
    temporary (CPU, no autograd).

    The rows are folded into two ``(rows, out)`` accumulators, ``rows`` block by block (the first block
    written, the others added with ``addcmul_``, in ``acc``: bf16 inputs are widened element by element,
    products are exact), and the accumulators are
    summed over their rows at the end. The activations are read once from memory and the accumulators
    stay in cache, where the plain ``(h' ⊙ h).sum(0)`` writes and re-reads two activation-sized products
    (and faults in their fresh pages). Equal to it up to the order of the fp32 additions.

    Args:
        hp, hh: ``(N, out)`` adapted and frozen-path outputs (any float dtype no wider than ``acc``).
        weights: ``(N, 1)`` token weights in ``acc`` (the 0/1 padding mask), or None (all tokens).
    """
    n, out = hh.shape
    if n == 0:
        zero = hh.new_zeros(out, dtype=acc)
        return zero, zero.clone()
    rows = min(n, max(_LSQ_MIN_ROWS, _LSQ_BLOCK_BYTES // (2 * out * torch.finfo(acc).bits // 8)))
    # the first block writes the accumulators (0 + a·b == a·b exactly, so no zero fill is needed); the
    # others add into them. Only the last block can be shorter, so every accumulator row is written.
    accs = _scratch("lsq_acc", 2 * rows * out, acc, hh.device).view(2, rows, out)
    num_acc, den_acc = accs[0], accs[1]
    tmp = None if weights is None else _scratch("lsq_masked", rows * out, acc, hh.device).view(rows, out)
    blocks = zip(hp.split(rows), hh.split(rows), weights.split(rows) if weights is not None else repeat(None))
    for i, (a, b, w) in enumerate(blocks):  # (m, out), (m, out), (m, 1) or None; m = rows but in the last block
        m = a.shape[0]
        na, da = (num_acc, den_acc) if m == rows else (num_acc[:m], den_acc[:m])
        b_w = b if w is None else torch.mul(b, w, out=tmp if m == rows else tmp[:m])  # padded rows -> 0
        if i == 0:
            _mul_into(na, a, b_w)
            _mul_into(da, b_w, b)
        else:
            na.addcmul_(a, b_w)
            da.addcmul_(b_w, b)
    sums = accs.sum(1)  # (2, out)
    return sums[0], sums[1]


def _mul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out = a ⊙ b`` computed in ``out``'s dtype (as ``addcmul_`` into zeros would: bf16 factors are widened
    before the product, not rounded to bf16 after it)."""
    if a.dtype == out.dtype and b.dtype == out.dtype:
        torch.mul(a, b, out=out)
    else:
        out.copy_(a).mul_(b)


def _lsq_sums_eager(
    hp: torch.Tensor, hh: torch.Tensor, weights: Optional[torch.Tensor], acc: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Σ_n w_n h'_n ⊙ h_n`` and ``Σ_n w_n h_n ⊙ h_n`` written plainly (what :func:`_lsq_sums_compiled`
    compiles into one fused reduction)."""
    hh_acc = hh.to(acc)
    hk = hh_acc if weights is None else hh_acc * weights
    return (hp.to(acc) * hk).sum(0), (hk * hh_acc).sum(0)


_compiled_lsq_sums = None


def _lsq_sums_compiled():
    """:func:`_lsq_sums_eager` under ``torch.compile`` (dynamic shapes; compiled on first use, once per
    dtype and mask/no-mask), ``SanConfig.fused_gamma``."""
    global _compiled_lsq_sums
    if _compiled_lsq_sums is None:
        _compiled_lsq_sums = torch.compile(_lsq_sums_eager, dynamic=True, fullgraph=True)
    return _compiled_lsq_sums


def _count_clamped(raw: torch.Tensor, cfg: SanConfig) -> torch.Tensor:
    """How many entries of the unclamped γ the clamp changes (0-d tensor: no device sync)."""
    lo, hi = cfg.clamp
    raw = raw.detach()
    return ((raw < lo) | (raw > hi)).sum()


# ----------------------------------------------------------------------------------------------
# The frozen path: where the incoming scaling is applied
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FrozenPath:
    """How one forward computes the frozen path ``g_row ⊙ (W (g_col ⊙ x))`` (both ways are exact).

    Attributes:
        weight_side: scale a transient ``(out, in)`` copy of ``W`` inside :class:`_ScaledFrozenLinear`
            instead of the activations; otherwise the base layer is called as a module on ``g_col ⊙ x``
            and its output is scaled by ``g_row``.
        row_in_place: on the activation side, multiply the base layer's ``(N, out)`` output by
            ``g_row`` in place (one activation-sized tensor less).
    """

    weight_side: bool
    row_in_place: bool


def plan_frozen_path(
    *,
    has_row: bool,
    has_col: bool,
    row_requires_grad: bool,
    grad_enabled: bool,
    tokens: int,
    in_features: int,
    partitioned: bool,
    base_has_hooks: bool,
    extra_args: bool,
    weight_side_scaling: Union[bool, str],
) -> FrozenPath:
    """Choose the frozen path of one forward (pure: a function of these facts only).

    Args:
        has_row, has_col: the layer receives a row (``g_row``, ``(out,)``) / column (``g_col``, ``(in,)``)
            scaling in this forward.
        row_requires_grad: ``g_row`` keeps its gradient (its source is in the same block, or no detach).
        grad_enabled: autograd records this forward.
        tokens: rows of the activations, ``B·T``.
        in_features: the frozen weight's ``in``.
        partitioned: ZeRO-3 partitions ``W``.
        base_has_hooks: the base layer has forward hooks.
        extra_args: the layer was called with extra positional or keyword arguments.
        weight_side_scaling: ``SanConfig.weight_side_scaling``.
    """
    weight_side = (
        weight_side_scaling is not False
        and (has_row or has_col)
        # rescaling W touches out·in elements, rescaling activations tokens·out (+ tokens·in): take the
        # smaller (long sequences: the weight; short ones, e.g. 2 × 81 tokens at in = 768: activations)
        and (weight_side_scaling is True or tokens >= in_features)
        # under ZeRO-3 only a module call gathers W
        and not partitioned
        # the custom function gives no gradient for g_row
        and not row_requires_grad
        # extra arguments belong to the base layer's forward, which the weight side does not call
        and not extra_args
    )
    # In place is exact and safe when y is the base layer's own new tensor that nothing else holds:
    # nn.Linear does not save its output for backward; autograd would save it for g_row's gradient; a
    # hook on the base layer may hold it (ZeRO-3's hooks wrap it).
    row_in_place = (
        has_row
        and not partitioned
        and not base_has_hooks
        and not (row_requires_grad and grad_enabled)
    )
    return FrozenPath(weight_side=weight_side, row_in_place=row_in_place)


def scaled_weight(weight: torch.Tensor, g_row: Optional[torch.Tensor], g_col: Optional[torch.Tensor],
                  dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``diag(g_row) W diag(g_col)`` in ``dtype`` (default ``W``'s), a new tensor; ``W`` is never modified.

    Shapes: W ``(out, in)``, g_row ``(out,)``, g_col ``(in,)``; either scaling may be None (no scaling).
    The scalings are cast to ``dtype`` first.
    """
    dtype = dtype or weight.dtype
    w = weight.to(dtype)
    if g_row is not None:
        w = w * g_row.to(dtype)[:, None]
    if g_col is not None:
        w = w * g_col.to(dtype)[None, :]
    return w


class _ScaledFrozenLinear(torch.autograd.Function):
    """``y_i = x_i (diag(g_row) W diag(g_col))ᵀ`` for a frozen ``W`` and one or more inputs ``x_i``, without
    keeping the scaled weight.

    The scaled ``(out, in)`` weight is made transiently in forward and again in backward (once for all
    inputs: DoRA's ``x`` and ``drop(x)`` share it), so no ``(tokens, out)`` activation is rescaled and
    nothing beyond the inputs (only when ``g_col`` needs its gradient) is saved. ``g_row`` must not need a
    gradient (the caller falls back otherwise).
    Shapes: x_i ``(..., in)``, W ``(out, in)``, g_row ``(out,)``, g_col ``(in,)``; returns a tuple of ``(..., out)``.
    """

    @staticmethod
    def forward(ctx, weight, g_row, g_col, *xs):
        need_g_col = g_col is not None and ctx.needs_input_grad[2]
        ctx.save_for_backward(weight, g_row, g_col, *(xs if need_g_col else ()))
        ctx.dtype = xs[0].dtype
        ctx.set_materialize_grads(False)
        w = scaled_weight(weight, g_row, g_col, ctx.dtype)
        return tuple(F.linear(x, w) for x in xs)

    @staticmethod
    def backward(ctx, *grad_ys):
        weight, g_row, g_col, *xs = ctx.saved_tensors
        need_x = ctx.needs_input_grad[3:]
        grad_xs: list[Optional[torch.Tensor]] = [None] * len(need_x)
        grad_g_col = None
        # the scaled weight as forward made it, in grad_y's dtype (they differ only under autocast, where
        # forward's F.linear ran in bf16/fp16 on the weight scaled in x's dtype)
        if ctx.needs_input_grad[2]:
            w = scaled_weight(weight, g_row, None, ctx.dtype)
            for i, grad_y in enumerate(grad_ys):
                if grad_y is None:
                    continue
                u = grad_y @ w.to(grad_y.dtype)  # grad w.r.t. (g_col ⊙ x_i)
                grad_xs[i] = u * g_col if need_x[i] else None
                part = (u * xs[i]).reshape(-1, u.shape[-1]).sum(0)
                grad_g_col = part if grad_g_col is None else grad_g_col + part
        elif any(need_x):
            w = scaled_weight(weight, g_row, g_col, ctx.dtype)
            for i, grad_y in enumerate(grad_ys):
                if grad_y is not None and need_x[i]:
                    grad_xs[i] = grad_y @ w.to(grad_y.dtype)
        return (None, None, grad_g_col, *grad_xs)


# ----------------------------------------------------------------------------------------------
# The layer: a peft lora.Linear whose frozen path receives SAN scaling and which emits γ
# ----------------------------------------------------------------------------------------------
class SanLoraLinear(lora_layer.Linear):
    """peft ``lora.Linear`` (LoRA or DoRA) with SAN. Created by :func:`attach_san` by re-classing the
    stock peft module in place, so every peft tensor keeps its name, dtype and device."""

    _san: Optional[_SanSlot]
    san_gamma_ema: torch.Tensor

    def _apply(self, fn: Any, recurse: bool = True) -> "SanLoraLinear":
        # γ̄ is an fp32 buffer (§4) whatever the module is cast to (model.to(torch.bfloat16), Lightning's
        # bf16-true): in bf16 the EMA's updates 0.01·(γ − γ̄) round away and γ̄ stays at 1. A device move
        # applies; the fp32 values are kept, not rounded through the cast.
        ema = self._buffers.get("san_gamma_ema")
        super()._apply(fn, recurse)
        new = self._buffers.get("san_gamma_ema")
        if new is not None and new.dtype != torch.float32:
            keep = ema if ema is not None and ema.dtype == torch.float32 and not ema.is_meta else new
            self._buffers["san_gamma_ema"] = keep.to(device=new.device, dtype=torch.float32)
        return self

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

        plan = plan_frozen_path(
            has_row=g_row is not None,
            has_col=g_col is not None,
            row_requires_grad=g_row is not None and g_row.requires_grad,
            grad_enabled=torch.is_grad_enabled(),
            tokens=x.numel() // x.shape[-1],
            in_features=base.in_features,
            partitioned=is_partitioned(base.weight),
            base_has_hooks=bool(base._forward_hooks),
            extra_args=bool(args or kwargs),
            weight_side_scaling=slot.state.cfg.weight_side_scaling,
        )

        dora = adapter in self.lora_variant
        two_inputs = dora and training and not isinstance(dropout, nn.Identity)  # DoRA needs W x and W drop(x)
        if two_inputs and plan.weight_side:  # one transient scaled weight serves both
            x_lora = self._cast_input_dtype(x, lora_A.weight.dtype)
            x_drop = dropout(x_lora)
            h, h_drop = self._san_frozen((x, x_drop.to(x.dtype)), g_row, g_col, plan, args, kwargs)
        else:  # peft's order of operations (propagation=off trains bit-equal to peft)
            (h,) = self._san_frozen((x,), g_row, g_col, plan, args, kwargs)  # (B, T, out)
            x_lora = self._cast_input_dtype(x, lora_A.weight.dtype)
            if two_inputs:
                x_drop = dropout(x_lora)
                (h_drop,) = self._san_frozen((x_drop.to(x.dtype),), g_row, g_col, plan, args, kwargs)
            else:
                x_drop, h_drop = x_lora, h
        result_dtype = h.dtype
        if not dora:  # LoRA: h' = h + s·B A drop(x)
            h_prime = h + lora_B(lora_A(dropout(x_lora))) * scaling
        else:  # DoRA: h' = h + (ns − 1) ⊙ W_SAN drop(x) + ns ⊙ s·B A drop(x)
            ns = self._san_dora_scale(adapter, x_lora.dtype, g_row, g_col)  # (1, out)
            h_prime = h + ((ns - 1) * h_drop + ns * lora_B(lora_A(x_drop)) * scaling)
        if training and slot.wants_gamma():
            _emit_gamma(slot, h_prime, h)
        out = h_prime if base.bias is None else h_prime + base.bias
        return out.to(result_dtype)

    def _san_frozen(self, xs: tuple[torch.Tensor, ...], g_row: Optional[torch.Tensor],
                    g_col: Optional[torch.Tensor], plan: FrozenPath, args: tuple,
                    kwargs: dict) -> tuple[torch.Tensor, ...]:
        """The frozen path ``g_row ⊙ (W (g_col ⊙ x))`` without bias of each ``x`` of ``xs``, ``(..., out)``,
        as ``plan`` says."""
        base = self.get_base_layer()
        if plan.weight_side:  # scale the (out, in) weight transiently instead of the (N, out) activations
            return _ScaledFrozenLinear.apply(base.weight, g_row, g_col, *xs)
        return tuple(self._san_frozen_module(x, g_row, g_col, plan, args, kwargs) for x in xs)

    def _san_frozen_module(self, x: torch.Tensor, g_row: Optional[torch.Tensor], g_col: Optional[torch.Tensor],
                           plan: FrozenPath, args: tuple, kwargs: dict) -> torch.Tensor:
        """The activation side of :meth:`_san_frozen`: the base layer is called as a module, so ZeRO-3
        gathers W."""
        base = self.get_base_layer()
        y = base(x * g_col if g_col is not None else x, *args, **kwargs)
        if base.bias is not None:
            y = y - base.bias
        if g_row is None:
            return y
        if plan.row_in_place and y.dtype == g_row.dtype:  # (under autocast y * g_row may be wider than y)
            return y.mul_(g_row)  # in place: one (N, out) tensor less
        return y * g_row

    def _san_dora_scale(
        self, adapter: str, dtype: torch.dtype, g_row: Optional[torch.Tensor], g_col: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """``ns = m / ‖V‖_row`` with the norm detached (DoRA §4.3); ``V`` per ``SanConfig.dora_norm``."""
        dora = self.lora_magnitude_vector[adapter]  # peft DoraLinearLayer; .weight is the magnitude m, (out,)
        base = self.get_base_layer()
        # W is read outside the base layer's forward: under ZeRO-3 gather it unless a running forward
        # already holds it (see llava_san.distributed.zero3)
        with torch.no_grad(), gathered([base.weight], only_unavailable=True):
            # peft's own helpers (no adapter_name: no caching), so `propagation=off` is bit-equal to peft DoRA
            lora_weight = dora.get_lora_weight(lora_A=self.lora_A[adapter], lora_B=self.lora_B[adapter]).to(dtype)
            if self._san.state.cfg.dora_norm == "scaled":
                weight = scaled_weight(base.weight, g_row, g_col, dtype)  # (out, in)
            else:
                weight = base.weight.to(dtype)  # (out, in)
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


# ----------------------------------------------------------------------------------------------
# Merging one layer
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def merged_weight(layer: SanLoraLinear) -> torch.Tensor:
    """The merged frozen weight of one SAN layer (§4), fp32, ``(out, in)``."""
    slot = layer._san
    adapter = layer.active_adapters[0]
    w = layer.get_base_layer().weight.float()  # (out, in)
    g_row = None if slot.row_src is None else slot.row_src.module.san_gamma_ema  # (out,)
    g_col = None if slot.col_src is None else slot.col_src.module.san_gamma_ema  # (in,)
    ws = scaled_weight(w, g_row, g_col, torch.float32)
    delta = layer.scaling[adapter] * (layer.lora_B[adapter].weight.float() @ layer.lora_A[adapter].weight.float())
    if adapter not in layer.lora_variant:
        return ws + delta
    norm_of = ws if slot.state.cfg.dora_norm == "scaled" else w
    norm = torch.linalg.norm(norm_of + delta, dim=1)
    magnitude = layer.lora_magnitude_vector[adapter].weight.float()
    return (magnitude / norm)[:, None] * (ws + delta)



__all__ = [
    "FrozenPath",
    "SanConfig",
    "SanLoraLinear",
    "merged_weight",
    "plan_frozen_path",
    "pool_gamma",
    "scaled_weight",
]

r"""SSF and SAN-SSF for vision transformers (SSF: Lian et al., NeurIPS 2022; SAN: Dai et al., ICML 2025).

**SSF** (scale and shift) puts a trainable per-channel affine after a frozen module with output
``h ∈ R[..., C]``::

    h' = γ ⊙ h + β                      γ, β ∈ R[C], broadcast over the channel axis (last; dim 1 for a conv)

**SAN-SSF** also hands each *source* site's scale γ_s to the input columns of a frozen *target* linear
``t`` (``out_s = in_t``), the paper's eq. 10 in torch layout::

    y_t = γ_t ⊙ ((γ_s ⊙ x) @ W_tᵀ + b_t) + β_t      i.e. W'_t = diag(γ_t) · W_t · diag(γ_s)

γ_s is the very Parameter of the source site (shared, not copied, not detached): it acts on the source's
output and on the target's input, its gradient is the sum of both uses, and with nothing non-linear in
between it acts squared. The column scaling multiplies the *activation* (``x * γ_s``); the frozen weight
is never written to until :func:`merge_ssf`.

Mechanics: a site is two parameters registered on the frozen module itself (``<module>.ssf_scale`` and,
unless scale-only, ``<module>.ssf_shift``) plus a forward hook (:class:`SsfSiteHook`); a propagation
edge is a forward pre-hook on the target (:class:`SanColumnHook`) that reads its source module's
``ssf_scale`` at call time. So the frozen parameters keep their names (pretrained weights still load),
every new tensor's name ends in ``ssf_*`` and SAN adds no parameter. :func:`merge_ssf` folds everything
into the weights and removes hooks and parameters: a plain timm / CLIP model comes out.

Where the sites and edges go on a timm ViT and on a CLIP tower (LLaVA's included): :mod:`.ssf_sites`.
Limitation: a target reads its source's γ outside the source's forward, so ZeRO-3 style partitioning
of the vision tower is not supported (the vision recipes train on one device).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ssf_sites import SUPPORTED, SsfPlan, plan_for

PREFIXES = ("ssf_", "san_")
_CHOICES = {
    "method": ("ssf", "san_ssf"),
    "mode": ("paper", "prototype"),
    "qkv_to_proj": ("skip", "v_slice", "interp"),
    "init": ("exact", "ssf_paper"),
}
_PARTS = ("full", "v_slice", "interp")


@dataclass
class SsfConfig:
    """Settings of SSF / SAN-SSF (the choices the paper leaves open are switches here, with the defaults the
    README's "SAN on vision transformers" describes).

    Attributes:
        method: ``ssf`` (plain SSF, no propagation) or ``san_ssf``.
        mode: san_ssf only. ``paper``: all SSF sites (scale + shift) plus propagation; ``prototype``: the
            official code, scale-only sites after patch_embed, qkv, proj, fc1, fc2 plus every LayerNorm
            affine trainable.
        qkv_to_proj: the qkv (3d) → proj (d) edge: ``skip``, ``v_slice`` (γ_qkv[2d:3d]) or ``interp``
            (linear interpolation 3d → d, align-corners). CLIP: v_proj → out_proj, off for ``skip``, γ_v
            otherwise.
        chain_blocks: fc2 of block i → qkv of block i+1 (block 0 keeps patch_embed) instead of
            patch_embed → every block's qkv.
        init: ``exact`` (γ = 1, β = 0: the adapted model equals the frozen one) or ``ssf_paper``
            (γ ~ N(1, 0.02), β ~ N(0, 0.02)).
        reg_lambda: eq. 13, ``λ Σ ‖γ_s − 1‖²`` over the propagating scales (:func:`ssf_regulariser`).
        clip_layers: CLIP only, adapt layers ``0..clip_layers-1``; ``None``: all but the last (LLaVA's
            ``vision_feature_layer=-2`` never uses it). Ignored on timm (every block).
    """

    method: str = "san_ssf"
    mode: str = "paper"
    qkv_to_proj: str = "skip"
    chain_blocks: bool = False
    init: str = "exact"
    reg_lambda: float = 0.0
    clip_layers: Optional[int] = None

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"SsfConfig.{name}={value!r}: must be one of "
                                 f"{', '.join(map(repr, allowed))}")
        if not isinstance(self.chain_blocks, bool):
            raise ValueError(f"SsfConfig.chain_blocks={self.chain_blocks!r}: must be True or False")
        lam = self.reg_lambda
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
            raise ValueError(f"SsfConfig.reg_lambda={lam!r}: must be a finite number >= 0 "
                             "(0 disables eq. 13)")
        self.reg_lambda = float(lam)
        c = self.clip_layers
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise ValueError(f"SsfConfig.clip_layers={c!r}: must be None (all layers but the last) "
                             "or an int >= 1")
        if self.method == "ssf":  # the SAN-only switches would be silently meaningless: refuse them
            bad = [f"{n}={getattr(self, n)!r}" for n, default in
                   (("mode", "paper"), ("qkv_to_proj", "skip"), ("chain_blocks", False), ("reg_lambda", 0.0))
                   if getattr(self, n) != default]
            if bad:
                raise ValueError(f"SsfConfig: {', '.join(bad)} only apply to method='san_ssf' (plain SSF "
                                 "has no propagation and no prototype mode); use method='san_ssf' or the "
                                 "defaults mode='paper', qkv_to_proj='skip', chain_blocks=False, "
                                 "reg_lambda=0.0")


# --------------------------------------------------------------------------------------------- maths

def _channel_view(h: Tensor, channel_dim: int) -> tuple[int, ...]:
    """Shape that broadcasts a [C] vector along ``channel_dim`` of ``h`` ([C] for the last axis,
    [C, 1, 1] for dim 1 of [B, C, H, W])."""
    return (-1,) + (1,) * (h.dim() - 1 - channel_dim % h.dim())


def ssf_affine(h: Tensor, gamma: Tensor, beta: Optional[Tensor] = None, channel_dim: int = -1) -> Tensor:
    """``γ ⊙ h + β`` along ``channel_dim`` (``β`` None: scale only). γ, β are cast to ``h``'s dtype."""
    shape = _channel_view(h, channel_dim)
    out = h * gamma.to(h.dtype).view(shape)
    return out if beta is None else out + beta.to(h.dtype).view(shape)


def column_scale(gamma: Tensor, part: str, in_features: int) -> Tensor:
    """The vector a target's input columns are scaled by, from its source scale ``gamma``.

    ``full``: γ itself (the same object); ``v_slice``: γ[2n:3n] of a fused [q | k | v] scale (n =
    ``in_features``); ``interp``: γ resampled to n by 1-D linear interpolation with aligned corners."""
    n = in_features
    if part == "full":
        return gamma
    if part == "v_slice":
        return gamma[2 * n:3 * n]
    if part == "interp":
        return F.interpolate(gamma.view(1, 1, -1), size=n, mode="linear", align_corners=True).view(n)
    raise ValueError(f"part={part!r}: must be one of {_PARTS}")


class SsfSiteHook:
    """Forward hook of an SSF site: the module's output ``h`` becomes ``γ ⊙ h + β`` with the module's own
    ``ssf_scale`` (and ``ssf_shift`` if it has one).

    ``detach_scale`` (diagnostics and tests only) feeds a detached copy of γ to this use, cutting the
    gradient path through the site's output while the column use (if any) keeps its own."""

    def __init__(self, kind: str, channel_dim: int = -1) -> None:
        self.kind, self.channel_dim, self.detach_scale = kind, channel_dim, False

    def __call__(self, module: nn.Module, args: Any, output: Tensor) -> Tensor:
        gamma = module.ssf_scale
        if self.detach_scale:
            gamma = gamma.detach()
        return ssf_affine(output, gamma, module._parameters.get("ssf_shift"), self.channel_dim)


class SanColumnHook:
    """Forward pre-hook of a SAN target: its input ``x`` [..., in] becomes ``x ⊙ c`` with
    ``c = column_scale(source.ssf_scale, part, in)``; the source's γ is read at call time (shared).

    ``detach_scale`` (diagnostics and tests only) feeds a detached copy of γ_s to this use."""

    def __init__(self, source: nn.Module, part: str, in_features: int) -> None:
        self.source, self.part, self.in_features, self.detach_scale = source, part, in_features, False

    def scale(self) -> Tensor:
        """The current column vector (for ``part='full'`` the source's Parameter itself)."""
        return column_scale(self.source.ssf_scale, self.part, self.in_features)

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x, c = args[0], self.scale()
        if self.detach_scale:
            c = c.detach()
        return (x * c.to(x.dtype),) + tuple(args[1:])


def _hooks(module: nn.Module, kind: type) -> list:
    hooks = module._forward_hooks if kind is SsfSiteHook else module._forward_pre_hooks
    return [h for h in hooks.values() if isinstance(h, kind)]


def _out_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return module.normalized_shape[0]
    raise ValueError(f"an SSF site needs a Linear, Conv2d or 1-D LayerNorm (so that it can be merged), "
                     f"got {type(module).__name__}")


def add_ssf_site(module: nn.Module, kind: str = "site", shift: bool = True, channel_dim: int = -1,
                 init: str = "exact") -> None:
    """Attach an SSF site to ``module`` (Linear, Conv2d with ``channel_dim=1``, or LayerNorm), in place:
    registers ``ssf_scale`` [C] (and ``ssf_shift`` [C] when ``shift``) in the module's weight dtype and
    device, and a :class:`SsfSiteHook`. ``kind`` names the site type for :func:`ssf_statistics`."""
    if _hooks(module, SsfSiteHook):
        raise ValueError(f"{type(module).__name__} already has an SSF site")
    if init not in _CHOICES["init"]:
        raise ValueError(f"init={init!r}: must be one of {_CHOICES['init']}")
    c = _out_channels(module)
    ref = next(module.parameters(), None)
    kw = dict(dtype=ref.dtype if ref is not None else torch.get_default_dtype(),
              device=ref.device if ref is not None else None)
    gamma, beta = torch.ones(c, **kw), torch.zeros(c, **kw)
    if init == "ssf_paper":  # SSF's own init: not an identity at step 0
        with torch.no_grad():
            gamma.normal_(1.0, 0.02)
            beta.normal_(0.0, 0.02)
    module.register_parameter("ssf_scale", nn.Parameter(gamma))
    if shift:
        module.register_parameter("ssf_shift", nn.Parameter(beta))
    module.register_forward_hook(SsfSiteHook(kind, channel_dim))


def add_san_column(target: nn.Module, source: nn.Module, part: str = "full") -> None:
    """SAN propagation: scale the input columns of the frozen linear ``target`` by the SSF scale of
    ``source`` (which must already carry a site), in place, through a :class:`SanColumnHook`."""
    if not isinstance(target, nn.Linear):
        raise ValueError(f"a SAN target must be an nn.Linear, got {type(target).__name__}")
    if _hooks(target, SanColumnHook):
        raise ValueError("the target already receives a SAN column scale (one source per target)")
    if "ssf_scale" not in source._parameters:
        raise ValueError(f"the SAN source {type(source).__name__} has no SSF site (ssf_scale)")
    n, m = target.in_features, source.ssf_scale.numel()
    expected = {"full": n, "v_slice": 3 * n}.get(part, m)
    if part not in _PARTS or m != expected:
        raise ValueError(f"SAN edge part={part!r} from a {m}-channel source to a {n}-input target: "
                         f"'full' needs {n} channels, 'v_slice' {3 * n}, 'interp' any")
    target.register_forward_pre_hook(SanColumnHook(source, part, n))


# ------------------------------------------------------------------------------------- introspection

def ssf_sites(model: nn.Module) -> list[tuple[str, nn.Module, SsfSiteHook]]:
    """``(name, module, hook)`` of every SSF site in ``model``, in module order."""
    return [(n, m, h) for n, m in model.named_modules() for h in _hooks(m, SsfSiteHook)]


def san_columns(model: nn.Module) -> list[tuple[str, nn.Module, SanColumnHook]]:
    """``(target name, target module, hook)`` of every SAN propagation edge in ``model``; the source is
    ``hook.source`` and its shared scale ``hook.source.ssf_scale``."""
    return [(n, m, h) for n, m in model.named_modules() for h in _hooks(m, SanColumnHook)]


def _backbones(model: nn.Module) -> list[tuple[str, nn.Module, SsfPlan]]:
    return [(n, m, m.__dict__["_ssf_plan"]) for n, m in model.named_modules() if "_ssf_plan" in m.__dict__]


_SITE_PARAMS = ("ssf_scale", "ssf_shift")


def _ssf_tensors(model: nn.Module) -> dict[str, nn.Parameter]:
    """The method's tensors by ``model`` parameter name: the ``ssf_scale``/``ssf_shift`` of every site
    plus, in prototype mode, the affines of the LayerNorms the plan trains. Never a head, and nothing of
    another method (a language model's SAN-LoRA tensors are ``san_*`` too, but carry no SSF site)."""
    ids = set()
    for _, m, _ in ssf_sites(model):
        ids.update(id(p) for k, p in m._parameters.items() if k in _SITE_PARAMS and p is not None)
    for _, bb, plan in _backbones(model):
        for n in plan.trainable_norms:
            ids.update(id(p) for p in bb.get_submodule(n).parameters(recurse=False))
    return {n: p for n, p in model.named_parameters() if id(p) in ids}


# ------------------------------------------------------------------------------------------- public API

def apply_ssf(model: nn.Module, config: SsfConfig) -> nn.Module:
    """Add SSF / SAN-SSF to ``model`` in place and return it.

    ``model``: a timm ``VisionTransformer`` or anything holding one CLIP vision tower (a standalone
    ``CLIPVisionModel``, ``LlavaForConditionalGeneration``: its vision tower only, the language model
    and projector are left alone). Every original parameter of the backbone is frozen, except the
    LayerNorm affines in prototype mode and the timm classifier (``head``), which is left as it was (the
    caller decides about heads). Raises ``ValueError`` for another model or a model already adapted."""
    if not isinstance(config, SsfConfig):
        raise TypeError(f"apply_ssf needs an SsfConfig, got {type(config).__name__}")
    if _backbones(model) or ssf_sites(model):
        raise ValueError("apply_ssf: the model already carries SSF sites; apply it once per model "
                         "(merge_ssf removes them)")
    backbone, plan = plan_for(model, config)
    plan.config = config
    for name, p in backbone.named_parameters():
        if not name.startswith(plan.keep_trainable):
            p.requires_grad_(False)
    for s in plan.sites:
        add_ssf_site(backbone.get_submodule(s.module), s.kind, shift=s.shift, channel_dim=s.channel_dim,
                     init=config.init)
    for e in plan.edges:
        add_san_column(backbone.get_submodule(e.target), backbone.get_submodule(e.source), e.part)
    for n in plan.trainable_norms:
        backbone.get_submodule(n).requires_grad_(True)
    backbone._ssf_plan = plan  # a plain attribute (not a module or parameter): found by _backbones
    return model


def _new_param(module: nn.Module, name: str, value: Tensor, like: Tensor) -> None:
    warnings.warn(f"merge_ssf: {type(module).__name__} has no {name}; one is created to hold the folded SSF "
                  "values, so the merged state dict has a key a fresh model lacks", stacklevel=3)
    module.register_parameter(name, nn.Parameter(value.to(like.dtype), requires_grad=like.requires_grad))


def _fold(module: nn.Module, gamma: Optional[Tensor], beta: Optional[Tensor], cols: Optional[Tensor],
          shift_into: Optional[nn.Module]) -> None:
    """Fold a site (γ, β; fp32) and a column scale into ``module``'s frozen tensors, in place (no_grad)."""
    w = module.weight
    if isinstance(module, nn.LayerNorm) and w is None:  # elementwise_affine=False: γ becomes the weight
        _new_param(module, "weight", torch.ones_like(gamma), gamma)
        w = module.weight
    w32 = w.float()
    if cols is not None:                 # Linear: W diag(c), columns = input features
        w32 = w32 * cols[None, :]
    if gamma is not None:                # W rows (output channels) by γ: [C] -> [C, 1, ...]
        w32 = gamma.view((-1,) + (1,) * (w32.dim() - 1)) * w32
    w.copy_(w32.to(w.dtype))
    if gamma is None:
        return
    b = module.bias
    if b is not None:
        b.copy_((gamma * b.float() + (beta if beta is not None else 0.0)).to(b.dtype))
    elif beta is not None and shift_into is not None:
        # CLIP: embeddings = cat(cls, patches) + pos; a shift on the patches = a shift of pos rows 1..N
        pos = shift_into.weight
        pos[1:] += beta.to(pos.dtype)
    elif beta is not None and bool(beta.ne(0).any()):
        _new_param(module, "bias", beta.clone(), w)


def merge_ssf(model: nn.Module) -> nn.Module:
    """Fold every SSF site and SAN column scale into the frozen weights, then remove the hooks and the
    ``ssf_*`` parameters: ``model`` (returned, changed in place) is a plain timm / CLIP model of the same
    class, with the state-dict keys of a fresh one, computing the same outputs.

    Linear/conv: ``W' = diag(γ_t) W diag(c)``, ``b' = γ_t ⊙ b + β_t``; LayerNorm: ``w' = γ ⊙ w``,
    ``b' = γ ⊙ b + β``. A source's γ goes both into its own module and into every target it feeds. The
    CLIP patch site's shift goes to ``position_embedding.weight[1:]`` (its conv has no bias)."""
    sites, cols = ssf_sites(model), san_columns(model)
    if not sites and not cols:
        raise ValueError("merge_ssf: the model has no SSF sites (apply_ssf was not called, or it is merged)")
    shift_into = {}
    for _, bb, plan in _backbones(model):
        for src, dst in plan.shift_into.items():
            shift_into[id(bb.get_submodule(src))] = bb.get_submodule(dst)
    with torch.no_grad():
        # read every vector before changing anything (fp32 copies): targets read their sources' γ
        site_of = {id(m): (m.ssf_scale.float().clone(),
                           None if m._parameters.get("ssf_shift") is None else m.ssf_shift.float().clone())
                   for _, m, _ in sites}
        col_of = {id(m): h.scale().detach().float().clone() for _, m, h in cols}
        modules = {id(m): m for _, m, _ in sites + cols}
        for key, m in modules.items():
            gamma, beta = site_of.get(key, (None, None))
            _fold(m, gamma, beta, col_of.get(key), shift_into.get(key))
    for m in modules.values():
        for hooks, kind in ((m._forward_hooks, SsfSiteHook), (m._forward_pre_hooks, SanColumnHook)):
            for hid in [k for k, h in hooks.items() if isinstance(h, kind)]:
                del hooks[hid]
                m._forward_hooks_with_kwargs.pop(hid, None)
                m._forward_hooks_always_called.pop(hid, None)
                m._forward_pre_hooks_with_kwargs.pop(hid, None)
    for m in modules.values():
        for p in _SITE_PARAMS:
            if p in m._parameters:
                delattr(m, p)
    for _, bb, _ in _backbones(model):
        del bb.__dict__["_ssf_plan"]
    return model


def ssf_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Every SSF/SAN tensor (and, in prototype mode, the trained LayerNorm affines) of ``model`` by its
    parameter name, as detached CPU clones. The head is not included."""
    return {n: p.detach().to("cpu").clone() for n, p in _ssf_tensors(model).items()}


def load_ssf_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy ``state`` (from :func:`ssf_state_dict`) into ``model``, which went through :func:`apply_ssf`
    with the same config. Strict: a missing or unexpected key or a shape mismatch raises ``ValueError``
    naming them, before anything is copied."""
    own = _ssf_tensors(model)
    if not own:
        raise ValueError("load_ssf_state_dict: the model has no SSF tensors; call apply_ssf with the config "
                         "the state was saved from first")
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k}: saved {tuple(getattr(state[k], 'shape', ()))}, model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state))
              if not isinstance(state[k], Tensor) or tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def show(xs: list[str]) -> str:
            return f"{len(xs)} {xs[:5]}{' ...' if len(xs) > 5 else ''}"
        raise ValueError(f"load_ssf_state_dict: the state does not fit this model (was it adapted with the "
                         f"same SsfConfig?): missing {show(missing)}, unexpected {show(unexpected)}, "
                         f"shape mismatches {show(shapes)}")
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(state[k])


def _propagating(model: nn.Module) -> Iterator[Tensor]:
    """The part of each source scale that propagates (whole γ; only its v third if that is all it feeds)."""
    sources: dict[int, tuple[nn.Parameter, Optional[slice]]] = {}
    for _, _, h in san_columns(model):
        gamma = h.source.ssf_scale
        part = slice(2 * h.in_features, 3 * h.in_features) if h.part == "v_slice" else None
        prev = sources.get(id(gamma))
        if prev is not None and prev[1] != part:
            part = None  # used whole somewhere: penalise it whole
        sources[id(gamma)] = (gamma, part)
    for gamma, part in sources.values():
        yield gamma if part is None else gamma[part]


def ssf_regulariser(model: nn.Module, reg_lambda: Optional[float] = None) -> Tensor:
    """Eq. 13: ``λ Σ_s ‖γ_s − 1‖²`` over the propagating scales (γ_s shared by a source and its targets;
    for a ``v_slice``-only source its v third). A 0-dim fp32 tensor; exactly 0.0 without a graph when
    λ = 0. ``λ`` is the config's ``reg_lambda`` unless given here."""
    if reg_lambda is None:
        lams = {plan.config.reg_lambda for _, _, plan in _backbones(model)}
        if len(lams) != 1:
            raise ValueError("ssf_regulariser: pass reg_lambda (the model was not adapted by apply_ssf, or "
                             "carries several SSF backbones with different reg_lambda)")
        reg_lambda = lams.pop()
    own = _ssf_tensors(model)
    device = next(iter(own.values())).device if own else None
    if reg_lambda == 0:
        return torch.zeros((), device=device)
    total = torch.zeros((), device=device)
    for g in _propagating(model):
        total = total + (g.float() - 1.0).pow(2).sum()
    return float(reg_lambda) * total


def ssf_statistics(model: nn.Module) -> dict[str, float]:
    """For the loggers, per site type (``patch_embed``, ``qkv``, ``proj``, ``fc1``, ``norm1`` ...):
    ``ssf/gamma_{mean,std,min,max}/<type>`` over all γ of that type and, where sites shift,
    ``ssf/beta_absmean/<type>``."""
    gammas: dict[str, list[Tensor]] = {}
    betas: dict[str, list[Tensor]] = {}
    with torch.no_grad():
        for _, m, h in ssf_sites(model):
            gammas.setdefault(h.kind, []).append(m.ssf_scale.detach().float().flatten())
            if m._parameters.get("ssf_shift") is not None:
                betas.setdefault(h.kind, []).append(m.ssf_shift.detach().float().flatten())
        out = {}
        for kind, gs in gammas.items():
            g = torch.cat(gs)
            out[f"ssf/gamma_mean/{kind}"] = g.mean().item()
            out[f"ssf/gamma_std/{kind}"] = g.std(correction=0).item()
            out[f"ssf/gamma_min/{kind}"] = g.min().item()
            out[f"ssf/gamma_max/{kind}"] = g.max().item()
        for kind, bs in betas.items():
            out[f"ssf/beta_absmean/{kind}"] = torch.cat(bs).abs().mean().item()
    return out


def count_ssf_parameters(model: nn.Module) -> int:
    """Number of values the method trains: SSF/SAN tensors (+ LayerNorm affines in prototype mode), no
    head."""
    return sum(p.numel() for p in _ssf_tensors(model).values())


__all__ = ["PREFIXES", "SUPPORTED", "SanColumnHook", "SsfConfig", "SsfSiteHook", "add_san_column", "add_ssf_site",
           "apply_ssf", "column_scale", "count_ssf_parameters", "load_ssf_state_dict", "merge_ssf",
           "san_columns", "ssf_affine", "ssf_regulariser", "ssf_sites", "ssf_state_dict", "ssf_statistics"]

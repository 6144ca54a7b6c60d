"""SAN on a whole model: the taking-part layers, their source → target pairs (``docs/san.md`` §2), the
backbone hook that counts forwards and captures the padding mask, the γ bookkeeping (§4), the training
helpers (regulariser, statistics, data-parallel sync) and merging a model.

The maths of one layer is :mod:`.san`; this module wires layers together.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
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
from .san import SanLoraLinear, _count_clamped, merged_weight
from .san_config import SanConfig

#: Layerwise pairs inside a block: target type -> source type (the source's output feeds the target).
LAYERWISE_IN_BLOCK = {"o_proj": "v_proj", "gate_proj": "o_proj", "up_proj": "o_proj", "down_proj": "up_proj"}
#: Layerwise pairs across blocks: down_proj of block i feeds q, k, v of block i+1.
LAYERWISE_NEXT_BLOCK = {"q_proj": "down_proj", "k_proj": "down_proj", "v_proj": "down_proj"}


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


__all__ = [
    "LAYERWISE_IN_BLOCK",
    "LAYERWISE_NEXT_BLOCK",
    "attach_san",
    "get_san_model",
    "get_san_state",
    "merge_san",
    "resolve_pairs",
    "san_gamma_stats",
    "san_layers",
    "san_regularization",
    "set_gamma_logging",
    "sync_gamma_ema",
]

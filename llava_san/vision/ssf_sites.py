"""Where SSF and SAN-SSF go on the two supported backbones (the sites and propagation map of
:mod:`llava_san.vision.ssf`).

:func:`plan_for` inspects a model and returns a :class:`SsfPlan`: the backbone module to adapt (a timm
``VisionTransformer``, or a transformers CLIP vision tower found inside whatever it was given), the SSF
sites, the SAN propagation edges, the LayerNorms whose affines train (prototype mode) and where a
bias-less site's shift folds at merge time. All module names in a plan are relative to the backbone.
:mod:`llava_san.vision.ssf` turns a plan into hooks and parameters; nothing here touches the model.

Site types (used by the statistics): ``patch_embed``, ``pre_norm``, ``norm1``, ``qkv`` (timm, fused) or
``q``/``k``/``v`` (CLIP), ``proj`` (timm ``attn.proj`` / CLIP ``out_proj``), ``norm2``, ``fc1``,
``fc2``, ``final_norm``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from .ssf import SsfConfig

SUPPORTED = ("a timm VisionTransformer (blocks with fused attn.qkv, attn.proj, mlp.fc1/fc2, norm1/norm2), "
             "a transformers CLIPVisionModel, or a model holding one CLIP vision tower (e.g. "
             "LlavaForConditionalGeneration: only its vision tower is adapted)")


@dataclass(frozen=True)
class SiteSpec:
    """One SSF site ``h' = γ ⊙ h + β`` (``β`` only when ``shift``) on the output of ``module``."""

    module: str
    kind: str
    shift: bool = True
    channel_dim: int = -1  # -1: Linear / LayerNorm output [..., C]; 1: Conv2d output [B, C, H, W]


@dataclass(frozen=True)
class EdgeSpec:
    """SAN propagation: the SSF scale of ``source`` scales the input columns of ``target``.

    ``part``: ``full`` (sizes equal), ``v_slice`` (the v third of a fused qkv scale) or ``interp``
    (1-D linear interpolation, align-corners, to the target's input size)."""

    source: str
    target: str
    part: str = "full"


@dataclass
class SsfPlan:
    """Everything :func:`llava_san.vision.ssf.apply_ssf` does to one backbone."""

    family: str                        # "timm_vit" | "clip"
    prefix: str                        # the backbone's module name inside the model given ("" = itself)
    sites: list[SiteSpec] = field(default_factory=list)
    edges: list[EdgeSpec] = field(default_factory=list)
    trainable_norms: list[str] = field(default_factory=list)  # LayerNorms whose affines train (prototype)
    keep_trainable: tuple[str, ...] = ()  # parameter-name prefixes apply_ssf leaves alone (timm: head*)
    # bias-less site -> module whose weight rows [1:] absorb its shift at merge (CLIP patch embedding)
    shift_into: dict[str, str] = field(default_factory=dict)
    adapted_layers: Optional[int] = None  # CLIP: layers 0..adapted_layers-1
    config: Any = None                    # the SsfConfig it was built from (set by apply_ssf)


def _is_ln(m: Optional[nn.Module]) -> bool:
    return isinstance(m, nn.LayerNorm)


def _get(root: nn.Module, name: str) -> Optional[nn.Module]:
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None


def _require(root: nn.Module, name: str, kind: type, what: str) -> None:
    m = _get(root, name)
    if not isinstance(m, kind):
        found = "missing" if m is None else type(m).__name__
        raise ValueError(f"apply_ssf: {what}: expected {name} to be a {kind.__name__}, found {found}. "
                         f"Supported: {SUPPORTED}")


# --------------------------------------------------------------------------------------------- timm ViT

def _is_timm_vit(model: nn.Module) -> bool:
    if not type(model).__module__.startswith("timm"):
        return False
    import timm.models.vision_transformer as vt

    return isinstance(model, vt.VisionTransformer)


def _timm_plan(model: nn.Module, config: "SsfConfig") -> SsfPlan:
    what = f"timm {type(model).__name__}"
    _require(model, "patch_embed.proj", nn.Conv2d, what)
    blocks = list(model.blocks)
    if not blocks:
        raise ValueError(f"apply_ssf: {what} has no blocks")
    for i in range(len(blocks)):
        for name, kind in (("norm1", nn.LayerNorm), ("attn.qkv", nn.Linear), ("attn.proj", nn.Linear),
                           ("norm2", nn.LayerNorm), ("mlp.fc1", nn.Linear), ("mlp.fc2", nn.Linear)):
            _require(model, f"blocks.{i}.{name}", kind, what)
    prototype = config.method == "san_ssf" and config.mode == "prototype"
    san = config.method == "san_ssf"
    plan = SsfPlan(family="timm_vit", prefix="", keep_trainable=("head",))

    def site(name: str, kind: str, channel_dim: int = -1) -> None:
        plan.sites.append(SiteSpec(name, kind, shift=not prototype, channel_dim=channel_dim))

    # The patch site acts on the conv output [B, C, H, W] (the patch tokens before CLS and pos-emb).
    site("patch_embed.proj", "patch_embed", channel_dim=1)
    # the final norm is `norm` (token pooling) or `fc_norm` (average pooling): whichever is a LayerNorm
    final_norms = [n for n in ("norm", "fc_norm") if _is_ln(getattr(model, n, None))]
    if not prototype:
        if _is_ln(getattr(model, "norm_pre", None)):  # Identity on the standard ViT; CLIP-style timm models
            site("norm_pre", "pre_norm")
    for i in range(len(blocks)):
        b = f"blocks.{i}"
        if not prototype:
            site(f"{b}.norm1", "norm1")
        site(f"{b}.attn.qkv", "qkv")
        site(f"{b}.attn.proj", "proj")
        if not prototype:
            site(f"{b}.norm2", "norm2")
        site(f"{b}.mlp.fc1", "fc1")
        site(f"{b}.mlp.fc2", "fc2")
    if not prototype:
        for n in final_norms:
            site(n, "final_norm")
    else:
        # every LayerNorm affine of the backbone trains (the official prototype); the head is not ours
        plan.trainable_norms = [n for n, m in model.named_modules()
                                if _is_ln(m) and not n.startswith("head") and m.elementwise_affine]

    if san:
        for i in range(len(blocks)):
            b = f"blocks.{i}"
            source = "patch_embed.proj" if (i == 0 or not config.chain_blocks) else f"blocks.{i - 1}.mlp.fc2"
            plan.edges.append(EdgeSpec(source, f"{b}.attn.qkv"))
            plan.edges.append(EdgeSpec(f"{b}.attn.proj", f"{b}.mlp.fc1"))
            plan.edges.append(EdgeSpec(f"{b}.mlp.fc1", f"{b}.mlp.fc2"))
            if config.qkv_to_proj != "skip":
                plan.edges.append(EdgeSpec(f"{b}.attn.qkv", f"{b}.attn.proj", part=config.qkv_to_proj))
    return plan


# ------------------------------------------------------------------------------------------ CLIP tower

_CLIP_LAYER = (("layer_norm1", nn.LayerNorm), ("self_attn.q_proj", nn.Linear),
               ("self_attn.k_proj", nn.Linear), ("self_attn.v_proj", nn.Linear),
               ("self_attn.out_proj", nn.Linear), ("layer_norm2", nn.LayerNorm),
               ("mlp.fc1", nn.Linear), ("mlp.fc2", nn.Linear))


def _looks_like_clip_tower(m: nn.Module) -> bool:
    emb = getattr(m, "embeddings", None)
    enc = getattr(m, "encoder", None)
    return (isinstance(getattr(emb, "patch_embedding", None), nn.Conv2d)
            and isinstance(getattr(emb, "position_embedding", None), nn.Embedding)
            and isinstance(getattr(enc, "layers", None), nn.ModuleList)
            and _is_ln(getattr(m, "pre_layrnorm", None)))


def find_clip_tower(model: nn.Module) -> Optional[tuple[str, nn.Module]]:
    """``(name, module)`` of the one CLIP vision tower in ``model`` (``""`` when ``model`` is the tower;
    ``model.vision_tower`` in a transformers-5 LLaVA), ``None`` if there is none.

    Matched by structure (``embeddings.patch_embedding`` conv + ``pre_layrnorm`` + ``encoder.layers``),
    never by a projection name, so a language model's ``q_proj`` can never be picked up."""
    found = [(n, m) for n, m in model.named_modules() if _looks_like_clip_tower(m)]
    if len(found) > 1:
        raise ValueError(f"apply_ssf: {len(found)} CLIP vision towers found ({[n for n, _ in found]}); "
                         "pass the one to adapt")
    return found[0] if found else None


def _clip_plan(prefix: str, tower: nn.Module, config: "SsfConfig") -> SsfPlan:
    what = f"CLIP vision tower {prefix or type(tower).__name__}"
    n_layers = len(tower.encoder.layers)
    n = config.clip_layers if config.clip_layers is not None else n_layers - 1
    if not 1 <= n <= n_layers:
        raise ValueError(f"SsfConfig.clip_layers={config.clip_layers}: the tower has {n_layers} layers, "
                         f"so it must be in 1..{n_layers} (None adapts layers 0..{n_layers - 2}, all but "
                         "the last, which LLaVA's vision_feature_layer=-2 never uses)")
    for i in range(n):
        for name, kind in _CLIP_LAYER:
            _require(tower, f"encoder.layers.{i}.{name}", kind, what)
    prototype = config.method == "san_ssf" and config.mode == "prototype"
    san = config.method == "san_ssf"
    plan = SsfPlan(family="clip", prefix=prefix, adapted_layers=n)
    # patch_embedding has no bias: its shift folds into the patch rows of the position embedding
    plan.shift_into["embeddings.patch_embedding"] = "embeddings.position_embedding"

    def site(name: str, kind: str, channel_dim: int = -1) -> None:
        plan.sites.append(SiteSpec(name, kind, shift=not prototype, channel_dim=channel_dim))

    site("embeddings.patch_embedding", "patch_embed", channel_dim=1)
    if not prototype:
        site("pre_layrnorm", "pre_norm")
    for i in range(n):
        L = f"encoder.layers.{i}"
        if not prototype:
            site(f"{L}.layer_norm1", "norm1")
        for p in ("q", "k", "v"):
            site(f"{L}.self_attn.{p}_proj", p)
        site(f"{L}.self_attn.out_proj", "proj")
        if not prototype:
            site(f"{L}.layer_norm2", "norm2")
        site(f"{L}.mlp.fc1", "fc1")
        site(f"{L}.mlp.fc2", "fc2")
    if prototype:  # LayerNorm affines within scope: pre_layrnorm and the adapted layers (not post_layernorm)
        plan.trainable_norms = ["pre_layrnorm"] + [f"encoder.layers.{i}.layer_norm{j}"
                                                   for i in range(n) for j in (1, 2)]
        plan.trainable_norms = [x for x in plan.trainable_norms if tower.get_submodule(x).elementwise_affine]

    if san:
        for i in range(n):
            L = f"encoder.layers.{i}"
            source = ("embeddings.patch_embedding" if (i == 0 or not config.chain_blocks)
                      else f"encoder.layers.{i - 1}.mlp.fc2")
            for p in ("q", "k", "v"):
                plan.edges.append(EdgeSpec(source, f"{L}.self_attn.{p}_proj"))
            plan.edges.append(EdgeSpec(f"{L}.self_attn.out_proj", f"{L}.mlp.fc1"))
            plan.edges.append(EdgeSpec(f"{L}.mlp.fc1", f"{L}.mlp.fc2"))
            # v_proj -> out_proj: sizes match, so v_slice and interp both mean γ_v itself
            if config.qkv_to_proj != "skip":
                plan.edges.append(EdgeSpec(f"{L}.self_attn.v_proj", f"{L}.self_attn.out_proj"))
    return plan


def plan_for(model: nn.Module, config: "SsfConfig") -> tuple[nn.Module, SsfPlan]:
    """``(backbone, plan)`` for ``model``; raises ``ValueError`` naming what is supported otherwise."""
    if _is_timm_vit(model):
        return model, _timm_plan(model, config)
    tower = find_clip_tower(model)
    if tower is not None:
        prefix, module = tower
        return module, _clip_plan(prefix, module, config)
    raise ValueError(f"apply_ssf: {type(model).__name__} is not supported. Supported: {SUPPORTED}")


__all__ = ["EdgeSpec", "SiteSpec", "SsfPlan", "SUPPORTED", "find_clip_tower", "plan_for"]

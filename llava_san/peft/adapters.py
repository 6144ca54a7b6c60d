"""Stock peft LoRA/DoRA scoped to the language tower, and the trainable-set helpers.

A LLaVA model holds three groups of linears: the CLIP tower (which also has
``layers.<i>.self_attn.q_proj``), the projector and the language model. The SAN paper (and the LLaVA
LoRA recipe) adapts the seven LLaMA projections of the language model only. A plain list
``["q_proj", ...]`` handed to peft would also wrap the CLIP tower, so this module turns the module
types into an anchored regex over the language tower's names (``model.language_model.layers.N...``
for ``LlavaForConditionalGeneration``, ``model.layers.N...`` for ``LlamaForCausalLM``).
"""
from __future__ import annotations

import copy
import re
from typing import Iterable

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

#: The seven LLaMA projections, in block (forward) order: attention then MLP.
LLAMA_MODULE_TYPES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}

#: Matches a language-tower projection name relative to the transformers model; groups: (prefix, block, type).
LANGUAGE_LAYER_RE = re.compile(
    r"^(model\.language_model|language_model\.model|language_model|model)\.layers\.(\d+)\."
    r"(?:self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
)

#: Name prefixes of modules that are trained in full beside the adapters (LLaVA's projector).
PROJECTOR_PREFIXES: tuple[str, ...] = ("model.multi_modal_projector.", "multi_modal_projector.")


def language_tower_prefix(model: nn.Module) -> str:
    """The dotted path of the decoder stack's parent (``model.language_model`` or ``model``).

    Raises ``ValueError`` if the model has no LLaMA-style decoder (``<prefix>.layers.<i>.self_attn.q_proj``).
    """
    for name, _ in base_transformers_model(model).named_modules():
        m = LANGUAGE_LAYER_RE.match(name)
        if m:
            return m.group(1)
    raise ValueError(
        f"{type(base_transformers_model(model)).__name__} has no LLaMA-family language tower (expected modules named like "
        "'model.language_model.layers.0.self_attn.q_proj' or 'model.layers.0.self_attn.q_proj')"
    )


def language_target_regex(model: nn.Module, module_types: Iterable[str] = LLAMA_MODULE_TYPES) -> str:
    """An anchored peft ``target_modules`` regex selecting ``module_types`` in the language tower only."""
    types = list(module_types)
    bad = [t for t in types if t not in _PARENT]
    if bad or not types:
        raise ValueError(f"target module types must be a non-empty subset of {list(LLAMA_MODULE_TYPES)}, got {types}")
    prefix = re.escape(language_tower_prefix(model))
    alternatives = "|".join(f"{_PARENT[t]}\\.{t}" for t in LLAMA_MODULE_TYPES if t in types)
    return rf"{prefix}\.layers\.\d+\.({alternatives})"


def scoped_lora_config(model: nn.Module, lora_config: LoraConfig) -> LoraConfig:
    """A copy of ``lora_config`` whose ``target_modules`` cover the language tower only.

    ``target_modules`` may be ``None`` (all seven projections), a list of projection names (turned into
    the language-tower regex), or a regex string (kept, and checked after wrapping).
    """
    cfg = copy.deepcopy(lora_config)
    targets = cfg.target_modules
    if targets is None:
        cfg.target_modules = language_target_regex(model)
    elif not isinstance(targets, str):
        cfg.target_modules = language_target_regex(model, sorted(targets, key=_type_order))
    return cfg


def _type_order(t: str) -> int:
    return LLAMA_MODULE_TYPES.index(t) if t in LLAMA_MODULE_TYPES else len(LLAMA_MODULE_TYPES)


def apply_lora(model: nn.Module, lora_config: LoraConfig) -> PeftModel:
    """Wrap the language tower of ``model`` with stock peft LoRA or DoRA (``lora_config.use_dora``).

    Raises ``ValueError`` if the config would adapt anything outside the language tower (the CLIP tower,
    the projector or the LM head).
    """
    cfg = scoped_lora_config(model, lora_config)
    peft_model = get_peft_model(model, cfg)
    outside = [n for n in adapted_module_names(peft_model) if not LANGUAGE_LAYER_RE.match(n)]
    if outside:
        raise ValueError(
            f"target_modules={cfg.target_modules!r} adapts modules outside the language tower, e.g. {outside[:3]}; "
            "pass module types (['q_proj', ...]) or a regex anchored at the language model's layers"
        )
    return peft_model


def base_transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``PeftModel`` (or ``model`` itself)."""
    if isinstance(model, PeftModel):
        return model.base_model.model
    return model


def adapted_module_names(model: nn.Module) -> list[str]:
    """Names (relative to the transformers model) of the modules that carry a LoRA/DoRA adapter."""
    base = base_transformers_model(model)
    return [n for n, m in base.named_modules() if isinstance(m, LoraLayer)]


def is_adapter_param(name: str) -> bool:
    """True for peft adapter tensors (``lora_A/B``, DoRA magnitudes) and SAN tensors (``san_``)."""
    leaf_parts = name.split(".")
    return any(p.startswith("lora_") or p.startswith("san_") for p in leaf_parts)


def is_projector_param(name: str) -> bool:
    """True for parameters of LLaVA's multimodal projector (names relative to the transformers model)."""
    return name.startswith(PROJECTOR_PREFIXES)


def set_projector_trainable(model: nn.Module, trainable: bool = True) -> int:
    """Make LLaVA's projector (un)trainable, as the LLaVA LoRA recipe trains it. Returns #params."""
    base = base_transformers_model(model)
    n = 0
    for name, p in base.named_parameters():
        if is_projector_param(name):
            p.requires_grad_(trainable)
            n += p.numel()
    return n


def trainable_parameters(model: nn.Module) -> dict[str, torch.nn.Parameter]:
    """All parameters with ``requires_grad``, named relative to the transformers model."""
    base = base_transformers_model(model)
    return {n: p for n, p in base.named_parameters() if p.requires_grad}

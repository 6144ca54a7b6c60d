"""SAN on stock peft LoRA/DoRA: the public API of llava-san's adapter layer."""
from .adapters import (
    LLAMA_MODULE_TYPES,
    adapted_module_names,
    apply_lora,
    is_adapter_param,
    is_projector_param,
    language_target_regex,
    set_projector_trainable,
    trainable_parameters,
)
from .san import SanLoraLinear
from .san_config import SanConfig
from .san_model import (
    attach_san,
    get_san_model,
    get_san_state,
    merge_san,
    san_gamma_stats,
    san_layers,
    san_regularization,
    set_gamma_logging,
    sync_gamma_ema,
)
from .adapter_io import load_adapter, save_adapter
from .recipes import AdapterRecipe, FullFinetune, LoraRecipe, NoAdapter, apply_adapter_folder

__all__ = [
    "AdapterRecipe",
    "FullFinetune",
    "LoraRecipe",
    "NoAdapter",
    "LLAMA_MODULE_TYPES",
    "SanConfig",
    "SanLoraLinear",
    "apply_adapter_folder",
    "adapted_module_names",
    "apply_lora",
    "attach_san",
    "get_san_model",
    "get_san_state",
    "is_adapter_param",
    "is_projector_param",
    "language_target_regex",
    "load_adapter",
    "merge_san",
    "san_gamma_stats",
    "san_layers",
    "san_regularization",
    "save_adapter",
    "set_gamma_logging",
    "set_projector_trainable",
    "sync_gamma_ema",
    "trainable_parameters",
]

"""Model builders: the tiny offline LLaVA, (see builder.py) the real LLaVA-1.5 checkpoints and (llama.py)
LLaMA-family causal LMs, real or tiny."""
from .builder import (
    build_from_config,
    build_llava_from_parts,
    build_parts_processor,
    build_tiny,
    check_model_processor,
    load_llava_hf,
    load_llava_hf_processor,
    resolve_dtype,
)
from .llama import (
    build_tiny_causal_lm,
    export_causal_lm,
    load_llama,
    load_llama_tokenizer,
    tiny_causal_lm_processor,
    tiny_causal_lm_tokenizer,
)
from .tiny import TinyLlavaSpec, build_tiny_llama, build_tiny_llava, build_tiny_processor
from .tokenizer import IMAGE_TOKEN, PAD_TOKEN, build_tiny_tokenizer

__all__ = [
    "IMAGE_TOKEN",
    "PAD_TOKEN",
    "TinyLlavaSpec",
    "build_from_config",
    "build_llava_from_parts",
    "build_parts_processor",
    "build_tiny",
    "build_tiny_causal_lm",
    "export_causal_lm",
    "load_llama",
    "load_llama_tokenizer",
    "tiny_causal_lm_processor",
    "tiny_causal_lm_tokenizer",
    "build_tiny_llama",
    "build_tiny_llava",
    "build_tiny_processor",
    "build_tiny_tokenizer",
    "check_model_processor",
    "load_llava_hf",
    "load_llava_hf_processor",
    "resolve_dtype",
]

"""Tiny checkpoints in the real on-disk formats, for offline tests of the real-model loaders.

:func:`write_tiny_checkpoints` writes, under one root folder, small random stand-ins for every
checkpoint the LLaVA-1.5 LoRA recipe starts from, each in the same format as its hub original, so
that :func:`llava_san.models.builder.build_llava_from_parts` and
:func:`~llava_san.models.builder.load_llava_hf` run unchanged on them (a local folder stands for a
hub id):

``vicuna``        ``lmsys/vicuna-7b-v1.5``: ``LlamaForCausalLM`` ``config.json``,
                  ``generation_config.json``, weights as sharded ``pytorch_model-0000i-of-0000n.bin`` +
                  ``pytorch_model.bin.index.json`` (as Vicuna v1.5 ships; ``safetensors`` on request)
                  and a LLaMA-style tokenizer with only ``<unk>, <s>, </s>`` as specials (no ``<image>``,
                  no ``<pad>``, ``pad_token`` unset), as the real Vicuna.
``clip``          ``openai/clip-vit-large-patch14-336``: a full ``CLIPModel`` (text + vision towers,
                  ``vision_model.*`` keys) + its ``CLIPImageProcessor`` ``preprocessor_config.json``
                  (shortest edge + center crop at the tower's resolution, OpenAI mean/std, bicubic).
``mm_projector``  LLaVA stage-1 ``mm_projector.bin``: a ``torch.save``'d dict with
                  ``model.mm_projector.{0,2}.{weight,bias}`` (mlp2x_gelu) in bfloat16, as LLaVA saves it.
``llava_hf``      ``llava-hf/llava-1.5-7b-hf``: ``LlavaForConditionalGeneration`` + ``LlavaProcessor``
                  ``save_pretrained`` (the tiny model of :mod:`llava_san.models.tiny`);
``llava_hf_hub``  the same model in the hub checkpoint's own (transformers-4) key layout.

Shapes come from a :class:`~llava_san.models.tiny.TinyLlavaSpec` (64 px, patch 16 → 16 image tokens).
Everything is deterministic for a given ``seed``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    CLIPConfig,
    CLIPModel,
    GenerationConfig,
    LlamaForCausalLM,
    LlamaTokenizer,
)

from ..models.image_processor import CLIPImageProcessorPil
from ..models.tiny import TinyLlavaSpec, build_tiny_llava, tiny_text_config

from ..models.tokenizer import base_tiny_tokenizer
from ..data.llava15_text import Llava15TextTokenizer, attach, attached, save_attached

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def tiny_vicuna_tokenizer(vocab_size: int = 1024, model_max_length: int = 4096) -> LlamaTokenizer:
    """The offline LLaMA-style tokenizer with only the base specials ``<unk>=0, <s>=1, </s>=2``.

    Same vocabulary and merges as :func:`~llava_san.models.tokenizer.build_tiny_tokenizer` (whose
    ``<pad>`` and ``<image>`` come after the base vocabulary), but nothing added: like the real Vicuna
    v1.5 tokenizer it has no pad token and no ``<image>``.
    """
    return base_tiny_tokenizer(vocab_size, model_max_length)


def _added_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def write_vicuna_tokenizer(path: str | Path, tok, legacy: bool | None = None) -> Path:
    """Save ``tok`` the way lmsys/vicuna-*-v1.5 ships its tokenizer: ``tokenizer.model`` (SentencePiece),
    ``special_tokens_map.json`` with ``AddedToken`` entries and a ``tokenizer_config.json`` whose
    ``legacy`` key is ``legacy`` (``None``: no key). transformers' ``tokenizer.json`` is kept beside them.
    """
    path = Path(path)
    sp_model = attached(tok).model_proto
    tok.save_pretrained(path)
    save_attached(attach(tok, Llava15TextTokenizer(sp_model, legacy=legacy, source=str(path))), path)
    specials = {"bos_token": _added_token("<s>"), "eos_token": _added_token("</s>"),
                "unk_token": _added_token("<unk>")}
    if tok.pad_token is not None:
        specials["pad_token"] = tok.pad_token
    (path / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    return path


def _save_bin_shards(state_dict: dict[str, torch.Tensor], path: Path, num_shards: int) -> None:
    """Write ``pytorch_model-0000i-of-0000n.bin`` shards and ``pytorch_model.bin.index.json``."""
    names = list(state_dict)
    num_shards = max(1, min(num_shards, len(names)))
    per = -(-len(names) // num_shards)
    weight_map, total = {}, 0
    for i in range(num_shards):
        shard_name = f"pytorch_model-{i + 1:05d}-of-{num_shards:05d}.bin"
        shard = {k: state_dict[k].contiguous().clone() for k in names[i * per : (i + 1) * per]}
        torch.save(shard, path / shard_name)
        for k, v in shard.items():
            weight_map[k] = shard_name
            total += v.numel() * v.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


def write_tiny_vicuna(
    path: str | Path,
    spec: TinyLlavaSpec | None = None,
    seed: int = 0,
    weights_format: str = "bin",
    dtype: torch.dtype = torch.float32,
    tokenizer_legacy: bool | None = None,
) -> Path:
    """Write a tiny Vicuna-v1.5-format LLaMA folder; ``weights_format``: ``"bin"`` or ``"safetensors"``;
    ``tokenizer_legacy``: the ``legacy`` key of its ``tokenizer_config.json`` (``None``: absent)."""
    spec = spec or TinyLlavaSpec()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = tiny_vicuna_tokenizer(spec.vocab_size)
    # Vicuna v1.5's config.json has pad_token_id 0 (<unk>) while its tokenizer has no pad token.
    config = tiny_text_config(spec, vocab_size=len(tok), pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(dtype)
    if weights_format == "safetensors":
        model.save_pretrained(path)
    elif weights_format == "bin":
        config.architectures = ["LlamaForCausalLM"]
        config.dtype = dtype
        config.save_pretrained(path)
        _save_bin_shards(model.state_dict(), path, num_shards=2)
    else:
        raise ValueError(f"weights_format must be 'bin' or 'safetensors', got {weights_format!r}")
    # Vicuna's sampling defaults, which the builder must not inherit.
    GenerationConfig(
        bos_token_id=1, eos_token_id=2, pad_token_id=0, do_sample=True, temperature=0.9, top_p=0.6,
        max_length=4096,
    ).save_pretrained(path)
    write_vicuna_tokenizer(path, tok, legacy=tokenizer_legacy)
    return path


def write_tiny_clip(path: str | Path, spec: TinyLlavaSpec | None = None, seed: int = 0) -> Path:
    """Write a tiny ``openai/clip-vit-large-patch14-336``-format ``CLIPModel`` folder + preprocessor."""
    spec = spec or TinyLlavaSpec()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=99,
            hidden_size=spec.vision_hidden,
            intermediate_size=spec.vision_hidden * 4,
            num_hidden_layers=1,
            num_attention_heads=spec.vision_heads,
            max_position_embeddings=16,
            pad_token_id=1,
            bos_token_id=97,
            eos_token_id=98,
        ),
        vision_config=dict(
            hidden_size=spec.vision_hidden,
            intermediate_size=spec.vision_hidden * 4,
            num_hidden_layers=spec.vision_layers,
            num_attention_heads=spec.vision_heads,
            image_size=spec.image_size,
            patch_size=spec.patch_size,
            hidden_act="quick_gelu",
        ),
        projection_dim=spec.vision_hidden,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.save_pretrained(path)
    CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        do_center_crop=True,
        do_resize=True,
        do_normalize=True,
        do_rescale=True,
        do_convert_rgb=True,
        resample=3,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    ).save_pretrained(path)
    return path


def write_tiny_mm_projector(
    path: str | Path,
    spec: TinyLlavaSpec | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    prefix: str = "model.mm_projector.",
) -> Path:
    """Write a LLaVA stage-1 ``mm_projector.bin`` (mlp2x_gelu: Linear(V→T), GELU, Linear(T→T)).

    ``path`` is the file to write (its folder is created). Keys are ``{prefix}{0,2}.{weight,bias}``.
    """
    spec = spec or TinyLlavaSpec()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    v, t = spec.vision_hidden, spec.text_hidden
    g = torch.Generator().manual_seed(seed)
    state = {
        f"{prefix}0.weight": torch.randn(t, v, generator=g) / v**0.5,
        f"{prefix}0.bias": torch.randn(t, generator=g) * 0.02,
        f"{prefix}2.weight": torch.randn(t, t, generator=g) / t**0.5,
        f"{prefix}2.bias": torch.randn(t, generator=g) * 0.02,
    }
    torch.save({k: x.to(dtype) for k, x in state.items()}, path)
    return path


# transformers-5 key prefix -> the transformers-4 one stored in the llava-hf hub checkpoints
_HUB_LAYOUT = (
    ("lm_head.", "language_model.lm_head."),
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


def write_tiny_llava_hf(
    path: str | Path, spec: TinyLlavaSpec | None = None, seed: int = 0, hub_layout: bool = False
) -> Path:
    """Write a tiny ``llava-hf/llava-1.5-7b-hf``-format folder (the tiny model of ``build_tiny_llava``).

    ``hub_layout=False``: model + processor ``save_pretrained`` (what this code base writes).
    ``hub_layout=True``: the layout the hub checkpoint actually has, written by transformers 4: weights
    keyed ``language_model.model.*``, ``language_model.lm_head.*``, ``vision_tower.vision_model.*``,
    ``multi_modal_projector.*`` in sharded ``model-0000i-of-0000n.safetensors`` +
    ``model.safetensors.index.json``; the image processor in its own ``preprocessor_config.json`` and a
    ``processor_config.json`` with only the LLaVA fields.
    """
    path = Path(path)
    model, processor = build_tiny_llava(spec or TinyLlavaSpec(), seed=seed)
    if not hub_layout:
        model.save_pretrained(path)
        processor.save_pretrained(path)
        save_attached(processor.tokenizer, path)
        return path
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    model.generation_config.save_pretrained(path)
    state = {}
    for key, value in model.state_dict().items():
        for new, old in _HUB_LAYOUT:
            if key.startswith(new):
                key = old + key[len(new):]
                break
        state[key] = value.contiguous().clone()
    names = sorted(state)
    half = len(names) // 2
    weight_map = {}
    for i, chunk in enumerate((names[:half], names[half:])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: state[k] for k in chunk}, str(path / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in chunk})
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    processor.image_processor.save_pretrained(path)
    processor.tokenizer.save_pretrained(path)
    save_attached(processor.tokenizer, path)
    fields = {
        "image_token": processor.image_token,
        "num_additional_image_tokens": processor.num_additional_image_tokens,
        "patch_size": processor.patch_size,
        "processor_class": "LlavaProcessor",
        "vision_feature_select_strategy": processor.vision_feature_select_strategy,
    }
    (path / "processor_config.json").write_text(json.dumps(fields, indent=2))
    return path


def write_tiny_checkpoints(
    root: str | Path, spec: TinyLlavaSpec | None = None, seed: int = 0
) -> dict[str, Path]:
    """Write all tiny checkpoints under ``root``; returns their paths.

    Keys: ``vicuna`` (folder), ``clip`` (folder), ``mm_projector`` (the ``.bin`` file inside the
    folder ``mm_projector_dir``, laid out like
    ``liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5``), ``mm_projector_dir``, ``llava_hf``
    (folder, ``save_pretrained``) and ``llava_hf_hub`` (the same model in the transformers-4 layout of
    the hub checkpoint, see :func:`write_tiny_llava_hf`). The shapes of ``spec`` fit together:
    building from ``vicuna`` + ``clip`` + ``mm_projector`` gives a model of the same shapes as
    ``llava_hf`` (both add ``<image>`` and ``<pad>`` after the Vicuna vocabulary; the tiny model puts
    ``<pad>`` first, the parts builder ``<image>`` first, as llava-hf).
    """
    root = Path(root)
    spec = spec or TinyLlavaSpec()
    projector_dir = root / "llava-v1.5-mlp2x-pretrain"
    return {
        "vicuna": write_tiny_vicuna(root / "vicuna-v1.5", spec, seed=seed),
        "clip": write_tiny_clip(root / "clip-vit", spec, seed=seed + 1),
        "mm_projector": write_tiny_mm_projector(projector_dir / "mm_projector.bin", spec, seed=seed + 2),
        "mm_projector_dir": projector_dir,
        "llava_hf": write_tiny_llava_hf(root / "llava-1.5-hf", spec, seed=seed + 3),
        "llava_hf_hub": write_tiny_llava_hf(
            root / "llava-1.5-hf-hub", spec, seed=seed + 3, hub_layout=True
        ),
    }

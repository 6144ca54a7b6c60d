"""Assemble LLaVA-1.5 from its parts: Vicuna + CLIP + the stage-1 ``mm_projector.bin``.

This is what the LLaVA-1.5 LoRA recipe starts from: Vicuna-7B/13B-v1.5, CLIP ViT-L/14-336
(penultimate layer, patch tokens) and the mlp2x_gelu projector, as a transformers
``LlavaForConditionalGeneration`` in the llava-hf layout.

Tokens: the Vicuna tokenizer is extended with ``<image>`` (id = base vocab size, 32000 for Vicuna)
and, with the default ``pad_token="<pad>"``, ``<pad>`` (32001); the input embedding and ``lm_head``
grow by those rows, initialised to the mean of the original rows (LLaVA's
``smart_tokenizer_and_embedding_resize`` rule: deterministic, and a mean ``lm_head`` row gives the
mean logit, so the new tokens are never favoured). ``pad_token="<unk>"`` reproduces LLaVA's own v1
choice instead (pad = unk): only ``<image>`` is added. Padding is masked out of attention and loss
either way; ``<pad>`` keeps the ids aligned with the llava-hf checkpoints.

Memory: each part is loaded once by ``from_pretrained`` and attached to a ``LlavaForConditionalGeneration``
shell built on the ``meta`` device (no copy); the README ("Real runs") has the peak-memory figures.

DeepSpeed ZeRO-3 (``DeepSpeedStrategy(zero_init=True)``; a transformers ``HfDeepSpeedConfig`` is alive
while the builder runs): ``from_pretrained`` builds each part inside ``deepspeed.zero.Init`` and loads it
rank 0 -> all, so no rank ever holds the whole model. The ``meta`` shell is built with ZeRO-3 hidden (it
cannot partition meta tensors); the whole pieces made here (the projector, the resized embedding and
``lm_head``) are partitioned right after. Parameter dtype under ZeRO-3 is DeepSpeed's precision, as in
transformers' own ZeRO-3 loading: keep ``dtype`` equal to the trainer's precision (the recipes do).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import (
    AutoModelForCausalLM,
    CLIPVisionModel,
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from ..distributed import zero3
from .consistency import check_layers, check_model_processor, embedding_rows, feature_layers
from .image_processor import load_clip_image_processor
from .original_llava import MM_PROJECTOR_FILE, load_mm_projector
from .source import (
    LANGUAGE_MODEL,
    TOKENIZER,
    VISION_TOWER,
    CheckpointSource,
    SourceKind,
    is_hub_id,
    listing,
    quiet_transformers,
    resolve_dtype,
    rng_untouched,
)
from .tokenizer import IMAGE_TOKEN, PAD_TOKEN

_MULTI_DEVICE = ("auto", "balanced", "balanced_low_0", "sequential")
_IMAGE_PROCESSOR = SourceKind("vision tower image processor", VISION_TOWER.expect, VISION_TOWER.hint)
PROJ_HINT = (
    "e.g. model.build.mm_projector=/path/to/mm_projector.bin (LLaVA stage-1, e.g. from "
    "liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5), or null to start the projector from scratch"
)


# ------------------------------------------------------------------------------------------ processor
def _vision_config(src: CheckpointSource, config):
    if config.model_type == "clip":
        return config.vision_config
    if config.model_type == "clip_vision_model":
        return config
    raise src.error(f"{src.path!r} is a {config.model_type!r} checkpoint "
                    f"(architectures={getattr(config, 'architectures', None)})")


def _parts_tokenizer(lm: CheckpointSource, tokenizer: Optional[str], pad_token: str, model_max_length: int,
                     padding_side: str):
    """Vicuna's tokenizer with ``<image>`` (and the pad token) added as llava-hf has them."""
    where = TOKENIZER.locate(tokenizer) if tokenizer is not None else lm
    # messages name the language model's tokenizer, whichever folder it comes from
    tok = where.as_kind(LANGUAGE_MODEL).tokenizer(
        model_max_length=model_max_length, padding_side=padding_side)
    if tok.convert_tokens_to_ids(IMAGE_TOKEN) in (None, tok.unk_token_id):
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    if pad_token == tok.unk_token:
        tok.pad_token = tok.unk_token  # LLaVA's v1 (Vicuna) choice
    elif tok.convert_tokens_to_ids(pad_token) not in (None, tok.unk_token_id):
        tok.pad_token = pad_token
    else:
        tok.add_special_tokens({"pad_token": pad_token})
    tok.model_max_length = model_max_length
    tok.padding_side = padding_side
    return tok


def _parts_processor(lm: CheckpointSource, vt: CheckpointSource, vision_config, *, tokenizer: Optional[str],
                     pad_token: str, model_max_length: int, padding_side: str,
                     vision_feature_select_strategy: str) -> LlavaProcessor:
    tok = _parts_tokenizer(lm, tokenizer, pad_token, model_max_length, padding_side)
    vt.require("preprocessor_config.json")
    try:
        image_processor = load_clip_image_processor(vt.path)
    except Exception as err:
        raise vt.as_kind(_IMAGE_PROCESSOR).not_loadable(err) from None
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's CLS token
        image_token=IMAGE_TOKEN,
    )


def build_parts_processor(
    language_model: str,
    vision_tower: str,
    *,
    tokenizer: str | None = None,
    pad_token: str = PAD_TOKEN,
    model_max_length: int = 2048,
    padding_side: str = "right",
    vision_feature_select_strategy: str = "default",
) -> LlavaProcessor:
    """The processor :func:`build_llava_from_parts` returns for the same arguments, without any weight.

    For the datamodule, which needs the processor before the model is built. Same tokens and ids
    (``<image>``, pad), same image processor, same ``patch_size`` / strategy / extra image tokens.
    """
    lm = LANGUAGE_MODEL.locate(language_model)
    vt = VISION_TOWER.locate(vision_tower)
    return _parts_processor(
        lm, vt, _vision_config(vt, vt.config()), tokenizer=tokenizer, pad_token=pad_token,
        model_max_length=model_max_length, padding_side=padding_side,
        vision_feature_select_strategy=vision_feature_select_strategy,
    )


# ------------------------------------------------------------------------------------------ the plan
@dataclass
class _Parts:
    """Everything checked before any weight is read: sources, configs, layers, dtype, projector."""

    lm: CheckpointSource
    lm_config: Any
    vt: CheckpointSource
    vision_config: Any
    layers: int | list[int]
    dtype: torch.dtype
    projector_state: Optional[dict]


def _check_arguments(vision_feature_select_strategy: str, padding_side: str, device_map, dtype) -> None:
    if vision_feature_select_strategy not in ("default", "full"):
        raise ValueError("vision_feature_select_strategy must be 'default' (patch tokens) or 'full', "
                         f"got {vision_feature_select_strategy!r}")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    single = isinstance(device_map, (str, torch.device)) and str(device_map) not in _MULTI_DEVICE
    if device_map is not None and not single:
        raise ValueError(
            f"device_map={device_map!r}: build_llava_from_parts loads onto one device (e.g. 'cuda', "
            "'cuda:0', 'cpu'); to shard across devices, save_pretrained the assembled model and load it "
            "with load_llava_hf"
        )
    if dtype is not None and str(dtype).lower() != "auto":
        resolve_dtype(dtype)  # fail fast on a typo


def _language_model(language_model: str) -> tuple[CheckpointSource, Any]:
    lm = LANGUAGE_MODEL.locate(language_model)
    config = lm.config()
    if config.model_type == "llava":
        raise ValueError(
            f"language model: {lm.path!r} is a LLaVA (llava-hf) checkpoint, not a Vicuna/LLaMA one; "
            f"load it with load_llava_hf (model=llava7b_hf) or pass {LANGUAGE_MODEL.expect}"
        )
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise lm.error(f"{lm.path!r} is a {config.model_type!r} checkpoint "
                       f"(architectures={getattr(config, 'architectures', None)}), not a causal LM")
    lm.require_weights()
    return lm, config


def _vision_tower(vision_tower: str, image_size: Optional[int], layers) -> tuple[CheckpointSource, Any]:
    vt = VISION_TOWER.locate(vision_tower)
    vision_config = _vision_config(vt, vt.config())
    vt.require_weights()
    if image_size is not None and int(image_size) != vision_config.image_size:
        raise ValueError(
            f"image_size={image_size} but the vision tower {vt.path!r} takes "
            f"{vision_config.image_size}px images (CLIP's position embeddings fix the resolution); "
            "drop image_size or pass the matching tower"
        )
    check_layers(layers, vision_config.num_hidden_layers, vt.path)
    return vt, vision_config


def _projector_file(mm_projector: Any) -> Path:
    text = str(mm_projector)
    p = Path(text).expanduser()
    if p.is_dir():
        f = p / MM_PROJECTOR_FILE
        if not f.is_file():
            raise FileNotFoundError(
                f"mm_projector: folder {text!r} has no {MM_PROJECTOR_FILE} (found {listing(p)}); {PROJ_HINT}")
        return f
    if p.exists():
        return p
    if is_hub_id(text):
        try:
            from huggingface_hub import hf_hub_download  # only for hub ids: keeps local runs offline-clean

            return Path(hf_hub_download(text, MM_PROJECTOR_FILE))
        except Exception as err:
            raise FileNotFoundError(
                f"mm_projector: {text!r} is not a local file or folder and {MM_PROJECTOR_FILE} could not be "
                f"fetched from it as a Hugging Face Hub id (offline? {type(err).__name__}); {PROJ_HINT}"
            ) from None
    raise FileNotFoundError(f"mm_projector: file {text!r} does not exist; {PROJ_HINT}")


def _plan(language_model, vision_tower, mm_projector, dtype, image_size, vision_feature_layer) -> _Parts:
    """Read and check every config (cheap) so each mismatch is reported before any weight is read."""
    layers = feature_layers(vision_feature_layer)
    lm, lm_config = _language_model(language_model)
    vt, vision_config = _vision_tower(vision_tower, image_size, layers)
    n_feature_layers = 1 if isinstance(layers, int) else len(layers)
    projector_state = None
    if mm_projector is not None and str(mm_projector).strip():
        projector_state = load_mm_projector(
            _projector_file(mm_projector), vision_config.hidden_size * n_feature_layers, lm_config.hidden_size)
    return _Parts(lm, lm_config, vt, vision_config, layers,
                  resolve_dtype(dtype, auto=getattr(lm_config, "dtype", None)), projector_state)


# ------------------------------------------------------------------------------------------ weights
def _load_towers(parts: _Parts, load_kw: dict):
    """The language model and the CLIP vision model, each loaded once by ``from_pretrained``."""
    try:
        with rng_untouched():
            lm = AutoModelForCausalLM.from_pretrained(parts.lm.path, **load_kw)
    except (OSError, ValueError) as err:
        raise parts.lm.not_loadable(err) from None
    try:
        # A CLIPModel checkpoint also holds the text tower: its keys are "unexpected" for the vision model
        # and transformers would print a table of them; missing/mismatched vision keys are checked below.
        with quiet_transformers(), rng_untouched():
            vision, info = CLIPVisionModel.from_pretrained(parts.vt.path, output_loading_info=True, **load_kw)
    except (OSError, ValueError) as err:
        raise parts.vt.not_loadable(err) from None
    if info.get("missing_keys") or info.get("mismatched_keys"):
        raise ValueError(
            f"vision tower: {parts.vt.path!r} lacks vision weights: missing "
            f"{sorted(info.get('missing_keys', []))[:8]}, "
            f"mismatched {list(info.get('mismatched_keys', []))[:8]}; expected {VISION_TOWER.expect}"
        )
    return lm, vision


def _mean_resize(lm, new_rows: int) -> None:
    """Grow input embeddings and lm_head to ``new_rows``, new rows = mean of the old ones (LLaVA's rule)."""
    old_rows = embedding_rows(lm.get_input_embeddings().weight)
    if new_rows <= old_rows:
        return
    lm.resize_token_embeddings(new_rows, mean_resizing=False)  # gathers by itself under ZeRO-3
    with torch.no_grad():
        modules = (lm.get_input_embeddings(), lm.get_output_embeddings())
        for emb in {id(m): m for m in modules if m is not None}.values():  # once if tied
            w = emb.weight
            with zero3.gathered([w], for_write=True):  # rank 0's write is scattered to all
                w[old_rows:] = w[:old_rows].float().mean(dim=0, keepdim=True).to(w.dtype)


def _llava_config(parts: _Parts, lm, vision, tok, *, vision_feature_select_strategy: str,
                  projector_hidden_act: str, attn_implementation: str) -> LlavaConfig:
    vc = parts.vision_config
    patches = (vc.image_size // vc.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision.config,
        text_config=lm.config,
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=patches + (1 if vision_feature_select_strategy == "full" else 0),
        projector_hidden_act=projector_hidden_act,
        vision_feature_layer=parts.layers,
        vision_feature_select_strategy=vision_feature_select_strategy,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)),
        pad_token_id=tok.pad_token_id,
    )
    config._attn_implementation = attn_implementation
    config.dtype = parts.dtype
    return config


def _projector(config: LlavaConfig, state: Optional[dict], like: torch.Tensor) -> LlavaMultiModalProjector:
    """Real init, whole (small; partitioned later under ZeRO-3): ``nn.Linear``'s default, like LLaVA's."""
    projector = LlavaMultiModalProjector(config)
    if state is not None:
        projector.load_state_dict({k: v.float() for k, v in state.items()})
    else:
        warnings.warn(
            "build_llava_from_parts: mm_projector is None, the projector is randomly initialised "
            "(stage-1 from scratch); pass the stage-1 mm_projector.bin for the LLaVA-1.5 LoRA recipe",
            UserWarning,
            stacklevel=4,
        )
    return projector.to(device=like.device, dtype=like.dtype)


def _assemble(config: LlavaConfig, lm, vision, projector_state, tok) -> LlavaForConditionalGeneration:
    """Attach the loaded towers to a ``meta`` shell (no copy) and add the projector."""
    zero3_cfg = zero3.hf_zero3_config()
    with torch.device("meta"), zero3.without_hf_zero3():  # a shell only; ZeRO-3 cannot partition meta tensors
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = vision
    model.model.language_model = lm.get_decoder() if not hasattr(lm, "model") else lm.model
    model.lm_head = lm.get_output_embeddings()
    # the loaded weights' device and dtype (= device_map and dtype; under ZeRO-3 DeepSpeed's precision)
    model.model.multi_modal_projector = _projector(config, projector_state, model.lm_head.weight)
    if zero3_cfg is not None:  # the projector and the resized embedding / lm_head join the partitioned rest
        zero3.partition(model, zero3_cfg)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:  # a transformers change in the module layout; better to stop than train garbage
        raise RuntimeError(f"build_llava_from_parts: parameters left on the meta device: {leftover[:8]}")
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return model


def build_llava_from_parts(
    language_model: str,
    vision_tower: str,
    mm_projector: str | None,
    *,
    dtype: str | torch.dtype = "bfloat16",
    image_size: int | None = None,
    vision_feature_layer: int | list[int] = -2,
    vision_feature_select_strategy: str = "default",
    projector_hidden_act: str = "gelu",
    attn_implementation: str = "sdpa",
    model_max_length: int = 2048,
    pad_token: str = PAD_TOKEN,
    padding_side: str = "right",
    tokenizer: str | None = None,
    device_map: str | None = None,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Assemble LLaVA-1.5 from Vicuna + CLIP + the stage-1 projector, as the LLaVA LoRA recipe starts.

    Args:
        language_model: Vicuna/LLaMA causal-LM folder or hub id (``lmsys/vicuna-7b-v1.5``); its
            tokenizer is used unless ``tokenizer`` is given.
        vision_tower: CLIP folder or hub id (``openai/clip-vit-large-patch14-336``; ``CLIPModel`` or
            ``CLIPVisionModel`` checkpoint); only the vision part is loaded. Its
            ``preprocessor_config.json`` gives the image processor.
        mm_projector: LLaVA's ``mm_projector.bin`` (file, folder holding it, or hub repo id), keys
            ``model.mm_projector.{0,2}.{weight,bias}`` → ``multi_modal_projector.linear_{1,2}``. ``None``:
            random init (``nn.Linear`` default, from torch's global RNG), with a warning.
        dtype: parameter dtype of the whole model (``"bfloat16"``, ``"float16"``, ``"float32"``, or
            ``"auto"`` = the language model checkpoint's dtype).
        image_size: if given, must equal the tower's ``image_size`` (a guard in configs, e.g. 336).
        vision_feature_layer: hidden state fed to the projector (-2: penultimate, LLaVA-1.5).
        vision_feature_select_strategy: ``"default"`` = patch tokens (LLaVA's ``patch``), ``"full"`` =
            CLS + patches.
        projector_hidden_act: activation between the projector linears (``"gelu"`` = mlp2x_gelu).
        attn_implementation: ``"sdpa"``, ``"eager"``, ``"flash_attention_2"``... for both towers.
        model_max_length: stored on the tokenizer (LLaVA-1.5: 2048).
        pad_token: ``"<pad>"`` (added after ``<image>``, llava-hf's ids) or ``"<unk>"`` (LLaVA's v1
            choice: pad = unk, nothing added) or any other token (added if missing).
        padding_side: tokenizer padding side (``"right"`` for training, as LLaVA).
        tokenizer: optional folder/hub id to take the tokenizer from instead of ``language_model``
            (must share its vocabulary).
        device_map: one device for all weights, forwarded to ``from_pretrained`` of both towers (e.g.
            ``"cuda"``: loaded straight to the GPU); ``None``: CPU. Multi-device maps are refused.

    Returns:
        ``(LlavaForConditionalGeneration, LlavaProcessor)``, model in eval mode.
    """
    _check_arguments(vision_feature_select_strategy, padding_side, device_map, dtype)
    parts = _plan(language_model, vision_tower, mm_projector, dtype, image_size, vision_feature_layer)
    processor = _parts_processor(
        parts.lm, parts.vt, parts.vision_config, tokenizer=tokenizer, pad_token=pad_token,
        model_max_length=model_max_length, padding_side=padding_side,
        vision_feature_select_strategy=vision_feature_select_strategy,
    )
    tok = processor.tokenizer
    load_kw = dict(dtype=parts.dtype, attn_implementation=attn_implementation)
    if device_map is not None:
        load_kw["device_map"] = device_map
    lm, vision = _load_towers(parts, load_kw)
    _mean_resize(lm, len(tok))
    lm.config.vocab_size = embedding_rows(lm.get_input_embeddings().weight)
    lm.config.pad_token_id = tok.pad_token_id
    config = _llava_config(parts, lm, vision, tok, vision_feature_select_strategy=vision_feature_select_strategy,
                           projector_hidden_act=projector_hidden_act, attn_implementation=attn_implementation)
    model = _assemble(config, lm, vision, parts.projector_state, tok)
    del lm
    model.eval()
    check_model_processor(model, processor, source=f"{parts.lm.path} + {parts.vt.path}")
    return model, processor

"""Loaders that assemble the real LLaVA-1.5 models (and the tiny one) as ``(model, processor)`` pairs.

Three entry points, with plain keyword arguments so Hydra's ``conf/model/*.yaml`` can ``_target_`` them:

* :func:`build_tiny` - the random offline tiny LLaVA of :mod:`llava_san.models.tiny`.
* :func:`build_llava_from_parts` - what the LLaVA-1.5 LoRA recipe starts from: Vicuna-7B/13B-v1.5 +
  CLIP ViT-L/14-336 (penultimate layer, patch tokens) + the stage-1 ``mm_projector.bin``
  (mlp2x_gelu), assembled into a transformers ``LlavaForConditionalGeneration``.
* :func:`load_llava_hf` - a llava-hf checkpoint (``llava-hf/llava-1.5-7b-hf`` format), checked for
  consistency between model config and processor.

Every path argument is a local folder or a Hugging Face Hub id (resolved by transformers /
huggingface_hub; offline only local folders work). Missing or wrong inputs raise
``FileNotFoundError`` / ``ValueError`` naming the path and what was expected.

Tokens of the parts-built model (the llava-hf layout): the Vicuna tokenizer is extended with
``<image>`` (id = base vocab size, 32000 for Vicuna) and, with the default ``pad_token="<pad>"``,
``<pad>`` (32001); the input embedding and ``lm_head`` grow by those rows, initialised to the mean
of the original rows (LLaVA's ``smart_tokenizer_and_embedding_resize`` rule; deterministic, and a
mean ``lm_head`` row gives the mean logit, so the new tokens are never favoured). ``pad_token="<unk>"``
reproduces LLaVA's own v1 choice instead (``tokenizer.pad_token = tokenizer.unk_token``): only
``<image>`` is added. Padding is masked out of attention and loss either way; ``<pad>`` keeps the ids
aligned with the llava-hf checkpoints (the only difference in training is one extra, never-targeted
row in the softmax).

Memory of :func:`build_llava_from_parts`: each part is loaded once by ``from_pretrained`` (safetensors
or ``.bin`` shards, memory-mapped, cast to ``dtype`` tensor by tensor); the
``LlavaForConditionalGeneration`` shell is built on the ``meta`` device and the loaded sub-modules
are attached to it (no copy). The peak is the final model plus, during ``resize_token_embeddings``,
one extra copy of the input embedding and ``lm_head``: for 7B in bfloat16 about 13.5 GB (Vicuna)
+ 0.6 GB (CLIP-L vision) + 0.04 GB (projector) + 0.5 GB transient ≈ 14.7 GB; for 13B about
26 + 0.6 + 0.06 + 0.65 ≈ 27.3 GB (from parameter counts). Measured on a 100M-parameter stand-in in
``.bin`` shards, cast float32 → bfloat16: anonymous-memory peak = model size + 4%; the mmapped source
shards add reclaimable page cache on top, not process-private memory. When ``dtype`` equals the
stored dtype the weights even stay file-backed until written.
With ``device_map="cuda"`` the weights go straight to the GPU.

DeepSpeed ZeRO-3 construction (``DeepSpeedStrategy(zero_init=True)``: a transformers
``HfDeepSpeedConfig`` is alive while the builder runs, see :func:`llava_san.models.tiny.zero3_config`):
all three builders return the model partitioned, equal once gathered to the one built without
DeepSpeed. ``from_pretrained`` builds each checkpoint inside ``deepspeed.zero.Init`` and loads it rank 0
→ all; ``resize_token_embeddings`` gathers; our own writes go through ``GatheredParameters`` (mean rows)
or are made on small whole modules that are partitioned right after (the projector, the resized
embedding and ``lm_head``: :func:`~llava_san.models.tiny.zero3_partition`); the ``meta`` shell of
:func:`build_llava_from_parts` is built with ZeRO-3 hidden. No rank ever holds the whole model: rank 0
reads the (memory-mapped) checkpoint, and the only whole pieces are the projector and the resized
embedding and ``lm_head`` (7B: 0.26 GB each in bf16) until they are partitioned.
Parameter dtype under ZeRO-3 is DeepSpeed's precision (its ``bf16``/``fp16`` block, else fp32), as in
transformers' own ZeRO-3 loading: keep ``dtype`` equal to the trainer's precision (the recipes do).
"""
from __future__ import annotations

import contextlib
import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    CLIPVisionModel,
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector
from transformers.utils import cached_file

from ..data.llava15_text import attach_from_folder

from .original_llava import MM_PROJECTOR_FILE, load_mm_projector
from .tiny import TinyLlavaSpec, build_tiny_llava, without_hf_zero3, zero3_config, zero3_partition
from .image_processor import load_clip_image_processor, pin_pil_backend
from .tokenizer import IMAGE_TOKEN, PAD_TOKEN

__all__ = [
    "build_llava_from_parts",
    "build_parts_processor",
    "build_tiny",
    "check_model_processor",
    "load_llava_hf",
    "load_llava_hf_processor",
    "resolve_dtype",
]

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_MULTI = ("auto", "balanced", "balanced_low_0", "sequential")

LM_EXPECT = (
    "a Vicuna/LLaMA checkpoint folder (config.json + model*.safetensors or pytorch_model*.bin + tokenizer "
    "files, like lmsys/vicuna-7b-v1.5)"
)
LM_HINT = "e.g. model.build.language_model=/path/to/vicuna-7b-v1.5"
VT_EXPECT = (
    "a CLIP checkpoint folder like openai/clip-vit-large-patch14-336 (config.json with a vision_config, "
    "weights with vision_model.* keys, preprocessor_config.json)"
)
VT_HINT = "e.g. model.build.vision_tower=/path/to/clip-vit-large-patch14-336"
PROJ_HINT = (
    "e.g. model.build.mm_projector=/path/to/mm_projector.bin (LLaVA stage-1, e.g. from "
    "liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5), or null to start the projector from scratch"
)
HF_EXPECT = (
    "a llava-hf checkpoint folder like llava-hf/llava-1.5-7b-hf (config.json with model_type 'llava', "
    "weights, processor_config.json/preprocessor_config.json and tokenizer files)"
)
HF_HINT = "e.g. model.build.path=/path/to/llava-1.5-7b-hf"


# --------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------
def resolve_dtype(dtype: str | torch.dtype | None, auto: torch.dtype | None = None) -> torch.dtype:
    """Map ``"bfloat16"``/``"bf16"``/``"float16"``/``"fp16"``/``"float32"``/``"fp32"``/a ``torch.dtype``.

    ``"auto"`` (or ``None``) gives ``auto`` (the checkpoint's dtype; float32 when unknown).
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or str(dtype).lower() == "auto":
        return auto if isinstance(auto, torch.dtype) else torch.float32
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(set(_DTYPES))} or 'auto'")
    return _DTYPES[key]


def _listing(path: Path, limit: int = 12) -> str:
    names = sorted(p.name for p in path.iterdir())
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return "[" + ", ".join(names[:limit]) + more + "]" if names else "nothing"


def _locate(path: Any, what: str, expect: str, hint: str) -> tuple[str, bool]:
    """Return ``(path, is_local)``: an existing local folder, or a string that looks like a hub id."""
    if path is None or not str(path).strip():
        raise ValueError(f"{what}: no path given; expected {expect}; {hint}")
    text = str(path)
    local = Path(text).expanduser()
    if local.exists():
        if not local.is_dir():
            raise FileNotFoundError(f"{what}: {text!r} is a file, not a folder; expected {expect}; {hint}")
        return str(local), True
    if _HUB_ID.match(text) and not text.startswith((".", "~")):
        return text, False
    raise FileNotFoundError(f"{what}: folder {text!r} does not exist; expected {expect}; {hint}")


def _not_loadable(what: str, path: str, is_local: bool, expect: str, hint: str, err: Exception) -> Exception:
    reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    if is_local:
        return ValueError(f"{what}: {path!r} could not be loaded ({reason}); expected {expect}; {hint}")
    return FileNotFoundError(
        f"{what}: {path!r} is not a local folder and could not be loaded as a Hugging Face Hub id "
        f"(offline? {reason}); expected {expect}; {hint}"
    )


def _load_config(path: str, is_local: bool, what: str, expect: str, hint: str):
    if is_local:
        cfg_file = Path(path) / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(
                f"{what}: {path!r} has no config.json (found {_listing(Path(path))}); "
                f"expected {expect}; {hint}"
            )
        try:
            raw = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as err:
            msg = f"{what}: {str(cfg_file)!r} is not valid JSON ({err}); expected {expect}"
            raise ValueError(msg) from None
        if not isinstance(raw, dict) or "model_type" not in raw:
            found = sorted(raw)[:12] if isinstance(raw, dict) else type(raw).__name__
            raise ValueError(
                f"{what}: {str(cfg_file)!r} has no 'model_type' (found keys {found}); "
                f"expected {expect}; {hint}"
            )
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise _not_loadable(what, path, is_local, expect, hint, err) from None


def _require_file(
    path: str, is_local: bool, names: tuple[str, ...], what: str, expect: str, hint: str
) -> None:
    if is_local and not any((Path(path) / n).is_file() for n in names):
        raise FileNotFoundError(
            f"{what}: {path!r} has no {' or '.join(names)} (found {_listing(Path(path))}); "
            f"expected {expect}; {hint}"
        )


def _check_weights(path: str, is_local: bool, what: str, expect: str, hint: str) -> None:
    if not is_local:
        return
    p = Path(path)
    if not (any(p.glob("*.safetensors")) or any(p.glob("pytorch_model*.bin"))):
        raise FileNotFoundError(
            f"{what}: {path!r} has no weights (model*.safetensors or pytorch_model*.bin; "
            f"found {_listing(p)}); expected {expect}; {hint}"
        )


def _load_tokenizer(path: str, is_local: bool, what: str, expect: str, hint: str, **kwargs):
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except Exception as err:  # tokenizer conversion raises many types (ValueError, ImportError, OSError...)
        extra = ""
        folder = Path(path)
        if is_local and (folder / "tokenizer.model").is_file() and not (folder / "tokenizer.json").is_file():
            extra = (
                " The folder has only a SentencePiece tokenizer.model (as lmsys/vicuna-*-v1.5): transformers "
                "needs the `sentencepiece` and `protobuf` packages to read it (pip install sentencepiece "
                "protobuf), or pass tokenizer=<folder with a tokenizer.json of the same LLaMA vocabulary, "
                "e.g. llava-hf/llava-1.5-7b-hf>."
            )
        raise ValueError(
            f"{what}: could not load a tokenizer from {path!r} ({type(err).__name__}: {err}).{extra} "
            f"Expected {expect}; {hint}"
        ) from None


def _attach_sentencepiece(tok, path: str, is_local: bool) -> None:
    """Give ``tok`` LLaVA-1.5's text path (:mod:`llava_san.data.llava15_text`) from the checkpoint's
    ``tokenizer.model``; without one, ``tokenization="llava"`` falls back to transformers' tokenizer."""
    folder = Path(path) if is_local else _hub_tokenizer_folder(path)
    if folder is not None and attach_from_folder(tok, folder):
        return
    warnings.warn(
        f"{path!r} has no SentencePiece tokenizer.model: tokenization='llava' uses transformers' "
        "tokenizer, whose ids after '</s>' or a leading space can differ from LLaVA-1.5's (transformers "
        "4.31 slow tokenizer)", UserWarning, stacklevel=3,
    )


def _hub_tokenizer_folder(repo: str) -> Path | None:
    """The local snapshot folder holding a hub checkpoint's ``tokenizer.model`` (fetched if needed)."""
    found = None
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        try:
            path = cached_file(repo, name, _raise_exceptions_for_missing_entries=False)
        except OSError:
            path = None
        if name == "tokenizer.model":
            if path is None:
                return None
            found = Path(path).parent
    return found


def _vision_config(config, path: str):
    if config.model_type == "clip":
        return config.vision_config
    if config.model_type == "clip_vision_model":
        return config
    raise ValueError(
        f"vision tower: {path!r} is a {config.model_type!r} checkpoint "
        f"(architectures={getattr(config, 'architectures', None)}); expected {VT_EXPECT}; {VT_HINT}"
    )


def _feature_layers(vision_feature_layer: Any) -> int | list[int]:
    if isinstance(vision_feature_layer, int):
        return vision_feature_layer
    try:
        layers = [int(x) for x in vision_feature_layer]  # Hydra's ListConfig, tuples
    except TypeError:
        msg = f"vision_feature_layer must be an int or a list of ints, got {vision_feature_layer!r}"
        raise ValueError(msg) from None
    if not layers:
        raise ValueError("vision_feature_layer must not be an empty list")
    return layers


def _check_layers(layers: int | list[int], num_layers: int, where: str) -> None:
    # hidden_states has num_layers + 1 entries (embeddings, then each layer)
    for layer in [layers] if isinstance(layers, int) else layers:
        if not -(num_layers + 1) <= layer <= num_layers:
            raise ValueError(
                f"vision_feature_layer {layer} is out of range for the {num_layers}-layer vision tower "
                f"of {where} (valid: {-(num_layers + 1)}..{num_layers}; LLaVA-1.5 uses -2, "
                "the penultimate layer)"
            )


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _rows(weight: torch.Tensor) -> int:
    """Rows of an embedding / lm_head weight, also when ZeRO-3 partitioned it (an empty placeholder)."""
    return int(getattr(weight, "ds_shape", weight.shape)[0])


def _gathered_for_write(params: list) -> contextlib.AbstractContextManager:
    """Make ZeRO-3 partitioned ``params`` whole for writing; rank 0's values are kept (sent to all).

    Every rank computes the same write (same inputs), so keeping rank 0's loses nothing. A no-op for
    unpartitioned parameters.
    """
    zero = [p for p in params if hasattr(p, "ds_id")]
    if not zero:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(zero, modifier_rank=0)


def _rng_untouched() -> contextlib.AbstractContextManager:
    """Loading a checkpoint leaves the global RNG as it was (CPU, and the current GPU if CUDA is up).

    transformers' ZeRO-3 loading builds the modules on a real device, where tensors made with
    ``torch.randn`` in ``__init__`` (CLIP's ``class_embedding``) draw from the RNG before the checkpoint
    overwrites them; without ZeRO-3 they are made on ``meta`` and draw nothing. Without this, everything
    random after the builder (the projector without ``mm_projector``, LoRA's init) would differ between
    ``zero_init`` and not.
    """
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else [])


def _mean_resize(lm, new_rows: int) -> None:
    """Grow input embeddings and lm_head to ``new_rows``, new rows = mean of the old ones (LLaVA's rule)."""
    old_rows = _rows(lm.get_input_embeddings().weight)
    if new_rows <= old_rows:
        return
    lm.resize_token_embeddings(new_rows, mean_resizing=False)  # gathers by itself under ZeRO-3
    with torch.no_grad():
        modules = (lm.get_input_embeddings(), lm.get_output_embeddings())
        for emb in {id(m): m for m in modules if m is not None}.values():  # once if tied
            w = emb.weight
            with _gathered_for_write([w]):
                w[old_rows:] = w[:old_rows].float().mean(dim=0, keepdim=True).to(w.dtype)


# --------------------------------------------------------------------------------------------------
# consistency check shared by both real-model paths
# --------------------------------------------------------------------------------------------------
def check_model_processor(model: LlavaForConditionalGeneration, processor: Any, source: str = "") -> None:
    """Check that a LLaVA model and its processor agree; raise one ``ValueError`` listing every problem.

    Checked: ``LlavaProcessor``; same ``vision_feature_select_strategy``; ``patch_size`` = the tower's;
    ``<image>`` id of processor, tokenizer and ``config.image_token_id`` equal and inside the embedding;
    pad id defined and inside the embedding; image processor output size = the tower's ``image_size``;
    ``<image>`` tokens per image = patches (+1 for ``full``); ``vision_feature_layer`` within the tower.
    """
    where = f" of {source!r}" if source else ""
    if not isinstance(processor, LlavaProcessor):
        raise ValueError(f"processor{where} is a {type(processor).__name__}, expected a LlavaProcessor")
    cfg = model.config
    vision = cfg.vision_config
    tok = processor.tokenizer
    rows = _rows(model.get_input_embeddings().weight)
    problems = []
    if processor.vision_feature_select_strategy != cfg.vision_feature_select_strategy:
        problems.append(
            "processor vision_feature_select_strategy="
            f"{processor.vision_feature_select_strategy!r} but model config has "
            f"{cfg.vision_feature_select_strategy!r}"
        )
    if processor.patch_size != vision.patch_size:
        problems.append(
            f"processor patch_size={processor.patch_size} but the vision tower's is {vision.patch_size}"
        )
    tok_image_id = tok.convert_tokens_to_ids(processor.image_token)
    if not (processor.image_token_id == tok_image_id == cfg.image_token_id):
        problems.append(
            f"image token {processor.image_token!r}: processor id {processor.image_token_id}, tokenizer id "
            f"{tok_image_id}, model config image_token_id {cfg.image_token_id} (must all be equal)"
        )
    if not 0 <= cfg.image_token_id < rows:
        problems.append(f"image_token_id {cfg.image_token_id} is outside the embedding ({rows} rows)")
    if len(tok) > rows:
        problems.append(f"tokenizer has {len(tok)} tokens but the embedding only {rows} rows")
    if tok.pad_token_id is None:
        problems.append("tokenizer has no pad token")
    elif not 0 <= tok.pad_token_id < rows:
        problems.append(f"pad_token_id {tok.pad_token_id} is outside the embedding ({rows} rows)")
    ip = processor.image_processor
    crop = getattr(ip, "crop_size", None) if getattr(ip, "do_center_crop", False) else None
    if crop:
        out_hw = (crop.get("height"), crop.get("width"))
        if out_hw != (vision.image_size, vision.image_size):
            problems.append(
                f"image processor crops to {out_hw[0]}x{out_hw[1]} but the vision tower takes "
                f"{vision.image_size}x{vision.image_size}"
            )
    if isinstance(processor.patch_size, int) and processor.patch_size > 0:
        patches = (vision.image_size // vision.patch_size) ** 2
        expected = patches + (1 if cfg.vision_feature_select_strategy == "full" else 0)
        produced = (vision.image_size // processor.patch_size) ** 2 + processor.num_additional_image_tokens
        produced -= 1 if processor.vision_feature_select_strategy == "default" else 0
        if produced != expected:
            problems.append(
                f"processor expands <image> to {produced} tokens (num_additional_image_tokens="
                f"{processor.num_additional_image_tokens}) but the model yields {expected} image features "
                "(CLIP has one CLS token: num_additional_image_tokens must be 1)"
            )
    try:
        layers = _feature_layers(cfg.vision_feature_layer)
        _check_layers(layers, vision.num_hidden_layers, source or "the model")
    except ValueError as err:
        problems.append(str(err))
    if problems:
        raise ValueError(f"LLaVA model and processor{where} are inconsistent: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------------
# tiny
# --------------------------------------------------------------------------------------------------
_TS = TinyLlavaSpec()


def build_tiny(
    *,
    image_size: int = _TS.image_size,
    patch_size: int = _TS.patch_size,
    vision_hidden: int = _TS.vision_hidden,
    vision_layers: int = _TS.vision_layers,
    vision_heads: int = _TS.vision_heads,
    text_hidden: int = _TS.text_hidden,
    text_layers: int = _TS.text_layers,
    text_heads: int = _TS.text_heads,
    text_kv_heads: int = _TS.text_kv_heads,
    text_intermediate: int = _TS.text_intermediate,
    vocab_size: int = _TS.vocab_size,
    max_position_embeddings: int = _TS.max_position_embeddings,
    tie_word_embeddings: bool = _TS.tie_word_embeddings,
    seed: int = 0,
    dtype: str | torch.dtype = "float32",
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The random offline tiny LLaVA from plain keyword args (``conf/model/tiny.yaml``).

    Same ``(model, processor)`` as ``build_tiny_llava(TinyLlavaSpec(**shape_kwargs), seed, dtype)``.
    """
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
    spec = TinyLlavaSpec(
        image_size=image_size,
        patch_size=patch_size,
        vision_hidden=vision_hidden,
        vision_layers=vision_layers,
        vision_heads=vision_heads,
        text_hidden=text_hidden,
        text_layers=text_layers,
        text_heads=text_heads,
        text_kv_heads=text_kv_heads,
        text_intermediate=text_intermediate,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
    )
    return build_tiny_llava(spec, seed=seed, dtype=resolve_dtype(dtype))


# --------------------------------------------------------------------------------------------------
# Vicuna + CLIP + mm_projector.bin
# --------------------------------------------------------------------------------------------------
def _projector_file(mm_projector: Any) -> Path:
    text = str(mm_projector)
    p = Path(text).expanduser()
    if p.is_dir():
        f = p / MM_PROJECTOR_FILE
        if not f.is_file():
            raise FileNotFoundError(
                f"mm_projector: folder {text!r} has no {MM_PROJECTOR_FILE} (found {_listing(p)}); "
                f"{PROJ_HINT}"
            )
        return f
    if p.exists():
        return p
    if _HUB_ID.match(text) and not text.startswith((".", "~")):
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(text, MM_PROJECTOR_FILE))
        except Exception as err:
            raise FileNotFoundError(
                f"mm_projector: {text!r} is not a local file or folder and {MM_PROJECTOR_FILE} could not be "
                f"fetched from it as a Hugging Face Hub id (offline? {type(err).__name__}); {PROJ_HINT}"
            ) from None
    raise FileNotFoundError(f"mm_projector: file {text!r} does not exist; {PROJ_HINT}")


def _parts_processor(
    lm: tuple[str, bool],
    vt: tuple[str, bool],
    vision_config,
    *,
    tokenizer: str | None,
    pad_token: str,
    model_max_length: int,
    padding_side: str,
    vision_feature_select_strategy: str,
) -> LlavaProcessor:
    tok_path, tok_local = lm
    if tokenizer is not None:
        tok_path, tok_local = _locate(
            tokenizer, "tokenizer", "a folder with tokenizer files", "pass tokenizer=/path/to/tokenizer"
        )
    tok = _load_tokenizer(
        tok_path, tok_local, "language model tokenizer", LM_EXPECT, LM_HINT,
        model_max_length=model_max_length, padding_side=padding_side,
    )
    _attach_sentencepiece(tok, tok_path, tok_local)
    if tok.convert_tokens_to_ids(IMAGE_TOKEN) in (None, tok.unk_token_id):
        tok.add_special_tokens(
            {"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False
        )
    if pad_token == tok.unk_token:
        tok.pad_token = tok.unk_token  # LLaVA's v1 (Vicuna) choice
    elif tok.convert_tokens_to_ids(pad_token) not in (None, tok.unk_token_id):
        tok.pad_token = pad_token
    else:
        tok.add_special_tokens({"pad_token": pad_token})
    tok.model_max_length = model_max_length
    tok.padding_side = padding_side

    vt_path, vt_local = vt
    _require_file(vt_path, vt_local, ("preprocessor_config.json",), "vision tower", VT_EXPECT, VT_HINT)
    try:
        image_processor = load_clip_image_processor(vt_path)
    except Exception as err:
        what = "vision tower image processor"
        raise _not_loadable(what, vt_path, vt_local, VT_EXPECT, VT_HINT, err) from None
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
    lm = _locate(language_model, "language model", LM_EXPECT, LM_HINT)
    vt = _locate(vision_tower, "vision tower", VT_EXPECT, VT_HINT)
    vision_config = _vision_config(_load_config(*vt, "vision tower", VT_EXPECT, VT_HINT), vt[0])
    return _parts_processor(
        lm, vt, vision_config, tokenizer=tokenizer, pad_token=pad_token, model_max_length=model_max_length,
        padding_side=padding_side, vision_feature_select_strategy=vision_feature_select_strategy,
    )


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
    if vision_feature_select_strategy not in ("default", "full"):
        raise ValueError(
            "vision_feature_select_strategy must be 'default' (patch tokens) or 'full', "
            f"got {vision_feature_select_strategy!r}"
        )
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    layers = _feature_layers(vision_feature_layer)
    single = isinstance(device_map, (str, torch.device)) and str(device_map) not in _MULTI
    if device_map is not None and not single:
        raise ValueError(
            f"device_map={device_map!r}: build_llava_from_parts loads onto one device (e.g. 'cuda', "
            "'cuda:0', 'cpu'); to shard across devices, save_pretrained the assembled model and load it "
            "with load_llava_hf"
        )
    if dtype is not None and str(dtype).lower() != "auto":
        resolve_dtype(dtype)  # fail fast on a typo

    # ---- configs first: cheap, and every mismatch is reported before any weight is read ----------
    lm_path, lm_local = _locate(language_model, "language model", LM_EXPECT, LM_HINT)
    lm_config = _load_config(lm_path, lm_local, "language model", LM_EXPECT, LM_HINT)
    if lm_config.model_type == "llava":
        raise ValueError(
            f"language model: {lm_path!r} is a LLaVA (llava-hf) checkpoint, not a Vicuna/LLaMA one; "
            f"load it with load_llava_hf (model=llava7b_hf) or pass {LM_EXPECT}"
        )
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(lm_config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(
            f"language model: {lm_path!r} is a {lm_config.model_type!r} checkpoint "
            f"(architectures={getattr(lm_config, 'architectures', None)}), not a causal LM; "
            f"expected {LM_EXPECT}; {LM_HINT}"
        )
    _check_weights(lm_path, lm_local, "language model", LM_EXPECT, LM_HINT)
    torch_dtype = resolve_dtype(dtype, auto=getattr(lm_config, "dtype", None))

    vt_path, vt_local = _locate(vision_tower, "vision tower", VT_EXPECT, VT_HINT)
    vt_config = _load_config(vt_path, vt_local, "vision tower", VT_EXPECT, VT_HINT)
    vision_config = _vision_config(vt_config, vt_path)
    _check_weights(vt_path, vt_local, "vision tower", VT_EXPECT, VT_HINT)
    if image_size is not None and int(image_size) != vision_config.image_size:
        raise ValueError(
            f"image_size={image_size} but the vision tower {vt_path!r} takes "
            f"{vision_config.image_size}px images (CLIP's position embeddings fix the resolution); "
            "drop image_size or pass the matching tower"
        )
    _check_layers(layers, vision_config.num_hidden_layers, vt_path)
    n_feature_layers = 1 if isinstance(layers, int) else len(layers)

    projector_state = None
    if mm_projector is not None and str(mm_projector).strip():
        projector_state = load_mm_projector(
            _projector_file(mm_projector), vision_config.hidden_size * n_feature_layers, lm_config.hidden_size
        )

    # ---- tokenizer and image processor --------------------------------------------------------------
    processor = _parts_processor(
        (lm_path, lm_local), (vt_path, vt_local), vision_config, tokenizer=tokenizer, pad_token=pad_token,
        model_max_length=model_max_length, padding_side=padding_side,
        vision_feature_select_strategy=vision_feature_select_strategy,
    )
    tok = processor.tokenizer
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)

    # ---- weights: each part loaded once ---------------------------------------------------------------
    load_kw = dict(dtype=torch_dtype, attn_implementation=attn_implementation)
    if device_map is not None:
        load_kw["device_map"] = device_map
    try:
        with _rng_untouched():
            lm = AutoModelForCausalLM.from_pretrained(lm_path, **load_kw)
    except (OSError, ValueError) as err:
        raise _not_loadable("language model", lm_path, lm_local, LM_EXPECT, LM_HINT, err) from None
    try:
        # A CLIPModel checkpoint also holds the text tower: its keys are "unexpected" for the vision model
        # and transformers would print a table of them; missing/mismatched vision keys are checked below.
        with _quiet_transformers(), _rng_untouched():
            vision, info = CLIPVisionModel.from_pretrained(vt_path, output_loading_info=True, **load_kw)
    except (OSError, ValueError) as err:
        raise _not_loadable("vision tower", vt_path, vt_local, VT_EXPECT, VT_HINT, err) from None
    if info.get("missing_keys") or info.get("mismatched_keys"):
        raise ValueError(
            f"vision tower: {vt_path!r} lacks vision weights: missing "
            f"{sorted(info.get('missing_keys', []))[:8]}, "
            f"mismatched {list(info.get('mismatched_keys', []))[:8]}; expected {VT_EXPECT}"
        )

    _mean_resize(lm, len(tok))
    rows = _rows(lm.get_input_embeddings().weight)
    lm.config.vocab_size = rows
    lm.config.pad_token_id = tok.pad_token_id

    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision.config,
        text_config=lm.config,
        image_token_id=image_token_id,
        image_seq_length=patches + (1 if vision_feature_select_strategy == "full" else 0),
        projector_hidden_act=projector_hidden_act,
        vision_feature_layer=layers,
        vision_feature_select_strategy=vision_feature_select_strategy,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)),
        pad_token_id=tok.pad_token_id,
    )
    config._attn_implementation = attn_implementation
    config.dtype = torch_dtype

    zero3 = zero3_config()
    with torch.device("meta"), without_hf_zero3():  # a shell only; ZeRO-3 cannot partition meta tensors
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = vision
    model.model.language_model = lm.get_decoder() if not hasattr(lm, "model") else lm.model
    model.lm_head = lm.get_output_embeddings()
    # the loaded weights' device and dtype (= device_map and dtype; under ZeRO-3 DeepSpeed's precision)
    like = model.lm_head.weight
    # real init, whole (small; partitioned below under ZeRO-3): nn.Linear default, like LLaVA's
    projector = LlavaMultiModalProjector(config)
    if projector_state is not None:
        projector.load_state_dict({k: v.float() for k, v in projector_state.items()})
    else:
        warnings.warn(
            "build_llava_from_parts: mm_projector is None, the projector is randomly initialised "
            "(stage-1 from scratch); pass the stage-1 mm_projector.bin for the LLaVA-1.5 LoRA recipe",
            UserWarning,
            stacklevel=2,
        )
    model.model.multi_modal_projector = projector.to(device=like.device, dtype=like.dtype)
    del lm
    if zero3 is not None:  # the projector and the resized embedding / lm_head join the partitioned rest
        zero3_partition(model, zero3)

    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:  # a transformers change in the module layout; better to stop than train garbage
        raise RuntimeError(f"build_llava_from_parts: parameters left on the meta device: {leftover[:8]}")
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.eval()

    check_model_processor(model, processor, source=f"{lm_path} + {vt_path}")
    return model, processor


# --------------------------------------------------------------------------------------------------
# llava-hf
# --------------------------------------------------------------------------------------------------
def _llava_hf_config(path: str) -> tuple[str, bool, Any]:
    p, local = _locate(path, "llava-hf checkpoint", HF_EXPECT, HF_HINT)
    config = _load_config(p, local, "llava-hf checkpoint", HF_EXPECT, HF_HINT)
    if config.model_type != "llava":
        hint = ""
        if config.model_type == "llama":
            hint = " (a Vicuna/LLaMA folder: build the model with build_llava_from_parts)"
        raise ValueError(
            f"llava-hf checkpoint: {p!r} is not a LLaVA checkpoint: its config.json has model_type="
            f"{config.model_type!r}, architectures={getattr(config, 'architectures', None)}{hint}; "
            f"expected {HF_EXPECT}"
        )
    return p, local, config


def _llava_hf_processor(
    p: str, local: bool, config, model_max_length: int | None, padding_side: str | None
) -> LlavaProcessor:
    if padding_side not in (None, "left", "right"):
        raise ValueError(f"padding_side must be 'left', 'right' or None, got {padding_side!r}")
    what = "llava-hf checkpoint"
    _require_file(p, local, ("processor_config.json", "preprocessor_config.json"), what, HF_EXPECT, HF_HINT)
    _require_file(p, local, ("tokenizer.json", "tokenizer.model"), what, HF_EXPECT, HF_HINT)
    try:
        processor = AutoProcessor.from_pretrained(p)
    except Exception as err:
        raise _not_loadable("llava-hf processor", p, local, HF_EXPECT, HF_HINT, err) from None
    if not isinstance(processor, LlavaProcessor):
        raise ValueError(
            f"llava-hf checkpoint: {p!r} has a {type(processor).__name__} processor, "
            "expected a LlavaProcessor"
        )
    pin_pil_backend(processor)
    _attach_sentencepiece(processor.tokenizer, p, local)
    legacy = []
    if processor.patch_size is None:
        processor.patch_size = config.vision_config.patch_size
        processor.num_additional_image_tokens = 1  # CLIP's CLS
        legacy += ["patch_size", "num_additional_image_tokens"]
    if processor.vision_feature_select_strategy is None:
        processor.vision_feature_select_strategy = config.vision_feature_select_strategy
        legacy.append("vision_feature_select_strategy")
    if legacy:
        msg = f"llava-hf processor of {p!r} lacks {legacy}; taken from the model config"
        warnings.warn(msg, UserWarning, stacklevel=3)
    tok = processor.tokenizer
    if tok.pad_token is None:
        msg = f"llava-hf tokenizer of {p!r} has no pad token; using {tok.unk_token!r} (as LLaVA)"
        warnings.warn(msg, UserWarning, stacklevel=3)
        tok.pad_token = tok.unk_token
    if model_max_length is not None:
        tok.model_max_length = model_max_length
    if padding_side is not None:
        tok.padding_side = padding_side
    return processor


def load_llava_hf_processor(
    path: str, *, model_max_length: int | None = 2048, padding_side: str | None = "right"
) -> LlavaProcessor:
    """The processor :func:`load_llava_hf` returns for the same arguments, without loading weights."""
    p, local, config = _llava_hf_config(path)
    return _llava_hf_processor(p, local, config, model_max_length, padding_side)


def load_llava_hf(
    path: str,
    *,
    dtype: str | torch.dtype = "bfloat16",
    attn_implementation: str = "sdpa",
    model_max_length: int | None = 2048,
    padding_side: str | None = "right",
    device_map: str | dict | None = None,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Load a llava-hf checkpoint (``llava-hf/llava-1.5-7b-hf`` format) and check it is consistent.

    Args:
        path: folder or hub id with a ``LlavaForConditionalGeneration`` config + weights + processor
            files (``save_pretrained`` layout, or the hub's transformers-4 layout).
        dtype: ``"bfloat16"``, ``"float16"``, ``"float32"`` or ``"auto"`` (the checkpoint's).
        attn_implementation: ``"sdpa"``, ``"eager"``, ``"flash_attention_2"``...
        model_max_length: set on the tokenizer (``None`` keeps the checkpoint's).
        padding_side: set on the tokenizer (``None`` keeps the checkpoint's; ``"left"`` for batched
            generation).
        device_map: forwarded to ``from_pretrained``.

    Processors saved before llava-hf added ``patch_size`` / ``vision_feature_select_strategy`` /
    ``num_additional_image_tokens`` get them from the model config (with a warning); real conflicts
    raise ``ValueError`` (see :func:`check_model_processor`).
    """
    if dtype is not None and str(dtype).lower() != "auto":
        resolve_dtype(dtype)
    p, local, config = _llava_hf_config(path)
    _check_weights(p, local, "llava-hf checkpoint", HF_EXPECT, HF_HINT)
    processor = _llava_hf_processor(p, local, config, model_max_length, padding_side)
    ckpt_dtype = getattr(config.text_config, "dtype", None) or getattr(config, "dtype", None)
    load_kw = dict(dtype=resolve_dtype(dtype, auto=ckpt_dtype), attn_implementation=attn_implementation)
    if device_map is not None:
        load_kw["device_map"] = device_map
    try:
        with _rng_untouched():
            model = LlavaForConditionalGeneration.from_pretrained(p, **load_kw)
    except (OSError, ValueError) as err:
        raise _not_loadable("llava-hf checkpoint", p, local, HF_EXPECT, HF_HINT, err) from None
    check_model_processor(model, processor, source=p)
    model.eval()
    return model, processor

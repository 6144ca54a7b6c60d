"""LLaMA-family causal LMs (LLaMA-1/2/3): ``(LlamaForCausalLM, tokenizer)`` for ``conf/model/llama*.yaml``.

* :func:`load_llama` - a ``save_pretrained`` / Hub checkpoint (``yahma/llama-7b-hf``,
  ``meta-llama/Llama-2-7b-hf``, ``meta-llama/Meta-Llama-3-8B``, or a local folder in that layout);
  :func:`load_llama_tokenizer` is its tokenizer alone (the datamodule's ``processor``).
* :func:`build_tiny_causal_lm` - a random tiny LLaMA with a small offline BPE tokenizer trained on the
  Alpaca prompt and the ``csr_tiny`` vocabulary (``conf/model/tiny_llama.yaml``, the CPU path).

For a causal LM the "processor" of the training code is the tokenizer itself. Padding follows
LLM-Adapters' ``finetune.py`` (``tokenizer.pad_token_id = 0``, "unk, different from the eos token"):
a tokenizer without a pad token gets its ``<unk>`` (id 0 for LLaMA-1/2) as pad; one without ``<unk>``
either (LLaMA-3) gets its eos. Padded positions are masked (attention mask, ``-100`` labels), so the pad
id never reaches the loss.

:func:`export_causal_lm` writes the merged plain ``LlamaForCausalLM`` + tokenizer (what
``AutoModelForCausalLM.from_pretrained`` loads).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaTokenizer

from ..distributed import zero3
from .source import SourceKind, resolve_dtype, rng_untouched

LLAMA = SourceKind(
    "LLaMA checkpoint",
    "a LLaMA-family causal LM folder (config.json with model_type 'llama', model*.safetensors or "
    "pytorch_model*.bin, tokenizer files), e.g. yahma/llama-7b-hf, meta-llama/Llama-2-7b-hf, "
    "meta-llama/Meta-Llama-3-8B",
    "e.g. model.build.path=/path/to/llama-7b-hf",
)

__all__ = ["LLAMA", "build_tiny_causal_lm", "check_same_tokenizer", "export_causal_lm",
           "export_causal_lm_from_adapter", "is_causal_lm", "load_llama", "load_llama_tokenizer",
           "text_tokenizer", "tiny_causal_lm_tokenizer"]


def text_tokenizer(processor: Any) -> Any:
    """The tokenizer of a LLaVA processor, or ``processor`` itself when it is a tokenizer."""
    return getattr(processor, "tokenizer", processor)


def is_causal_lm(model: torch.nn.Module) -> bool:
    """Whether ``model`` (or the transformers model inside a peft wrapper) is a text-only causal LM
    (no vision tower, no projector)."""
    from ..peft.adapters import base_transformers_model

    cfg = getattr(base_transformers_model(model), "config", None)
    return cfg is not None and getattr(cfg, "vision_config", None) is None


def _prepare_tokenizer(tok: Any, model_max_length: Optional[int], padding_side: Optional[str]) -> Any:
    if padding_side not in (None, "left", "right"):
        raise ValueError(f"padding_side must be 'left', 'right' or None, got {padding_side!r}")
    if tok.pad_token is None:  # LLM-Adapters: pad = unk (id 0); LLaMA-3 has no unk: eos
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    if model_max_length is not None:
        tok.model_max_length = int(model_max_length)
    if padding_side is not None:
        tok.padding_side = padding_side
    return tok


def load_llama_tokenizer(path: str, *, tokenizer: Optional[str] = None, model_max_length: Optional[int] = 256,
                         padding_side: Optional[str] = "right") -> Any:
    """The tokenizer of a LLaMA checkpoint (``tokenizer``: another folder/hub id with the same vocabulary)."""
    src = LLAMA.locate(tokenizer or path)
    src.require("tokenizer.json", "tokenizer.model")
    try:
        tok = AutoTokenizer.from_pretrained(src.path)
    except Exception as err:  # conversion raises many types
        raise src.not_loadable(err) from None
    return _prepare_tokenizer(tok, model_max_length, padding_side)


def load_llama(path: str, *, dtype: str | torch.dtype = "bfloat16", attn_implementation: str = "sdpa",
               tokenizer: Optional[str] = None, model_max_length: Optional[int] = 256,
               padding_side: Optional[str] = "right", device_map: Any = None) -> tuple[LlamaForCausalLM, Any]:
    """Load a LLaMA-family checkpoint and its tokenizer; checks they fit (vocabulary within the embeddings).

    Args:
        path: local folder or hub id (``save_pretrained`` layout).
        dtype: ``"bfloat16"`` (default), ``"float16"``, ``"float32"`` or ``"auto"`` (the checkpoint's).
        tokenizer: optional other tokenizer source (default: ``path``).
        model_max_length, padding_side: set on the tokenizer (``None`` keeps the checkpoint's).
    """
    src = LLAMA.locate(path)
    config = src.config()
    if config.model_type != "llama":
        raise src.error(f"{src.path!r} has model_type={config.model_type!r} "
                        f"(architectures={getattr(config, 'architectures', None)}), not a LLaMA causal LM")
    src.require_weights()
    tok = load_llama_tokenizer(path, tokenizer=tokenizer, model_max_length=model_max_length,
                               padding_side=padding_side)
    load_kw: dict[str, Any] = dict(dtype=resolve_dtype(dtype, auto=getattr(config, "dtype", None)),
                                   attn_implementation=attn_implementation)
    if device_map is not None:
        load_kw["device_map"] = device_map
    try:
        with rng_untouched():
            model = LlamaForCausalLM.from_pretrained(src.path, **load_kw)
    except (OSError, ValueError) as err:
        raise src.not_loadable(err) from None
    if len(tok) > model.config.vocab_size:
        raise ValueError(f"{src.path!r}: the tokenizer has {len(tok)} tokens but the model's embeddings "
                         f"only {model.config.vocab_size}")
    model.eval()
    return model, tok


# ---------------------------------------------------------------------------------------- tiny
#: The fixed phrases of the tiny tokenizer's corpus besides csr_tiny's records (LLM-Adapters' answer styles).
_TINY_PHRASES = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.",
    "### Instruction:", "### Input:", "### Response:", "the correct answer is",
    "true false solution1 solution2 answer1 answer2 answer3 answer4 answer5 ending1 ending2 ending3 ending4 "
    "option1 option2 Answer format:",
]


@functools.lru_cache(maxsize=4)
def _tiny_bpe(vocab_size: int) -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    import json

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    from ..data.commonsense_synthetic import tokenizer_corpus
    from .tokenizer import BASE_SPECIAL, BYTE_TOKENS

    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # training "words": a run of spaces (but its last, which prefixes the next word), a ▁-prefixed word,
    # newlines -- so the prompt's 16-space indents become one or two tokens, as LLaMA's SentencePiece
    # vocabulary has whitespace runs, while merges never cross a word
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False),
        pre_tokenizers.Split(Regex("▁+(?=▁)|▁?[^▁\n]+|▁|\n+"), behavior="isolated")])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=BASE_SPECIAL + BYTE_TOKENS,
                                  show_progress=False, min_frequency=1)
    bpe.train_from_iterator(_TINY_PHRASES + tokenizer_corpus(), trainer=trainer)
    vocab = bpe.get_vocab(with_added_tokens=False)
    merges = json.loads(bpe.to_str())["model"]["merges"]
    merges = tuple(tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges)
    return tuple(sorted(vocab.items(), key=lambda kv: kv[1])), merges


def tiny_causal_lm_tokenizer(vocab_size: int = 1024, model_max_length: int = 256) -> LlamaTokenizer:
    """The tiny LLaMA's offline tokenizer: a LLaMA-style BPE (``<unk>=0, <s>=1, </s>=2``, byte fallback,
    ``<s>`` prepended, no ``</s>`` appended) trained on the Alpaca prompt and csr_tiny's vocabulary,
    plus ``<pad>``. Deterministic."""
    if vocab_size < 300:
        raise ValueError(f"vocab_size must be >= 300 (3 specials + 256 bytes + merges), got {vocab_size}")
    vocab, merges = _tiny_bpe(int(vocab_size))
    tok = LlamaTokenizer(vocab=dict(vocab), merges=[tuple(m) for m in merges], add_bos_token=True,
                         add_eos_token=False, legacy=False, model_max_length=model_max_length,
                         padding_side="right")
    tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


def build_tiny_causal_lm(*, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 4,
                         intermediate: int = 128, vocab_size: int = 1024, max_position_embeddings: int = 512,
                         model_max_length: int = 256, initializer_range: float = 0.02, seed: int = 0,
                         dtype: str | torch.dtype = "float32") -> tuple[LlamaForCausalLM, LlamaTokenizer]:
    """A random tiny ``LlamaForCausalLM`` and its tokenizer (:func:`tiny_causal_lm_tokenizer`),
    deterministic for ``seed`` (the global RNG untouched). Under ZeRO-3 construction it comes back
    partitioned, like the tiny LLaVA.

    ``initializer_range``: std of the random weights (transformers' 0.02 by default). A frozen base needs
    more for PEFT to learn anything: the final RMSNorm and ``lm_head`` stay frozen, so a logit can be at
    most about ``hidden * initializer_range`` (1.3 at 64 x 0.02: near-uniform predictions whatever the
    adapters do); ``conf/model/tiny_llama.yaml`` uses a larger value."""
    tok = tiny_causal_lm_tokenizer(vocab_size, model_max_length)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
                         initializer_range=float(initializer_range))
    zconf = zero3.hf_zero3_config()
    with torch.random.fork_rng(devices=[]), zero3.without_hf_zero3():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.to(resolve_dtype(dtype))
    if zconf is not None:
        zero3.partition(model, zconf)
    model.eval()
    return model, tok


def tiny_causal_lm_processor(vocab_size: int = 1024, model_max_length: int = 256, **_: Any) -> LlamaTokenizer:
    """The tiny LLaMA's tokenizer from ``build_tiny_causal_lm``'s keywords (others ignored), for the
    datamodule before the model exists."""
    return tiny_causal_lm_tokenizer(vocab_size, model_max_length)


# ---------------------------------------------------------------------------------------- checks / export
def check_same_tokenizer(data_tok: Any, model_tok: Any) -> None:
    """Raise ``ValueError`` if the data was tokenized with a tokenizer that does not fit the model's
    (vocabulary size, pad/bos/eos ids)."""
    if model_tok is None:
        return
    a, b = text_tokenizer(data_tok), text_tokenizer(model_tok)
    diffs = [f"vocabulary size {len(a)} vs {len(b)}"] if len(a) != len(b) else []
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if getattr(a, attr) != getattr(b, attr):
            diffs.append(f"{attr} {getattr(a, attr)} vs {getattr(b, attr)}")
    if diffs:
        raise ValueError("the data tokenizer (model.processor) does not match the model's: " + "; ".join(diffs))


def _save_causal_lm(model: torch.nn.Module, tokenizer: Any, directory: str | os.PathLike) -> Path:
    from ..utils.atomic import atomic_dir

    with atomic_dir(directory) as tmp:
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            text_tokenizer(tokenizer).save_pretrained(str(tmp))
    return Path(directory)


def export_causal_lm(model: torch.nn.Module, tokenizer: Any, directory: str | os.PathLike,
                     adapter: Any = None) -> Path:
    """The merged plain ``LlamaForCausalLM`` (adapters and SAN folded in by the recipe's ``merge``) and
    the tokenizer, written atomically; ``model`` is consumed when it is a ``PeftModel``."""
    from ..peft.recipes import LoraRecipe

    if zero3.any_partitioned(model):
        raise ValueError("export_causal_lm: the model is partitioned by ZeRO-3; use export_causal_lm_from_adapter")
    merge = adapter.merge if adapter is not None else LoraRecipe.merge
    return _save_causal_lm(merge(model), tokenizer, directory)


def export_causal_lm_from_adapter(model_factory: Any, adapter_dir: str | os.PathLike, tokenizer: Any,
                                  directory: str | os.PathLike) -> Path:
    """The merged checkpoint rebuilt from a saved adapter on a fresh base (the ZeRO-3 route)."""
    from ..peft import apply_adapter_folder

    built = model_factory()
    base, built_tok = built if isinstance(built, tuple) else (built, None)
    plain = apply_adapter_folder(base, adapter_dir, merge=True)
    return _save_causal_lm(plain, tokenizer if tokenizer is not None else built_tok, directory)

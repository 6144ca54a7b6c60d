"""A LLaMA-style tokenizer made offline, for the tiny test/demo model.

Real LLaVA-1.5 uses the LLaMA/Vicuna SentencePiece tokenizer: BPE over ``▁``-prefixed pieces with
byte fallback, ``<unk>=0, <s>=1, </s>=2``, the 256 byte pieces ``<0x00>..<0xFF>`` at ids 3..258, a
``<s>`` prepended to every encoded text and no ``</s>`` appended. This module trains a small BPE with
exactly that pipeline on a fixed built-in corpus (the Vicuna system prompt, the LLaVA prompt phrases
and the easy-vqa questions and answers) and wraps it in transformers' own ``LlamaTokenizer``, so the
data pipeline sees the same tokenization quirks as with the real checkpoint (``"▁ASSISTANT"`` vs
``"ASSISTANT"``, leading-space handling, byte fallback for unseen characters).

``<image>`` and ``<pad>`` are added as special tokens after the base vocabulary, as llava-hf does.
Training is deterministic, so two builds give identical ids.
"""
from __future__ import annotations

import functools
import json

from sentencepiece import sentencepiece_model_pb2 as sp_pb
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaTokenizer

from ..data.llava15_text import Llava15TextTokenizer, attach

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]
BASE_SPECIAL = ["<unk>", "<s>", "</s>"]

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

_PHRASES = [
    VICUNA_SYSTEM,
    "USER: ASSISTANT: USER:ASSISTANT:",
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
    "When the provided information is insufficient, respond with 'Unanswerable'.",
    "Reference OCR token: Is there a in the image? Please answer yes or no.",
    "What is the color of the shape? Describe the image concisely. Provide a one-sentence caption.",
    "Context: Options: A. B. C. D. E. Hint: Question:",
]


def _corpus() -> list[str]:
    """The fixed training corpus: prompt phrases plus every easy-vqa question and answer."""
    from easy_vqa import get_answers, get_test_questions, get_train_questions

    texts = list(_PHRASES)
    for questions, answers, _ in (get_train_questions(), get_test_questions()):
        texts.extend(sorted(set(questions)))
        texts.extend(sorted(set(answers)))
    texts.extend(get_answers())
    texts.extend(str(i) for i in range(100))
    return texts


@functools.lru_cache(maxsize=4)
def _train_bpe(vocab_size: int) -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # split=True while training keeps merges inside words, as SentencePiece does; LlamaTokenizer
    # then applies them with split=False exactly like the real checkpoint.
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=BASE_SPECIAL + BYTE_TOKENS,
        show_progress=False,
        min_frequency=1,
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    model = bpe.model
    vocab = bpe.get_vocab(with_added_tokens=False)
    # tokenizers keeps merges in the serialized model; read them back in rank order.
    merges = json.loads(bpe.to_str())["model"]["merges"]
    merges = tuple(tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges)
    del model
    return tuple(sorted(vocab.items(), key=lambda kv: kv[1])), merges


def base_tiny_tokenizer(vocab_size: int = 1024, model_max_length: int = 2048) -> LlamaTokenizer:
    """The tiny BPE as a transformers ``LlamaTokenizer`` with only ``<unk>, <s>, </s>`` (a Vicuna-like
    tokenizer), its SentencePiece twin attached (:func:`attach_tiny_sentencepiece`).

    Args:
        vocab_size: size of the BPE vocabulary (≥ 300).
        model_max_length: stored on the tokenizer.
    """
    if vocab_size < 300:
        raise ValueError(f"vocab_size must be >= 300 (3 specials + 256 bytes + merges), got {vocab_size}")
    vocab, merges = _train_bpe(vocab_size)
    tok = LlamaTokenizer(
        vocab=dict(vocab),
        merges=[tuple(m) for m in merges],
        add_bos_token=True,
        add_eos_token=False,
        legacy=False,
        model_max_length=model_max_length,
        padding_side="right",
    )
    return attach_tiny_sentencepiece(tok, vocab_size)


def build_tiny_tokenizer(vocab_size: int = 1024, model_max_length: int = 2048) -> LlamaTokenizer:
    """Build the offline LLaMA-style tokenizer (``<s>``, ``</s>``, ``<unk>``, ``<image>``, ``<pad>``).

    Args:
        vocab_size: size of the BPE vocabulary before ``<image>`` and ``<pad>`` are added (≥ 300).
        model_max_length: stored on the tokenizer, as LLaVA sets it (2048 for LLaVA-1.5).
    """
    tok = base_tiny_tokenizer(vocab_size, model_max_length)
    tok.add_special_tokens({"pad_token": PAD_TOKEN, "additional_special_tokens": [IMAGE_TOKEN]})
    return tok


@functools.lru_cache(maxsize=4)  # bytes: immutable, built once per size
def tiny_sentencepiece_model(vocab_size: int = 1024) -> bytes:
    """The tiny BPE as a SentencePiece ``tokenizer.model`` (LLaMA's settings), serialized.

    SentencePiece's BPE merges the adjacent pair whose joined piece has the highest score, so each
    merged piece gets ``-rank`` of the merge that made it: the merge order of the ``tokenizers`` model
    above. Normalisation is LLaMA's: identity, a dummy ``▁`` prefix, spaces kept, byte fallback.
    """
    vocab, merges = _train_bpe(vocab_size)
    merge_score = {a + b: -float(rank) for rank, (a, b) in enumerate(merges)}
    proto = sp_pb.ModelProto()
    piece_type = sp_pb.ModelProto.SentencePiece.Type
    for piece, _ in vocab:  # vocab is sorted by id, so piece k gets id k
        entry = proto.pieces.add()
        entry.piece = piece
        if piece == "<unk>":
            entry.type = piece_type.UNKNOWN
        elif piece in ("<s>", "</s>"):
            entry.type = piece_type.CONTROL
        elif piece in BYTE_TOKENS:
            entry.type = piece_type.BYTE
        else:
            entry.type = piece_type.NORMAL
            entry.score = merge_score.get(piece, -float(len(merges)))
    spec = proto.trainer_spec
    spec.model_type = sp_pb.TrainerSpec.BPE
    spec.vocab_size = len(vocab)
    spec.byte_fallback = True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = 0, 1, 2, -1
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = True
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto.SerializeToString()


def attach_tiny_sentencepiece(tokenizer, vocab_size: int = 1024):
    """Attach the tiny SentencePiece model as the tokenizer's LLaVA-1.5 text path (``legacy`` unset).

    ``legacy`` unset is what a tokenizer_config.json without the key gives, as the tiny tokenizer
    saves it: transformers 4.31 read it as ``True`` (a ``▁`` after ``</s>``), like LLaMA-1 era configs.
    """
    return attach(tokenizer, Llava15TextTokenizer(tiny_sentencepiece_model(vocab_size), legacy=None,
                                                  source="tiny tokenizer"))

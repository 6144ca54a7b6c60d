"""LLaVA-1.5's text tokenization on a SentencePiece model trained with LLaMA's settings.

The ground truth is ``sentencepiece`` itself, run the way transformers 4.31's slow ``LlamaTokenizer``
ran it (each text between special tokens encoded separately, dummy ``▁`` prefix included), and the
ids are checked through the real ``model=llava7b`` processor path built by Hydra.
"""
import io
import json
import pickle
from pathlib import Path

import pytest
import sentencepiece as spm
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from llava_san.conversation import get_template
from llava_san.data import LlavaPreprocessor, tokenize_prompt
from llava_san.data.llava15_text import Llava15TextTokenizer, attach_from_folder, attached, save_attached
from llava_san.testing.checkpoints import write_tiny_clip, write_tiny_vicuna

CONF = Path(__file__).resolve().parents[2] / "conf"
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
CORPUS = [SYSTEM, "USER: ASSISTANT: What is the colour of the shape? Answer the question using a single word "
          "or phrase.", "Is there a red circle in the image? Please answer yes or no.", "The answer is 42 or 1234.",
          "blue green red yellow gray teal brown black circle rectangle triangle yes no",
          "Describe the image concisely. Provide a one-sentence caption for the provided image."] * 20


@pytest.fixture(scope="module")
def sp_model() -> bytes:
    """A BPE SentencePiece model trained with LLaMA's trainer settings."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=out, model_type="bpe", vocab_size=400,
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    )
    return out.getvalue()


def vicuna_folder(root: Path, sp_model: bytes, legacy) -> Path:
    """A Vicuna v1.5-format tokenizer folder: tokenizer.model + its two JSON files, no tokenizer.json."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer.model").write_bytes(sp_model)
    added = lambda t: {"__type": "AddedToken", "content": t, "lstrip": False, "normalized": False,  # noqa: E731
                       "rstrip": False, "single_word": False}
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": added("<s>"),
              "eos_token": added("</s>"), "unk_token": added("<unk>"), "pad_token": None,
              "clean_up_tokenization_spaces": False, "model_max_length": 4096, "padding_side": "right",
              "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer"}
    if legacy is not None:
        config["legacy"] = legacy
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    (root / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": added("<s>"), "eos_token": added("</s>"), "unk_token": added("<unk>")}))
    return root


def reference_ids(sp: spm.SentencePieceProcessor, text: str, legacy: bool) -> list[int]:
    """4.31's slow tokenizer, written out independently: split at </s>, encode each run with
    sentencepiece; non-legacy drops the dummy '▁' of runs that follow </s> without a space."""
    ids = [1]
    for k, run in enumerate(text.split("</s>")):
        if k:
            ids.append(2)
        if not run:
            continue
        pieces = sp.encode(run, out_type=str)
        if not legacy and k and not run.startswith(" ") and pieces[0].startswith("▁"):
            pieces = ([pieces[0][1:]] if len(pieces[0]) > 1 else []) + pieces[1:]
        ids.extend(sp.piece_to_id(p) for p in pieces)
    return ids


TEXTS = [
    SYSTEM + " USER: What is the colour? ASSISTANT: blue</s>USER: Is it round? ASSISTANT: no</s>",
    " leading space and  two spaces", "</s> after a separator with a space", "digits 1234 and ümlaut 😀",
    "ASSISTANT: red</s>USER:",
]


@pytest.mark.parametrize("legacy", [None, True, False])
def test_equals_sentencepiece_ground_truth(sp_model, tmp_path, legacy):
    tok = Llava15TextTokenizer.from_folder(vicuna_folder(tmp_path, sp_model, legacy))
    assert tok.legacy is (legacy is not False)  # 4.31: an unset flag is legacy
    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    for text in TEXTS:
        assert tok(text).input_ids == reference_ids(sp, text, tok.legacy), text


def test_legacy_flag_decides_the_piece_after_eos(sp_model, tmp_path):
    """Exact pieces: legacy keeps SentencePiece's '▁' before USER after </s>, non-legacy strips it."""
    text = "ASSISTANT: red</s>USER:"
    legacy = Llava15TextTokenizer.from_folder(vicuna_folder(tmp_path / "a", sp_model, True))
    strict = Llava15TextTokenizer.from_folder(vicuna_folder(tmp_path / "b", sp_model, False))
    after_eos = lambda t: t.convert_ids_to_tokens(t(text).input_ids)[t(text).input_ids.index(2) + 1]  # noqa: E731
    assert after_eos(legacy).startswith("▁")
    assert not after_eos(strict).startswith("▁")


@pytest.fixture(scope="module")
def llava7b_processor(tmp_path_factory, sp_model):
    """``model=llava7b``'s processor (Hydra-built) on a Vicuna folder whose tokenizer.model is ``sp_model``."""
    root = tmp_path_factory.mktemp("ckpt")
    vicuna = write_tiny_vicuna(root / "vicuna", tokenizer_legacy=None)
    vicuna_folder(vicuna, sp_model, None)  # the LLaMA-trained SentencePiece model replaces the tiny one
    (vicuna / "tokenizer.json").unlink()  # as lmsys/vicuna-*-v1.5: transformers converts tokenizer.model
    clip = write_tiny_clip(root / "clip")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "model=llava7b", f"model.build.language_model={vicuna}", f"model.build.vision_tower={clip}"])
    return instantiate(cfg.model.processor)


def test_llava7b_processor_tokenizes_like_llava15(llava7b_processor, sp_model):
    processor = llava7b_processor
    assert isinstance(attached(processor.tokenizer), Llava15TextTokenizer)
    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    template = get_template("vicuna_v1")
    turns = [("human", "<image>\nWhat is the colour?"), ("gpt", "blue"), ("human", " Is it round?"),
             ("gpt", "no"), ("human", "Describe it."), ("gpt", "A red circle, 1234 px.")]
    rendered = template.render(turns)
    pre = LlavaPreprocessor.from_processor(processor, tokenization="llava")
    enc, _ = pre.encode_record({"id": "r", "image": "x.png", "conversations": [
        {"from": "human" if r == "human" else "gpt", "value": v} for r, v in turns]})
    # LLaVA's tokenizer_image_token: the chunks around <image> tokenized separately, later <s> dropped
    before, after = rendered.split("<image>")
    n = enc.image_spans[0][1] - enc.image_spans[0][0]
    expected = reference_ids(sp, before, True) + [processor.image_token_id] * n + reference_ids(sp, after, True)[1:]
    assert enc.input_ids == expected
    prompt = template.render_prompt("<image>\nWhat is the colour?")
    before, after = prompt.split("<image>")
    assert tokenize_prompt(prompt, processor.tokenizer, processor.image_token_id, n) == (
        reference_ids(sp, before, True) + [processor.image_token_id] * n + reference_ids(sp, after, True)[1:])


@pytest.mark.parametrize("legacy", [None, False])
def test_export_round_trip_keeps_model_and_flag(sp_model, tmp_path, legacy):
    src = vicuna_folder(tmp_path / "src", sp_model, legacy)
    holder = type("Tok", (), {})()
    assert attach_from_folder(holder, src)
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer_config.json").write_text(json.dumps({"legacy": True, "model_max_length": 2048}))
    assert save_attached(holder, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config.get("legacy") == legacy and config["model_max_length"] == 2048
    assert (out / "tokenizer.model").read_bytes() == sp_model
    again = type("Tok", (), {})()
    attach_from_folder(again, out)
    assert all(attached(again)(t).input_ids == attached(holder)(t).input_ids for t in TEXTS)
    clone = pickle.loads(pickle.dumps(attached(holder)))  # as dataloader workers receive it
    assert all(clone(t).input_ids == attached(holder)(t).input_ids for t in TEXTS)


def test_damaged_files_are_named(sp_model, tmp_path):
    folder = vicuna_folder(tmp_path, sp_model, None)
    (folder / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="tokenizer.model is not a readable SentencePiece model"):
        Llava15TextTokenizer.from_folder(folder)
    (folder / "tokenizer.model").write_bytes(sp_model)
    (folder / "tokenizer_config.json").write_text('{"legacy": "yes"}')
    with pytest.raises(ValueError, match="'legacy' must be true, false or null"):
        Llava15TextTokenizer.from_folder(folder)
    (folder / "tokenizer_config.json").write_text("{")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        Llava15TextTokenizer.from_folder(folder)


def test_merged_export_carries_the_sentencepiece_path(tmp_path):
    """export_merged writes tokenizer.model; the exported folder loads (load_llava_hf) with the same
    LLaVA-1.5 ids as the model it came from, multi-turn included."""
    from llava_san.checkpoint import export_merged
    from llava_san.models import build_tiny_llava, load_llava_hf_processor

    model, processor = build_tiny_llava()
    out = export_merged(model, processor, tmp_path / "merged")
    assert (out / "tokenizer.model").read_bytes() == attached(processor.tokenizer).model_proto
    loaded = load_llava_hf_processor(str(out))
    assert attached(loaded.tokenizer).legacy_flag is None
    text = get_template("vicuna_v1").render([("human", "What colour?"), ("gpt", "red"), ("human", "Round?"),
                                             ("gpt", "no")])
    assert attached(loaded.tokenizer)(text).input_ids == attached(processor.tokenizer)(text).input_ids

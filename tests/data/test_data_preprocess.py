"""Tokenization and label masks: golden examples, equality with full-string tokenization, truncation."""
import pytest
import torch
from PIL import Image

from llava_san.conversation import Piece, get_template
from llava_san.data import IGNORE_INDEX, LlavaPreprocessor, PieceEncoder, image_token_count, tokenize_prompt
from llava_san.data.errors import BadSample
from llava_san.data.llava15_text import attached
from llava_san.data.records import normalize_turns
from llava_san.models import build_tiny_processor

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")

RECORDS = [
    # multi-turn, <image> not at the front (LLaVA moves it), non-ASCII text
    {"id": "mm", "image": "img.png", "conversations": [
        {"from": "human", "value": "What colour is the shape?\n<image>"}, {"from": "gpt", "value": "blue"},
        {"from": "human", "value": "Is it a circle? Answer the question using a single word or phrase."},
        {"from": "gpt", "value": "no"},
        {"from": "human", "value": "Describe it — briefly, with ümlauts 😀."},
        {"from": "gpt", "value": "A small blue triangle on a white background."}]},
    # text-only (ShareGPT-like), with a leading gpt turn that LLaVA drops
    {"id": "txt", "conversations": [
        {"from": "gpt", "value": "dropped"}, {"from": "human", "value": "Hello there, how are you?"},
        {"from": "gpt", "value": "I am fine.\nThanks!"}]},
    # single turn VQA
    {"id": "vqa", "image": "img.png", "conversations": [
        {"from": "human",
         "value": "<image>\nwhat shape is present?\nAnswer the question using a single word or phrase."},
        {"from": "gpt", "value": "triangle"}]},
]


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor()


def llava_tokenizer_image_token(prompt, tokenizer, image_token_index):
    """Reference: LLaVA ``mm_utils.tokenizer_image_token`` (copied logic)."""
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

    def insert_separator(X, sep):
        return [ele for sublist in zip(X, [sep] * len(X)) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


def expand(ids, image_id, n):
    out = []
    for i in ids:
        out.extend([image_id] * n if i == image_id else [i])
    return out


def trained_spans(enc_ids, labels):
    """Contiguous runs of trained positions -> list of id lists; checks labels == ids there."""
    spans, cur = [], []
    for i, l in zip(enc_ids, labels):
        if l == IGNORE_INDEX:
            if cur:
                spans.append(cur)
                cur = []
        else:
            assert l == i
            cur.append(i)
    if cur:
        spans.append(cur)
    return spans


def answers(rec):
    turns, _ = normalize_turns(rec, 0, "f")
    return [v for r, v in turns if r == "gpt"]


def test_image_token_count(processor):
    assert image_token_count(processor) == 16  # (64/16)^2 + 1 CLS - 1 (strategy "default")


@pytest.mark.parametrize("mode", ["llava", "processor"])
@pytest.mark.parametrize("rec", RECORDS, ids=[r["id"] for r in RECORDS])
def test_labels_are_exactly_the_answers(processor, rec, mode):
    tok = processor.tokenizer
    pre = LlavaPreprocessor.from_processor(processor, tokenization=mode)
    enc, has_image = pre.encode_record(rec)
    assert len(enc.input_ids) == len(enc.labels)
    # decode every trained span: exactly "<answer></s>", in order, nothing else
    spans = trained_spans(enc.input_ids, enc.labels)
    assert [tok.decode(s) for s in spans] == [a + "</s>" for a in answers(rec)]
    assert all(s[-1] == tok.eos_token_id for s in spans)
    # BOS and everything outside the answers is masked
    assert enc.labels[0] == IGNORE_INDEX and enc.input_ids[0] == tok.bos_token_id
    n_img = sum(i == processor.image_token_id for i in enc.input_ids)
    assert n_img == (16 if has_image else 0)
    if has_image:
        (a, b), = enc.image_spans
        assert enc.input_ids[a:b] == [processor.image_token_id] * 16
        assert all(x == IGNORE_INDEX for x in enc.labels[a:b])


@pytest.mark.parametrize("rec", RECORDS, ids=[r["id"] for r in RECORDS])
def test_processor_mode_equals_full_string_tokenization(processor, rec):
    """ids == LlavaProcessor(text=rendered conversation); labels == an offsets-based oracle."""
    tok = processor.tokenizer
    pre = LlavaPreprocessor.from_processor(processor, tokenization="processor")
    enc, has_image = pre.encode_record(rec)
    turns, _ = normalize_turns(rec, 0, "f")
    rendered = get_template("vicuna_v1").render(turns)
    if has_image:
        full = processor(text=[rendered], images=[Image.new("RGB", (64, 64))]).input_ids[0]
    else:
        full = tok(rendered).input_ids
    assert enc.input_ids == full
    # Independent label oracle: a token is trained iff its characters lie in " <answer></s>".
    text = rendered.replace("<image>", "<image>" * 16)
    ranges, pos = [], 0
    for ans in answers(rec):
        k = text.index("ASSISTANT: " + ans + "</s>", pos)
        start = k + len("ASSISTANT:")
        ranges.append((start, start + len(" " + ans + "</s>")))
        pos = ranges[-1][1]
    e = tok(text, return_offsets_mapping=True)
    assert e.input_ids == full
    oracle = [i if any(a <= s and t <= b for a, b in ranges) and t > s else IGNORE_INDEX
              for i, (s, t) in zip(e.input_ids, e.offset_mapping)]
    assert enc.labels == oracle


@pytest.mark.parametrize("rec", RECORDS, ids=[r["id"] for r in RECORDS])
def test_llava_mode_equals_tokenizer_image_token(processor, rec):
    """ids == LLaVA's tokenizer_image_token(rendered) on LLaVA-1.5's tokenizer (the attached 4.31 slow
    tokenizer), with the image index expanded."""
    pre = LlavaPreprocessor.from_processor(processor, tokenization="llava")
    enc, has_image = pre.encode_record(rec)
    turns, _ = normalize_turns(rec, 0, "f")
    rendered = get_template("vicuna_v1").render(turns)
    ref = llava_tokenizer_image_token(rendered, attached(processor.tokenizer), processor.image_token_id)
    assert enc.input_ids == expand(ref, processor.image_token_id, 16)


@pytest.mark.parametrize("rec", RECORDS, ids=[r["id"] for r in RECORDS])
def test_llava_mode_on_transformers_tokenizer(rec):
    """Without a SentencePiece model attached, llava mode chunks transformers' tokenizer as LLaVA does:
    the only difference from whole-string tokenization is the '▁' the chunking puts after <image>."""
    processor = build_tiny_processor()
    del processor.tokenizer.llava15_text
    tok = processor.tokenizer
    pre = LlavaPreprocessor.from_processor(processor, tokenization="llava")
    enc, has_image = pre.encode_record(rec)
    turns, _ = normalize_turns(rec, 0, "f")
    rendered = get_template("vicuna_v1").render(turns)
    ref = llava_tokenizer_image_token(rendered, tok, processor.image_token_id)
    assert enc.input_ids == expand(ref, processor.image_token_id, 16)
    proc_enc, _ = LlavaPreprocessor.from_processor(processor, tokenization="processor").encode_record(rec)
    if has_image:
        (a, b), = enc.image_spans
        assert tok.convert_ids_to_tokens(enc.input_ids[b]) == "▁"
        assert enc.input_ids[:b] + enc.input_ids[b + 1:] == proc_enc.input_ids
        assert enc.labels[:b] + enc.labels[b + 1:] == proc_enc.labels
    else:
        assert enc.input_ids == proc_enc.input_ids and enc.labels == proc_enc.labels


def test_golden_vqa_sample(processor):
    tok = processor.tokenizer
    pre = LlavaPreprocessor.from_processor(processor)
    enc, _ = pre.encode_record(RECORDS[2])
    text = tok.convert_ids_to_tokens(enc.input_ids)
    a, b = enc.image_spans[0]
    assert tok.decode(enc.input_ids[:a]) == "<s> " + SYSTEM + " USER: "  # decode adds the '▁' as a space
    assert text[b:b + 2] == ["▁", "<0x0A>"]
    expected = ("\nwhat shape is present?\nAnswer the question using a single word or phrase. "
                "ASSISTANT: triangle</s>")
    assert tok.decode(enc.input_ids[b + 1:]) == expected
    assert [tok.decode(s) for s in trained_spans(enc.input_ids, enc.labels)] == ["triangle</s>"]


def test_eval_prompt_is_the_training_prefix(processor):
    """tokenize_prompt(render_prompt(q)) == the training sample's tokens up to 'ASSISTANT:'."""
    tok = processor.tokenizer
    rec = RECORDS[2]
    question = rec["conversations"][0]["value"]
    for mode in ("llava", "processor"):
        enc, _ = LlavaPreprocessor.from_processor(processor, tokenization=mode).encode_record(rec)
        prompt = get_template("vicuna_v1").render_prompt(question)
        ids = tokenize_prompt(prompt, tok, processor.image_token_id, 16, mode=mode)
        first_trained = next(i for i, l in enumerate(enc.labels) if l != IGNORE_INDEX)
        assert ids == enc.input_ids[:first_trained]
    # processor mode is exactly what LlavaProcessor gives for the eval prompt
    full = processor(text=[prompt], images=[Image.new("RGB", (64, 64))]).input_ids[0]
    assert tokenize_prompt(prompt, tok, processor.image_token_id, 16, mode="processor") == full


def test_plain_template_labels(processor):
    tok = processor.tokenizer
    pre = LlavaPreprocessor.from_processor(processor, template="plain")
    rec = {"id": "cap", "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nGive a short caption."},
        {"from": "gpt", "value": "a red circle"}]}
    enc, _ = pre.encode_record(rec)
    ref = llava_tokenizer_image_token("<image>a red circle\n", tok, processor.image_token_id)
    assert enc.input_ids == expand(ref, processor.image_token_id, 16)
    # LLaVA masks len(tokenizer_image_token("<image>")) = [<s>, <image>]; the rest is trained
    assert enc.labels[:17] == [IGNORE_INDEX] * 17 and enc.labels[17:] == enc.input_ids[17:]
    with pytest.raises(BadSample) as e:
        text_only = {"id": "t", "conversations": [{"from": "human", "value": "q"},
                                                  {"from": "gpt", "value": "a"}]}
        pre.encode_record(text_only, 3, "data.json")
    assert e.value.reason == "template_mismatch" and "'t'" in str(e.value) and "data.json" in str(e.value)


def test_drift_is_detected_not_silently_masked(processor):
    enc = PieceEncoder(processor.tokenizer, processor.image_token_id, 16)
    tok = processor.tokenizer
    assert tok.convert_ids_to_tokens(tok("assistant").input_ids)[1:] == ["▁assistant"]
    with pytest.raises(BadSample) as e:  # a boundary inside the single token '▁assistant'
        enc.encode([Piece("The assis", False), Piece("tant", True)])
    assert e.value.reason == "tokenization_drift"
    ok = enc.encode([Piece("The", False), Piece(" assistant", True)])
    assert tok.convert_ids_to_tokens([i for i in ok.labels if i != IGNORE_INDEX]) == ["▁assistant"]


def _long_record(n_words, image=True):
    conv = [{"from": "human", "value": ("<image>\n" if image else "") + "what color is the shape?"},
            {"from": "gpt", "value": " ".join(["blue"] * n_words)}]
    rec = {"id": "long", "conversations": conv}
    if image:
        rec["image"] = "img.png"
    return rec


def test_truncation_keeps_image_span_and_counts(processor, tmp_path):
    Image.new("RGB", (40, 64), (255, 0, 0)).save(tmp_path / "img.png")
    full_len = len(LlavaPreprocessor.from_processor(processor).encode_record(_long_record(30))[0].input_ids)
    folder = str(tmp_path)
    pre = LlavaPreprocessor.from_processor(processor, model_max_length=full_len - 5, image_folder=folder)
    sample = pre(_long_record(30), 7, "data.json")
    assert sample["truncated"] and len(sample["input_ids"]) == full_len - 5 == len(sample["labels"])
    assert int((sample["input_ids"] == processor.image_token_id).sum()) == 16  # image span intact
    assert sample["pixel_values"].shape == (3, 64, 64)
    # limit inside the image span: skipped, not cut
    a, b = pre.encode_record(_long_record(30))[0].image_spans[0]
    pre_small = LlavaPreprocessor.from_processor(processor, model_max_length=a + 5, image_folder=folder)
    with pytest.raises(BadSample) as e:
        pre_small(_long_record(30), 7, "data.json")
    assert e.value.reason == "too_long" and "'long'" in str(e.value) and "data.json" in str(e.value)
    # limit after the image but before any answer token: no trained token left
    pre_mid = LlavaPreprocessor.from_processor(processor, model_max_length=b + 3, image_folder=folder)
    with pytest.raises(BadSample) as e:
        pre_mid(_long_record(30), 7, "data.json")
    assert e.value.reason == "no_trained_tokens" and "(#7) in data.json" in str(e.value)


def test_sample_tensors(processor, tmp_path):
    Image.new("RGB", (64, 32), (0, 0, 255)).save(tmp_path / "img.png")
    pre = LlavaPreprocessor.from_processor(processor, image_folder=str(tmp_path))
    s = pre(RECORDS[0])
    assert s["input_ids"].dtype == torch.long and s["labels"].dtype == torch.long
    assert s["pixel_values"].dtype == torch.float32 and s["pixel_values"].shape == (3, 64, 64)
    t = pre(RECORDS[1])
    assert t["pixel_values"] is None and not t["truncated"]


def test_image_placeholder_normalisation(processor):
    pre = LlavaPreprocessor.from_processor(processor)
    # image record without a placeholder: one is put at the front of the first human turn
    rec = {"id": "noph", "image": "x.png", "conversations": [{"from": "human", "value": "  What is it? "},
                                                             {"from": "gpt", "value": "a shape"}]}
    turns, has_image = normalize_turns(rec, 0, "f")
    assert has_image and turns[0] == ("human", "<image>\nWhat is it?")
    assert sum(i == processor.image_token_id for i in pre.encode_record(rec)[0].input_ids) == 16
    # several placeholders: exactly one image span
    rec2 = {"id": "two", "image": "x.png", "conversations": [
        {"from": "human", "value": "<image> a <image>"}, {"from": "gpt", "value": "b"},
        {"from": "human", "value": "c <image>"}, {"from": "gpt", "value": "d"}]}
    assert len(pre.encode_record(rec2)[0].image_spans) == 1
    # text-only record quoting "<image>": no image token may appear
    rec3 = {"id": "quote", "conversations": [{"from": "human", "value": "what does <image> mean?"},
                                             {"from": "gpt", "value": "a tag"}]}
    enc, has_image = pre.encode_record(rec3)
    assert not has_image and processor.image_token_id not in enc.input_ids


@pytest.mark.parametrize("mode", ["llava", "processor"])
def test_empty_and_blank_answers_are_masked_not_the_record(processor, mode):
    """A multi-turn record with an empty and a whitespace-only answer keeps its other turns: the ids are
    LLaVA's rendering (an empty answer is the bare "ASSISTANT:", no "</s>"), only the real answer is
    trained; a record whose every answer is empty is skipped."""
    tok = processor.tokenizer
    rec = {"id": "holes", "image": "img.png", "conversations": [
        {"from": "human", "value": "<image>\nfirst?"}, {"from": "gpt", "value": ""},
        {"from": "human", "value": "second?"}, {"from": "gpt", "value": "   "},
        {"from": "human", "value": "third?"}, {"from": "gpt", "value": "blue"}]}
    pre = LlavaPreprocessor.from_processor(processor, tokenization=mode)
    enc, _ = pre.encode_record(rec)
    turns, _ = normalize_turns(rec, 0, "f")
    rendered = get_template("vicuna_v1").render(turns)
    assert "ASSISTANT:USER: second? ASSISTANT:    </s>USER: third? ASSISTANT: blue</s>" in rendered
    if mode == "llava":
        ref = llava_tokenizer_image_token(rendered, attached(tok), processor.image_token_id)
        assert enc.input_ids == expand(ref, processor.image_token_id, 16)
    else:
        assert enc.input_ids == processor(text=[rendered], images=[Image.new("RGB", (64, 64))]).input_ids[0]
    assert [tok.decode(s) for s in trained_spans(enc.input_ids, enc.labels)] == ["blue</s>"]
    empty = dict(rec, conversations=rec["conversations"][:4])
    with pytest.raises(BadSample, match="every answer turn is empty") as err:
        pre.encode_record(empty)
    assert err.value.reason == "empty_answer"

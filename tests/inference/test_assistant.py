"""The Assistant behind chat, predict and serve: its streamed, batched and evaluation answers are one
answer; conversations render with training's template; a run folder and its merged/ folder answer
alike; prompt settings come from the run's config or the exported folder; long prompts are refused."""
import re
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from evaluation.resolve import resolve_benchmark
from llava_san.conversation import get_template
from llava_san.data.images import load_image
from llava_san.export_processor import export_processor
from llava_san.generation import PromptEncoder, answer_questions, decode, generate_batch
from llava_san.inference import Assistant, PromptSettings, Turn, prompt_settings
from llava_san.inference.assistant import PromptTooLong

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "easyvqa"
MAX_NEW = 8


@pytest.fixture(scope="module")
def questions():
    """easy-vqa questions with their images, and the images cut to non-square shapes (padding matters)."""
    qs = resolve_benchmark("easyvqa", overrides={"cache_dir": str(CACHE)}, limit=3).questions
    out = []
    for k, q in enumerate(qs):
        img = load_image(str(q.image))
        w, h = img.size
        cut = img.crop((0, 0, w, h * 3 // 5)) if k % 2 else img.crop((0, 0, w // 2, h))
        out += [(q.prompt, img), (q.prompt, cut)]
    return out


def test_streamed_batched_and_evaluation_answers_agree(assistant, questions):
    streams = [list(assistant.stream([Turn("user", q)], image, MAX_NEW)) for q, image in questions]
    batched = assistant.answer_many(questions, max_new_tokens=MAX_NEW, batch_size=4)
    # python -m evaluation's path: PromptEncoder with the run's settings, one question per batch
    encoder = PromptEncoder(assistant.processor, "vicuna_v1", "llava", "pad")
    evaluation = answer_questions(assistant.model, assistant.processor, questions,
                                  lambda q, _: encoder(f"<image>\n{q[0]}", q[1], MAX_NEW), batch_size=1)
    assert ["".join(pieces) for pieces in streams] == batched == evaluation
    assert len(set(batched)) > 1  # the answers depend on the question and image
    assert max(len(pieces) for pieces in streams) > 1  # streamed piece by piece
    assert not assistant.model.training


def test_streaming_holds_back_what_later_tokens_change(assistant, questions):
    """A run of byte-fallback tokens decodes as one group (an invalid one turns *every* byte of it into
    U+FFFD): the streamed pieces must still join to the answer of the batched loop, conversations too."""
    tok = assistant.tokenizer
    chat = [Turn("user", "hello"), Turn("assistant", "B. 88ence\ufffd 29"), Turn("user", "again")]
    conversations = [(chat, None), (chat[:1], None), ([Turn("user", questions[0][0])], questions[0][1])]
    byte_tokens = 0
    for turns, image in conversations:
        prompt = assistant.encode(turns, image, 24)
        ids = generate_batch(assistant.model, [prompt], pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)[0]
        byte_tokens += sum(bool(re.fullmatch(r"<0x..>", t)) for t in tok.convert_ids_to_tokens(ids))
        assert "".join(assistant.stream(turns, image, 24)) == decode(tok, ids)
    assert byte_tokens > 0  # the case is exercised


def test_image_paths_are_read_when_their_batch_comes(assistant, questions, tmp_path):
    files = []
    for k, (q, image) in enumerate(questions[:3]):
        image.save(tmp_path / f"{k}.png")
        files.append((q, str(tmp_path / f"{k}.png")))
    seen = []
    texts = assistant.answer_many(files, max_new_tokens=MAX_NEW, batch_size=2, num_workers=2,
                                  on_batch=lambda batch, t: seen.append(len(batch)))
    assert seen == [2, 1]
    assert texts == assistant.answer_many(questions[:3], max_new_tokens=MAX_NEW, batch_size=3)


def test_conversation_renders_with_training_template(assistant):
    turns = [Turn("user", "What shape is it?"), Turn("assistant", "circle"), Turn("user", "What colour?")]
    expected = get_template("vicuna_v1").render([("human", "<image>\nWhat shape is it?"), ("gpt", "circle"),
                                                  ("human", "What colour?"), ("gpt", None)])
    assert assistant.render(turns, has_image=True) == expected
    assert expected.endswith(
        "USER: <image>\nWhat shape is it? ASSISTANT: circle</s>USER: What colour? ASSISTANT:")
    assert assistant.render(turns, has_image=False) == expected.replace("<image>\n", "")
    # a one-turn prompt is the evaluation prompt, token for token
    encoder = PromptEncoder(assistant.processor, "vicuna_v1", "llava", "pad")
    one = assistant.encode(turns[:1], Image.new("RGB", (40, 30), (10, 200, 30)), 5)
    assert list(one.input_ids) == encoder.encode_text("<image>\nWhat shape is it?")
    assert assistant.prompt_tokens(turns, image=True) > len(one.input_ids)
    for bad in ([], turns[:2], [turns[1], turns[0]], [Turn("user", "<image>\nhi")]):
        with pytest.raises(ValueError):
            assistant.render(bad, has_image=True)


def test_run_folder_and_its_merged_folder_answer_alike(trained_run, assistant, questions):
    merged = Assistant.load(trained_run / "merged", device="cpu")
    assert merged.settings == assistant.settings == PromptSettings("vicuna_v1", "llava", "pad")
    assert (merged.answer_many(questions, max_new_tokens=MAX_NEW)
            == assistant.answer_many(questions, max_new_tokens=MAX_NEW))


def test_prompt_settings_from_run_config_and_export(trained_run, assistant, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter").symlink_to(trained_run / "adapter")
    config = OmegaConf.load(trained_run / "config.yaml")
    assert "template" not in config.data  # synthetic data: LLaVA-1.5's settings
    assert prompt_settings(trained_run) == PromptSettings("vicuna_v1", "llava", "pad")
    config.data.template, config.data.image_aspect_ratio = "plain", "crop"
    config.data.tokenization = "processor"
    OmegaConf.save(config, run / "config.yaml")
    assert prompt_settings(run) == PromptSettings("plain", "processor", "crop")
    assert prompt_settings(trained_run / "merged") == PromptSettings("vicuna_v1", "llava", "pad")

    exported = tmp_path / "exported"  # a crop/plain export: its chat template and image processor say so
    export_processor(assistant.processor, "plain", "crop").save_pretrained(exported)
    shutil.copy(trained_run / "merged" / "config.json", exported / "config.json")
    assert prompt_settings(exported) == PromptSettings("plain", "llava", "crop")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        prompt_settings(tmp_path)


def test_a_prompt_longer_than_the_context_is_refused(assistant):
    limit = assistant.context_length
    assert limit == 2048  # the tiny model: tokenizer model_max_length = max_position_embeddings = 2048
    base = assistant.prompt_tokens([Turn("user", "")])
    per_word = (assistant.prompt_tokens([Turn("user", "red " * 100)])
                - assistant.prompt_tokens([Turn("user", "red " * 99)]))
    words = (limit - base - 3) // per_word  # a few tokens of room left
    near = assistant.encode([Turn("user", "red " * words)], None, 512)
    assert len(near.input_ids) < limit and near.max_new_tokens == limit - len(near.input_ids) < 10
    with pytest.raises(PromptTooLong, match=f"reads at most {limit}"):
        assistant.stream([Turn("user", "red " * (words + 10))])

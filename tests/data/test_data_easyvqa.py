"""easy-vqa as LLaVA-format data: the cache files, question types, blind baselines, the datamodule."""
import json
import os

import pytest
import torch

from llava_san.data.easyvqa import (QUESTION_TYPES, SHORT_ANSWER_PROMPT, EasyVQADataModule, blind_baselines,
                                    majority_answer, per_question_answers, prepare_easyvqa, question_type,
                                    question_type_from_text)
from llava_san.models import build_tiny_llava


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache") / "easyvqa"
    return d, prepare_easyvqa(str(d))


def test_files_and_formats(cache):
    d, paths = cache
    # .lock: the cache lock (llava_san/utils/cache_lock.py), an empty file
    assert sorted(os.listdir(d)) == [".lock", "manifest.json", "test_answers.json", "test_questions.jsonl",
                                     "train.json"]
    records = json.loads(open(paths.train_records, encoding="utf-8").read())
    assert len(records) == 38575
    assert records[0] == {
        "id": "easyvqa-train-000000",
        "image": "train/images/0.png",
        "conversations": [
            {"from": "human", "value": "<image>\nwhat is the blue shape?\n" + SHORT_ANSWER_PROMPT},
            {"from": "gpt", "value": "rectangle"}],
        "question_type": "shape",
    }
    assert all(os.path.isfile(os.path.join(paths.image_folder, r["image"])) for r in records[:50])
    rows = [json.loads(line) for line in open(paths.test_questions, encoding="utf-8")]
    assert len(rows) == 9673
    assert set(rows[0]) == {"question_id", "image", "text", "category"}
    assert all(r["text"].endswith("\n" + SHORT_ANSWER_PROMPT) and "<image>" not in r["text"] for r in rows)
    truth = json.load(open(paths.test_answers))
    assert len(truth) == 9673 and set(truth["0"]) == {"answer", "question_type", "question"}
    assert {r["category"] for r in rows} == set(QUESTION_TYPES) == {r["question_type"] for r in records}
    for r in rows[:200]:
        t = truth[str(r["question_id"])]
        assert r["category"] == t["question_type"] == question_type(t["answer"])
        assert r["text"].startswith(t["question"])


def test_question_type_from_answer_agrees_with_wording():
    from easy_vqa import get_test_questions, get_train_questions

    for qs, ans, _ in (get_train_questions(), get_test_questions()):
        assert all(question_type(a) == question_type_from_text(q) for q, a in zip(qs, ans))
    assert question_type("Yes") == "yes-no" and question_type("teal") == "colour"
    assert question_type("circle") == "shape"
    with pytest.raises(ValueError):
        question_type("purple")


def test_idempotent_and_atomic(cache):
    d, paths = cache
    mtimes = {f: os.stat(os.path.join(d, f)).st_mtime_ns for f in os.listdir(d)}
    again = prepare_easyvqa(str(d))
    assert again == paths
    assert {f: os.stat(os.path.join(d, f)).st_mtime_ns for f in os.listdir(d)} == mtimes  # reused
    # a damaged file is detected through the manifest and rewritten; no temp files are left behind
    with open(paths.test_answers, "w") as f:
        f.write("{")
    prepare_easyvqa(str(d))
    assert len(json.load(open(paths.test_answers))) == 9673
    assert not [f for f in os.listdir(d) if f.endswith(".tmp")]


def test_blind_baselines():
    assert majority_answer(["a", "b", "b"]) == "b" and majority_answer(["b", "a"]) == "a"
    assert per_question_answers(["q1", "q1", "q2"], ["x", "y", "y"]) == {"q1": "x", "q2": "y"}
    res = blind_baselines()
    assert res["majority_answer"] == "yes"
    assert abs(res["majority"]["accuracy"] - 0.373) < 0.005
    assert abs(res["per_question"]["accuracy"] - 0.67) < 0.01
    assert set(res["per_question"]["by_type"]) == set(QUESTION_TYPES)


def test_datamodule_trains_the_tiny_model(cache):
    d, _ = cache
    model, processor = build_tiny_llava(seed=0)
    dm = EasyVQADataModule(cache_dir=str(d), processor=processor, batch_size=8, num_workers=0,
                           val_fraction=0.02, max_train_samples=64, seed=0)
    dm.prepare_data()
    dm.setup()
    assert len(dm.train_dataset) == 64 and len(dm.val_dataset) == round(0.02 * 38575)
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (8, 3, 64, 64)
    tok = processor.tokenizer
    answers = [tok.decode([t for t in row if t != -100]) for row in batch["labels"].tolist()]
    vocab = {"yes", "no", "circle", "rectangle", "triangle", "red", "green", "blue", "black", "gray", "teal",
             "brown", "yellow"}
    assert all(a.endswith("</s>") and a[:-4] in vocab for a in answers)
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)
    with pytest.raises(ValueError, match="sets train_file itself"):
        EasyVQADataModule(cache_dir=str(d), train_file="x.json")


def test_question_types_subset(cache):
    """question_types=[shape]: the datamodule trains on exactly the shape records of train.json, in file
    order, written once and reused; a bad type is named."""
    d, paths = cache
    model, processor = build_tiny_llava(seed=0)
    dm = EasyVQADataModule(cache_dir=str(d), question_types=["shape"], processor=processor, batch_size=8,
                           num_workers=0, val_fraction=0.0, seed=0)
    dm.prepare_data()
    dm.setup()
    with open(paths.train_records) as f:
        expected = [r for r in json.load(f) if r["question_type"] == "shape"]
    with open(dm.train_file) as f:
        assert json.load(f) == expected
    assert len(dm.train_dataset) == len(expected) == 5002
    mtime = os.stat(dm.train_file).st_mtime_ns
    again = EasyVQADataModule(cache_dir=str(d), question_types=["shape"], processor=processor)
    again.prepare_data()
    assert again.train_file == dm.train_file and os.stat(dm.train_file).st_mtime_ns == mtime
    batch = next(iter(dm.train_dataloader()))
    answers = {processor.tokenizer.decode([t for t in row if t != -100]) for row in batch["labels"].tolist()}
    assert answers <= {"circle</s>", "rectangle</s>", "triangle</s>"}
    with pytest.raises(ValueError, match="question_types"):
        EasyVQADataModule(cache_dir=str(d), question_types=["color"])


def test_answer_map_renames_training_and_evaluation_answers(cache):
    """answer_map: the training records answer with the renamed word, the evaluator expects it, and the
    blind baseline is computed on the renamed training answers."""
    from llava_san.training.easyvqa_eval import EasyVqaEvaluator

    d, paths = cache
    amap = {"red": "teal", "teal": "red"}
    dm = EasyVQADataModule(cache_dir=str(d), question_types=["colour"], answer_map=amap,
                           processor=build_tiny_llava(seed=0)[1], num_workers=0, val_fraction=0.0)
    dm.prepare_data()
    with open(paths.train_records) as f:
        original = [r for r in json.load(f) if r["question_type"] == "colour"]
    with open(dm.train_file) as f:
        renamed = json.load(f)
    assert [r["conversations"][1]["value"] for r in renamed] == \
        [amap.get(r["conversations"][1]["value"], r["conversations"][1]["value"]) for r in original]
    rows, truth, _ = EasyVqaEvaluator(cache_dir=str(d), question_types=["colour"], answer_map=amap).questions()
    with open(paths.test_answers) as f:
        raw = json.load(f)
    assert all(truth[q]["answer"] == amap.get(raw[q]["answer"], raw[q]["answer"]) for q in truth)
    with pytest.raises(ValueError, match="answer_map"):
        EasyVQADataModule(cache_dir=str(d), answer_map={"purple": "x"})

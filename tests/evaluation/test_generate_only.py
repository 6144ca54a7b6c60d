"""`python -m evaluation ... score=false` answers a benchmark whose ground truth is not at hand: the
annotations are read only to score, so a run that does not score does not need them."""
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from evaluation.run import run

ROOT = Path(__file__).resolve().parents[2]
SA = "\nAnswer the question using a single word or phrase."


def _cfg(out, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="eval", overrides=[f"output_dir={out}", f"paths.cache_dir={ROOT / '.cache'}",
                                                      "max_new_tokens=3", "batch_size=2", *overrides])


def _questions(folder, images, rows):
    """LLaVA's question jsonl plus its images; no annotation file."""
    images.mkdir(parents=True)
    with open(folder / rows[0], "w") as f:
        for i, row in enumerate(rows[1]):
            Image.new("RGB", (40, 30), (60 * i, 100, 20)).save(images / row["image"])
            f.write(json.dumps(row) + "\n")


@pytest.fixture(scope="module")
def eval_root(tmp_path_factory):
    """LLaVA's eval.zip layout for GQA, TextVQA and POPE with the question files and images only."""
    root = tmp_path_factory.mktemp("eval_root")
    gqa = root / "gqa"
    gqa.mkdir()
    _questions(gqa, gqa / "data" / "images", ("llava_gqa_testdev_balanced.jsonl", [
        {"question_id": f"20{i}", "image": f"n{i}.jpg", "text": f"what is in picture {i}?{SA}"} for i in range(3)]))
    tv = root / "textvqa"
    tv.mkdir()
    _questions(tv, tv / "train_images", ("llava_textvqa_val_v051_ocr.jsonl", [
        {"question_id": f"img{i}", "image": f"img{i}.jpg",
         "text": f"what brand is this?\nReference OCR token: sony{SA}"} for i in range(2)]))
    pope = root / "pope"
    pope.mkdir()
    _questions(pope, pope / "val2014", ("llava_pope_test.jsonl", [
        {"question_id": i + 1, "image": f"COCO_val2014_{i}.jpg", "text": f"Is there a dog in the image?{SA}",
         "category": cat} for i, cat in enumerate(("adversarial", "popular", "random"))]))
    return root


@pytest.mark.parametrize("name, n", [("gqa", 3), ("textvqa", 2), ("pope", 3)])
def test_score_false_generates_without_annotations(eval_root, tmp_path, name, n):
    # scoring needs the annotations, and says how to do without them
    with pytest.raises(FileNotFoundError, match=f"{name}: annotations not found.*score=false"):
        run(_cfg(tmp_path / "scored", f"eval_root={eval_root}", f"benchmarks=[{name}]"))
    out = tmp_path / "answers_only"
    assert run(_cfg(out, f"eval_root={eval_root}", f"benchmarks=[{name}]", "score=false")) == {}
    answers = [json.loads(x) for x in (out / "answers" / f"{name}.jsonl").read_text().splitlines()]
    questions = [json.loads(x) for x in next((eval_root / name).glob("*.jsonl")).read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]
    assert len(answers) == n and all(isinstance(a["text"], str) for a in answers)
    assert not (out / "metrics.json").exists()

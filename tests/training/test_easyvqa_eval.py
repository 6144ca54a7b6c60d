"""The end-of-training easy-vqa check asks the test questions exactly as the training data asks them,
and the default run (shortened) ends with its metrics and the exact baselines."""
import collections
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from llava_san.data import LlavaPreprocessor
from llava_san.data.easyvqa import prepare_easyvqa, train_records
from llava_san.models import build_tiny_llava
from llava_san.training.easyvqa_eval import EasyVqaEvaluator, format_report

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("easyvqa")
    prepare_easyvqa(str(path))
    return str(path)


@pytest.mark.parametrize("tokenization", ["llava", "processor"])
def test_prompt_is_the_training_prompt(cache_dir, tokenization):
    """For test questions whose text also occurs in training, the evaluation message is the training
    human turn verbatim, and the prompt ids are the training sample's ids up to its answer."""
    _, processor = build_tiny_llava()
    ev = EasyVqaEvaluator(cache_dir, template="vicuna_v1", tokenization=tokenization, limit=40)
    rows, truth, image_folder = ev.questions()
    inputs = ev.inputs(processor, rows, image_folder)
    pre = LlavaPreprocessor.from_processor(processor, template="vicuna_v1", tokenization=tokenization,
                                           image_folder=image_folder, image_aspect_ratio="pad")
    by_question = {}
    for rec in train_records():
        by_question.setdefault(rec["conversations"][0]["value"], rec)
    checked = 0
    for row, inp in zip(rows, inputs):
        rec = by_question.get(EasyVqaEvaluator.message(row))
        if rec is None:
            continue
        sample = pre(dict(rec, image=row["image"]))  # the training code on the test image
        first_trained = int((sample["labels"] != -100).nonzero()[0])
        assert list(inp.input_ids) == sample["input_ids"][:first_trained].tolist()
        torch.testing.assert_close(inp.pixel_values, sample["pixel_values"], rtol=0, atol=0)
        checked += 1
    assert checked >= 30
    decoded = processor.tokenizer.decode(inputs[0].input_ids)
    assert decoded.endswith("Answer the question using a single word or phrase. ASSISTANT:")
    assert "A chat between a curious user" in decoded


def _expected_baselines(n):
    """Majority and blind (per question text) baselines on the first n test questions, from the
    easy_vqa package directly (most frequent training answer; ties: alphabetically first)."""
    from easy_vqa import get_test_questions, get_train_questions

    tq, ta, _ = get_train_questions()
    q, a, _ = get_test_questions()
    q, a = q[:n], a[:n]

    def most_common(answers):
        counts = collections.Counter(answers)
        return sorted(counts, key=lambda x: (-counts[x], x))[0]

    majority = most_common(ta)
    per_q = collections.defaultdict(list)
    for qq, aa in zip(tq, ta):
        per_q[qq].append(aa)
    blind = [most_common(per_q[qq]) if qq in per_q else majority for qq in q]
    return sum(majority == t for t in a) / n, sum(p == t for p, t in zip(blind, a)) / n


def test_full_test_set_baselines(cache_dir):
    """The documented values: majority ~0.37, blind ~0.67 on all 9,673 test questions."""
    from llava_san.training.easyvqa_eval import _scores, blind_predictions

    truth = json.loads(Path(prepare_easyvqa(cache_dir).test_answers).read_text())
    majority, blind = blind_predictions({q: t["question"] for q, t in truth.items()})
    exp_majority, exp_blind = _expected_baselines(len(truth))
    assert len(truth) == 9673
    assert _scores(majority, truth)[0] == pytest.approx(exp_majority, abs=1e-12)
    assert _scores(blind, truth)[0] == pytest.approx(exp_blind, abs=1e-12)
    assert 0.35 < exp_majority < 0.39 and 0.65 < exp_blind < 0.69


def test_default_run_shortened(tmp_path, capsys):
    """``python -m train`` as configured (tiny model, easy-vqa, SAN-DoRA), 30 steps, 64 test questions."""
    from train.run import run

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            f"paths.output_dir={tmp_path}", "trainer.max_steps=30", "evaluate.limit=64",
            "callbacks.progress_bar.refresh_rate=0"])
    assert cfg.peft.san is not None and cfg.peft.lora_config.use_dora and cfg.data.template == "vicuna_v1"
    returned = run(cfg)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m == pytest.approx(returned)
    for key in ("train/loss_first", "train/loss_last", "time/train_s", "test/easyvqa_accuracy",
                "test/easyvqa_blind_baseline", "test/easyvqa_majority_baseline"):
        assert key in m, key
    assert m["train/global_step"] == 30 and m["test/easyvqa_n"] == 64
    assert m["train/loss_last"] < m["train/loss_first"]  # from ln(vocab) ~ 6.9 at random init
    for key, v in m.items():
        if key.startswith("test/easyvqa_") and key != "test/easyvqa_n":
            assert 0.0 <= v <= 1.0, key
    majority, blind = _expected_baselines(64)
    assert m["test/easyvqa_majority_baseline"] == pytest.approx(majority, abs=1e-12)
    assert m["test/easyvqa_blind_baseline"] == pytest.approx(blind, abs=1e-12)
    assert {k for k in m if k.endswith("_accuracy")} == {
        f"test/easyvqa{t}_accuracy" for t in ("", "_colour", "_shape", "_yes_no")}
    out = capsys.readouterr().out.rstrip().splitlines()  # the run ends with the report
    assert out[-6:] == format_report(m).splitlines()
    assert out[-6].startswith("easy-vqa test accuracy (64 questions)")
    overall = out[-4].split()
    assert overall[0] == "overall" and [float(x) for x in overall[1:]] == pytest.approx(
        [m["test/easyvqa_accuracy"], m["test/easyvqa_blind_baseline"], m["test/easyvqa_majority_baseline"]],
        abs=5e-5)


def test_question_types_ask_only_those_questions(cache_dir):
    """question_types=[shape]: only the 1,257 shape questions are asked (limit counts within them)."""
    ev = EasyVqaEvaluator(cache_dir=cache_dir, question_types=["shape"])
    rows, truth, _ = ev.questions()
    assert len(rows) == 1257 and {r["category"] for r in rows} == {"shape"}
    assert all(truth[str(r["question_id"])]["question_type"] == "shape" for r in rows)
    limited, _, _ = EasyVqaEvaluator(cache_dir=cache_dir, question_types=["shape"], limit=10).questions()
    assert [r["question_id"] for r in limited] == [r["question_id"] for r in rows[:10]]

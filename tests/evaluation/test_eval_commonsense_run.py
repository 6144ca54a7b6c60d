"""``python -m evaluation`` on a causal LM and LLM-Adapters' commonsense benchmarks, on CPU: a tiny random
``LlamaForCausalLM`` checkpoint folder (and a run folder / model config that build one) answers tiny
``dataset/<folder>/test.json`` files; answers, scores and the report with its reference rows; batched
answers equal one-at-a-time answers (beam search and greedy)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from evaluation.generate import generate_answers
from evaluation.run import run
from evaluation.tasks import get_benchmark
from llava_san.commonsense import BENCHMARKS, encode_prompt, generate_prompt
from llava_san.inference.loading import LoadedModel, describe_path, is_causal_lm_checkpoint, load_model

ROOT = Path(__file__).resolve().parents[2]
TINY_LLAMA = {"build": {"_target_": "llava_san.models.tiny.build_tiny_llama", "seed": 0},
              "processor": {"_target_": "llava_san.models.tokenizer.build_tiny_tokenizer"}}

QUESTIONS = {
    "boolq": [("Please answer the following question with true or false, question: is the sky blue?\n\n"
               "Answer format: true/false", "true"),
              ("Please answer the following question with true or false, question: do fish fly?\n\n"
               "Answer format: true/false", "false"),
              ("Please answer the following question with true or false, question: is ice cold?\n\n"
               "Answer format: true/false", "true")],
    "arc_challenge": [(f"Please choose the correct answer to the question: which colour is {c}?\n\n"
                       "Answer1: red Answer2: blue Answer3: green Answer4: yellow\n\n"
                       "Answer format: answer1/answer2/answer3/answer4", a)
                      for c, a in (("the sky", "answer2"), ("grass", "answer3"), ("a lemon", "answer4"),
                                   ("blood", "answer1"), ("a very long question about the colour of snow in "
                                    "the mountains when the sun sets behind the peaks", "answer1"))],
}


def _dataset(root):
    for name, items in QUESTIONS.items():
        folder = root / BENCHMARKS[name].folder
        folder.mkdir(parents=True)
        (folder / "test.json").write_text(json.dumps(
            [{"instruction": q, "input": "", "output": f"the correct answer is {a}", "answer": a}
             for q, a in items], indent=4))
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random LlamaForCausalLM + its tokenizer, save_pretrained to a folder (seed 0)."""
    from llava_san.models.tiny import build_tiny_llama
    from llava_san.models.tokenizer import build_tiny_tokenizer

    path = tmp_path_factory.mktemp("ckpt") / "tiny-llama"
    build_tiny_llama(seed=0).save_pretrained(path)
    build_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return _dataset(tmp_path_factory.mktemp("llm-adapters") / "dataset")


def _cfg(out, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="eval", overrides=[f"output_dir={out}", *overrides])


def _texts(path):
    return [json.loads(x)["text"] for x in Path(path).read_text().splitlines()]


def test_checkpoint_is_recognised_as_a_causal_lm(checkpoint):
    assert describe_path(checkpoint) == "checkpoint" and is_causal_lm_checkpoint(checkpoint)
    lm = load_model(None, path=checkpoint, device="cpu")
    assert type(lm.model).__name__ == "LlamaForCausalLM" and not lm.model.training
    assert lm.processor.padding_side == "left" and lm.processor.pad_token_id is not None
    ids = encode_prompt(lm.processor, "Q?")
    assert ids[0] == lm.processor.bos_token_id and ids[-1] != lm.processor.eos_token_id  # BOS, no EOS


def test_end_to_end_on_a_checkpoint(checkpoint, dataset, tmp_path):
    out = tmp_path / "eval"
    results = run(_cfg(out, f"path={checkpoint}", f"eval_root={dataset}", "benchmarks=[boolq,arc_challenge]",
                       "batch_size=3", "max_new_tokens=6"))
    assert set(results) == {"boolq", "arc_challenge"}
    for name, res in results.items():
        n = len(QUESTIONS[name])
        assert res["n_questions"] == n and res["coverage"]["missing"] == 0 and 0.0 <= res["accuracy"] <= 1.0
        lines = [json.loads(x) for x in (out / "answers" / f"{name}.jsonl").read_text().splitlines()]
        assert [x["question_id"] for x in lines] == list(range(n))
        assert [x["prompt"] for x in lines] == [q for q, _ in QUESTIONS[name]]  # the instruction, as LLM-Adapters saves
        assert all(x["model_id"] == "tiny-llama" for x in lines)
        rescored = get_benchmark(name).score(out / "answers" / f"{name}.jsonl",
                                             dataset / BENCHMARKS[name].folder / "test.json")
        assert rescored["accuracy"] == res["accuracy"]
    report = json.loads((out / "report.json").read_text())
    assert report["suite"] == "commonsense" and report["title"].startswith("LLaMA commonsense")
    assert report["columns"] == ["boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "arc_easy",
                                 "arc_challenge", "openbookqa"]
    ref = [r for r in report["rows"] if r["source"] != "run"]
    assert [r["name"] for r in ref][:2] == ["LLaMA-7B LoRA r32", "LLaMA-7B DoRA r32"]
    assert ref[1]["values"]["boolq"] == 69.7 and ref[1]["avg"] == 78.4
    ours = report["rows"][-1]
    assert ours["name"] == "tiny-llama" and ours["avg"] is None  # two of eight benchmarks
    assert ours["values"]["arc_challenge"] == pytest.approx(100 * results["arc_challenge"]["accuracy"])
    md = (out / "report.md").read_text()
    assert "| BoolQ | PIQA | SIQA | HellaSwag | WinoGrande | ARC-e | ARC-c | OBQA | avg |" in md
    assert "LLaMA-7B DoRA r32 (DoRA repo)" in md and "| tiny-llama |" in md


@pytest.mark.parametrize("num_beams", [4, 1])
def test_batched_answers_equal_one_at_a_time(checkpoint, dataset, tmp_path, num_beams):
    lm = load_model(None, path=checkpoint, device="cpu")
    task = get_benchmark("arc_challenge")
    qs = task.load_questions(dataset / "ARC-Challenge" / "test.json")  # prompts of different lengths
    texts = {}
    for bs in (1, 2, 5):
        path = tmp_path / f"b{bs}.jsonl"
        generate_answers(lm.model, lm.processor, qs, path, model_id="t", batch_size=bs, max_new_tokens=8,
                         prompt_format="text", num_beams=num_beams, postprocess=task.postprocess)
        texts[bs] = _texts(path)
    assert texts[1] == texts[2] == texts[5] and any(texts[1])


def test_beam_search_is_the_official_call(checkpoint, dataset):
    """commonsense_evaluate.py: generate(input_ids, GenerationConfig(temperature=0.1, top_p=0.75, top_k=40,
    num_beams=4), max_new_tokens=32), batch size 1, decode the whole sequence, split on '### Response:'."""
    from transformers import GenerationConfig

    from llava_san.commonsense import response_text

    lm = load_model(None, path=checkpoint, device="cpu")
    tok, task = lm.processor, get_benchmark("boolq")
    qs = task.load_questions(dataset / "boolq" / "test.json")
    ours = []
    from evaluation.generate import _beam_loop  # the loop python -m evaluation runs for num_beams > 1
    from llava_san.generation import GenerationInput

    _beam_loop(lm.model, tok, qs, lambda q, _: GenerationInput(encode_prompt(tok, q.answer_prompt), None, 32),
               num_beams=4, batch_size=3, on_batch=lambda b, t: ours.extend(task.postprocess(x) for x in t))
    for q, got in zip(qs, ours):
        ids = tok(generate_prompt(q.answer_prompt), return_tensors="pt")["input_ids"]
        config = GenerationConfig(temperature=0.1, top_p=0.75, top_k=40, num_beams=4, max_new_tokens=32,
                                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        with torch.no_grad():
            seq = lm.model.generate(input_ids=ids, generation_config=config)
        assert response_text(tok.batch_decode(seq, skip_special_tokens=True)[0]) == got


def test_run_folder_and_model_config(checkpoint, dataset, tmp_path):
    """(b) a training run folder of a causal LM (config.yaml whose model.build builds one; merged/), and
    the model config alone: build_from_config -> (LlamaForCausalLM, tokenizer)."""
    run_dir = tmp_path / "run"
    (run_dir / "merged").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": TINY_LLAMA}))
    for f in checkpoint.iterdir():
        (run_dir / "merged" / f.name).write_bytes(f.read_bytes())
    assert describe_path(run_dir) == "run"
    via_run = load_model(None, path=run_dir, device="cpu")
    via_cfg = load_model(OmegaConf.create(TINY_LLAMA), device="cpu")
    assert type(via_cfg.model).__name__ == "LlamaForCausalLM" and via_cfg.processor.padding_side == "left"
    qs = get_benchmark("boolq").load_questions(dataset / "boolq" / "test.json")
    got = []
    for lm, name in ((via_run, "run"), (via_cfg, "cfg")):
        generate_answers(lm.model, lm.processor, qs, tmp_path / f"{name}.jsonl", model_id=name, batch_size=2,
                         max_new_tokens=5, prompt_format="text", num_beams=4)
        got.append(_texts(tmp_path / f"{name}.jsonl"))
    assert got[0] == got[1]  # the same seed-0 weights either way


def test_cli(checkpoint, dataset, tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "evaluation", f"path={checkpoint}", f"eval_root={dataset}",
                           "benchmarks=[boolq]", "max_new_tokens=4", f"output_dir={out}",
                           f"hydra.run.dir={out}"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["boolq"]["n_questions"] == 3
    assert "LLaMA-7B LoRA r32 (DoRA repo)" in (out / "report.md").read_text()


@pytest.mark.skipif(not (ROOT / "conf" / "experiment" / "csr_tiny.yaml").is_file(),
                    reason="needs the causal-LM training recipe (conf/experiment/csr_tiny.yaml)")
def test_trained_causal_lm_run_folder(dataset, tmp_path):
    """(b) a real `python -m train experiment=csr_tiny` run (tiny LLaMA + SAN-DoRA, 2 steps): its config's
    model.build rebuilds the base, its adapter/ is loaded and merged; python -m evaluation path=<run>."""
    from train.run import run as train_run

    run_dir = tmp_path / "run"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            f"paths.output_dir={run_dir}", "experiment=csr_tiny", "trainer.accelerator=cpu", "trainer.max_steps=2",
            "evaluate_commonsense=null", "callbacks.progress_bar.refresh_rate=0", "data.n_train=64",
            "data.n_test=8", "data.val_set_size=0", f"data.cache_dir={tmp_path / 'csr'}", "optim.warmup_ratio=0.0"])
    train_run(cfg)
    assert describe_path(run_dir) == "run"
    out = tmp_path / "eval"
    results = run(_cfg(out, f"path={run_dir}", f"eval_root={dataset}", "benchmarks=[boolq]", "max_new_tokens=4",
                       "batch_size=2"))
    assert results["boolq"]["n_questions"] == 3 and results["boolq"]["coverage"]["missing"] == 0
    assert json.loads((out / "report.json").read_text())["rows"][-1]["name"] == "run"

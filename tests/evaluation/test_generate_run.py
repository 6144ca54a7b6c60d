"""python -m evaluation end to end on CPU: easy-vqa -> answers -> score -> report; a real training run
(adapter, merged, projector-only); LLaVA's eval.zip layout (TextVQA OCR prompts, ScienceQA, MMBench
base64 images, POPE); clear errors."""
import base64
import io
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from evaluation.answers import AnswerFileError
from evaluation.generate import generate_answers
from llava_san.inference.loading import LoadedModel, load_model
from evaluation.resolve import resolve_benchmark
from evaluation.run import run

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache"


def _cfg(out, *overrides, config="eval"):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name=config,
                       overrides=[f"output_dir={out}", f"paths.cache_dir={CACHE}", *overrides])


def _texts(path):
    return [json.loads(x)["text"] for x in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny():
    from llava_san.models import build_tiny

    model, processor = build_tiny(seed=0)
    return LoadedModel(model.eval(), processor, "tiny", "test")


def test_easyvqa_end_to_end(tmp_path):
    out = tmp_path / "eval"
    results = run(_cfg(out, "benchmarks=[easyvqa]", "limit=10", "max_new_tokens=5", "batch_size=4"))
    res = results["easyvqa"]
    assert res["coverage"]["expected"] == 10 and res["coverage"]["missing"] == 0 and res["n_questions"] == 10
    assert 0.0 <= res["accuracy"] <= 1.0 and set(res["per_question_type"]) <= {"colour", "shape", "yes-no"}
    assert len(_texts(out / "answers" / "easyvqa.jsonl")) == 10
    assert json.loads((out / "metrics.json").read_text()) == results
    report = json.loads((out / "report.json").read_text())
    ours = report["rows"][-1]
    paper = ["full fine-tune", "LoRA-128", "DoRA-128", "SAN+LoRA", "SAN+DoRA"]
    assert [r["name"] for r in report["rows"][:5]] == paper
    assert ours["name"] == "build_tiny" and ours["values"]["easyvqa"] == pytest.approx(100 * res["accuracy"])
    assert "first 10 of 9673" in ours["notes"]
    md = (out / "report.md").read_text()
    assert "SAN+DoRA (paper)" in md and "| build_tiny |" in md and "easy-vqa" in md
    assert (out / "eval_config.yaml").exists()


# ------------------------------------------------------------------------------------------ training runs
def _train(out, *overrides):
    from train.run import run as train_run

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            f"paths.output_dir={out}", "data=synthetic", "trainer.accelerator=cpu", "evaluate=null",
            "callbacks.progress_bar.refresh_rate=0", *overrides])
    train_run(cfg)
    return out


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A real short `python -m train` run (SAN-DoRA, big learning rate so the adapter matters), exported."""
    return _train(tmp_path_factory.mktemp("train") / "run", "peft=san_dora", "trainer.max_steps=2",
                  "optim.lr=0.3", "optim.projector_lr=0.3", "optim.warmup_ratio=0.0", "export=true")


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_trained_run_adapter_and_merged(trained_run, tmp_path):
    import hydra
    from omegaconf import OmegaConf

    from llava_san.peft import load_adapter, merge_san

    qs = resolve_benchmark("easyvqa", overrides={"cache_dir": str(CACHE / "easyvqa")}, limit=6).questions
    by_run = load_model(path=trained_run, device="cpu")
    assert by_run.model_id == "run" and "adapter" in by_run.source
    assert not any("lora_" in n or "san_" in n for n in by_run.model.state_dict())  # merged (as LLaVA does)
    build = hydra.utils.instantiate(OmegaConf.load(trained_run / "config.yaml").model.build)  # run's own model
    base, processor = build()
    manual = merge_san(load_adapter(base, trained_run / "adapter")).eval()
    torch.testing.assert_close(_weights(by_run.model), _weights(manual), rtol=0, atol=0)
    merged = load_model(path=trained_run, use_merged=True, device="cpu")
    assert merged.model_id == "run-merged"
    torch.testing.assert_close(_weights(merged.model), _weights(manual), rtol=1e-6, atol=1e-6)

    def answers(lm, name):
        generate_answers(lm.model, lm.processor, qs, tmp_path / f"{name}.jsonl", model_id=name,
                         max_new_tokens=8)
        return _texts(tmp_path / f"{name}.jsonl")

    ref = answers(by_run, "run")
    assert answers(merged, "merged") == ref
    assert answers(load_model(path=trained_run / "merged", device="cpu"), "ckpt") == ref  # a llava-hf folder
    plain, _ = build()
    assert answers(LoadedModel(plain.eval(), processor, "base", ""), "base") != ref  # the adapter matters


def test_run_via_config_and_projector_only_run(trained_run, tmp_path):
    out = tmp_path / "eval"
    res = run(_cfg(out, f"path={trained_run}", "benchmarks=[easyvqa]", "limit=4", "max_new_tokens=4"))
    assert res["easyvqa"]["coverage"]["expected"] == 4
    lines = (out / "answers" / "easyvqa.jsonl").read_text().splitlines()
    assert {json.loads(x)["model_id"] for x in lines} == {"run"}
    with pytest.raises(AnswerFileError, match="model_id 'run'"):  # another model into the same folder
        run(_cfg(out, "benchmarks=[easyvqa]", "limit=5", "max_new_tokens=4"))

    none_run = _train(tmp_path / "none", "peft=none", "debug=fast_dev_run")
    from safetensors.torch import load_file

    lm = load_model(path=none_run, device="cpu")
    saved = load_file(str(none_run / "adapter" / "extra_trainable.safetensors"))
    assert saved and all(torch.equal(lm.model.state_dict()[k], v) for k, v in saved.items())


# ---------------------------------------------------------------------------------------- eval.zip layout
def _png(path, size, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _b64(size, color):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


SA = "\nAnswer the question using a single word or phrase."
MCQ = "\nAnswer with the option's letter from the given choices directly."


@pytest.fixture(scope="module")
def eval_root(tmp_path_factory):
    """LLaVA's playground/data/eval for four benchmarks, a few questions each."""
    root = tmp_path_factory.mktemp("eval_root")
    # TextVQA: question_id = image_id, OCR tokens in the prompt
    tv = root / "textvqa"
    rows, data = [], []
    textvqa = [("what brand is this?", ["sony", "alpha"]), ("what number is shown?", ["10"])]
    for i, (q, ocr) in enumerate(textvqa):
        _png(tv / "train_images" / f"img{i}.jpg", (60, 40), (i * 90, 20, 30))
        rows.append({"question_id": f"img{i}", "image": f"img{i}.jpg",
                     "text": f"{q}\nReference OCR token: {', '.join(ocr)}{SA}"})
        data.append({"question": q, "question_id": i, "image_id": f"img{i}", "answers": [ocr[0]] * 10})
    _jsonl(tv / "llava_textvqa_val_v051_ocr.jsonl", rows)
    (tv / "TextVQA_0.5.1_val.json").write_text(json.dumps({"dataset_version": "0.5.1", "data": data}))
    # ScienceQA: CQM-A json (one text-only problem), problems.json, pid_splits.json
    sq = root / "scienceqa"
    items, probs = [], {}
    for pid, img in (("11", True), ("12", False), ("13", True)):
        body = f"Context: c{pid}\nQuestion {pid}?\nOptions: (A) x (B) y"
        item = {"id": pid, "conversations": [{"from": "human", "value": ("<image>\n" if img else "") + body},
                                             {"from": "gpt", "value": "The answer is A."}]}
        if img:
            item["image"] = f"{pid}/image.png"
            _png(sq / "images" / "test" / pid / "image.png", (50, 80), (0, 120, 200))
        items.append(item)
        probs[pid] = {"question": f"Question {pid}?", "choices": ["x", "y"], "answer": 0, "hint": f"c{pid}",
                      "image": "image.png" if img else None, "subject": "natural science", "split": "test",
                      "grade": "grade1", "category": "c", "topic": "t", "skill": "s", "task": "t",
                      "lecture": "", "solution": ""}
    (sq / "llava_test_CQM-A.json").write_text(json.dumps(items))
    (sq / "problems.json").write_text(json.dumps(probs))
    (sq / "pid_splits.json").write_text(json.dumps({"test": list(probs), "val": [], "train": []}))
    # MMBench: TSV with base64 images; circular copies (index + 1e6)
    mm = root / "mmbench"
    mm.mkdir()
    cols = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
            "l2-category", "comment", "split"]
    lines = ["\t".join(cols)]
    for idx, opts, ans in ((0, ["cat", "dog"], "A"), (1_000_000, ["dog", "cat"], "B"),
                           (1, ["red", "green", "blue"], "C")):
        row = {"index": str(idx), "question": f"Q{idx % 1_000_000}?", "hint": "Look." if idx == 1 else "",
               "A": opts[0], "B": opts[1], "C": opts[2] if len(opts) > 2 else "", "D": "", "answer": ans,
               "category": "c", "image": _b64((30, 20), (idx % 255, 0, 0)), "source": "s",
               "l2-category": "l2", "comment": "", "split": "dev"}
        lines.append("\t".join(row[c] for c in cols))
    (mm / "mmbench_dev_20230712.tsv").write_text("\n".join(lines) + "\n")
    # POPE: question file with categories, COCO images, label files
    pp = root / "pope"
    qrows = []
    for cat in ("adversarial", "popular", "random"):
        labels = []
        for i in range(2):
            img = f"COCO_val2014_{cat[:3]}{i}.jpg"
            _png(pp / "val2014" / img, (64, 48), (200, i * 100, 0))
            text = f"Is there a thing{i} in the image?"
            qrows.append({"question_id": len(qrows) + 1, "image": img, "text": text + SA, "category": cat})
            labels.append({"question_id": i + 1, "image": img, "text": text, "label": "yes" if i else "no"})
        _jsonl(pp / "coco" / f"coco_pope_{cat}.json", labels)
    _jsonl(pp / "llava_pope_test.jsonl", qrows)
    return root


def test_llava_eval_layout(eval_root, tiny, tmp_path):
    out = tmp_path / "eval"
    res = run(_cfg(out, f"eval_root={eval_root}", "benchmarks=[textvqa,scienceqa,mmbench,pope]",
                   "max_new_tokens=4", "batch_size=2"), loaded=tiny)
    assert res["textvqa"]["n_questions"] == 2 and "accuracy" in res["textvqa"]
    assert res["scienceqa"]["n_questions"] == 3 and res["scienceqa"]["n_img"] == 2
    assert "circular_accuracy" in res["mmbench"] or res["mmbench"]["headline"] in res["mmbench"]
    assert set(res["pope"]) >= {"f1_mean", "adversarial", "popular", "random"}
    read = {n: [json.loads(x) for x in (out / "answers" / f"{n}.jsonl").read_text().splitlines()]
            for n in res}
    assert read["textvqa"][0]["prompt"] == f"what brand is this?\nReference OCR token: sony, alpha{SA}"
    sq = {r["question_id"]: r["prompt"] for r in read["scienceqa"]}
    assert sq["11"].startswith("<image>\n") and not sq["12"].startswith("<image>")  # LLaVA's saved prompt
    assert [r["question_id"] for r in read["mmbench"]] == [0, 1_000_000, 1]
    # MMBench saves the prompt without the letter instruction
    assert read["mmbench"][2]["prompt"] == "Look.\nQ1?\nA. red\nB. green\nC. blue"
    assert read["mmbench"][0]["round_id"] == 0 and read["mmbench"][0]["options"] == ["cat", "dog"]
    assert (out / "answers" / "mmbench_submission.xlsx").exists()
    report = json.loads((out / "report.json").read_text())
    assert set(report["rows"][-1]["values"]) == {"textvqa", "scienceqa", "mmbench", "pope"}


def test_clear_errors(eval_root, tiny, tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark 'popee'; valid: vqav2, gqa, vizwiz"):
        run(_cfg(tmp_path / "a", "benchmarks=[popee]"), loaded=tiny)
    with pytest.raises(FileNotFoundError,
                       match=r"gqa: question file not found: .*llava_gqa_testdev_balanced\.jsonl"):
        run(_cfg(tmp_path / "b", f"eval_root={eval_root}", "benchmarks=[gqa]"), loaded=tiny)
    with pytest.raises(FileNotFoundError, match=r"pope: image folder not found: .*nowhere"):
        run(_cfg(tmp_path / "c", f"eval_root={eval_root}", "benchmarks=[pope]",
                 f"data.pope.image_folder={tmp_path / 'nowhere'}"), loaded=tiny)
    (tmp_path / "imgs").mkdir()
    with pytest.raises(FileNotFoundError,
                       match=r"pope: 6 of 6 image files not found, e.g. \[.*COCO_val2014_adv0\.jpg"):
        run(_cfg(tmp_path / "d", f"eval_root={eval_root}", "benchmarks=[pope]",
                 f"data.pope.image_folder={tmp_path / 'imgs'}"), loaded=tiny)
    with pytest.raises(FileNotFoundError, match="path=.*not a training run"):
        load_model(path=tmp_path / "imgs")


# the image classifiers (tiny_vit, vit_b16) are scored by python -m train and evaluation.vtab_report, not here
@pytest.mark.parametrize("model", sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml")
                                         if p.stem not in ("tiny_vit", "vit_b16")))
def test_eval_config_composes_with_every_model(model, tmp_path):
    from hydra.utils import instantiate

    cfg = _cfg(tmp_path, f"model={model}", "benchmarks=[gqa,pope]")
    assert callable(instantiate(cfg.model.build))  # a partial: nothing is loaded
    assert cfg.paths.output_dir == str(tmp_path) and list(cfg.benchmarks) == ["gqa", "pope"]
    assert cfg.eval_root.endswith("playground/data/eval") and cfg.batch_size == 16 and cfg.merge


def _damaged_copy(trained_run, tmp_path, name):
    import shutil

    copy = tmp_path / name
    shutil.copytree(trained_run, copy, ignore=shutil.ignore_patterns("checkpoints", "merged", "csv"))
    return copy


@pytest.mark.parametrize("damage, message", [
    ("no_manifest", "has no llava_san_adapter.json"),
    ("gamma_shape", r"san_gamma_ema has shape \(1,\)"),
    ("nan", "holds NaN or inf"),
    ("edited_alpha", r"lora_alpha \(32.0 when saved, 64.0 now\)"),
    ("bad_json", "lora_config.json is not valid JSON"),
    ("bad_field", "not a valid peft LoRA config"),
])
def test_a_damaged_adapter_folder_is_refused(trained_run, tmp_path, damage, message):
    """python -m evaluation on a run whose adapter folder was damaged refuses it, naming the file; it never
    evaluates a partly loaded model."""
    from safetensors.torch import load_file, save_file

    run_dir = _damaged_copy(trained_run, tmp_path, damage)
    adapter = run_dir / "adapter"
    if damage == "no_manifest":
        (adapter / "llava_san_adapter.json").unlink()
    elif damage in ("gamma_shape", "nan"):
        file = adapter / ("san_state.safetensors" if damage == "gamma_shape" else "adapter_model.safetensors")
        tensors = load_file(str(file))
        key = sorted(tensors)[0]
        tensors[key] = torch.ones(1) if damage == "gamma_shape" else tensors[key].clone().fill_(float("nan"))
        save_file(tensors, str(file))
    else:
        # the folder's LoRA config (a SAN folder's adapter_config.json only refuses stock peft)
        manifest = json.loads((adapter / "llava_san_adapter.json").read_text())
        cfg_file = adapter / manifest["files"]["lora_config"]
        cfg = json.loads(cfg_file.read_text())
        if damage == "edited_alpha":
            cfg["lora_alpha"] = 64
            cfg_file.write_text(json.dumps(cfg))
        elif damage == "bad_json":
            cfg_file.write_text(cfg_file.read_text()[:-20])
        else:
            cfg["r"] = "sixteen"
            cfg_file.write_text(json.dumps(cfg))
    out = tmp_path / "eval"
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run(_cfg(out, f"path={run_dir}", "benchmarks=[easyvqa]", "limit=4", "max_new_tokens=4"))
    assert not (out / "answers" / "easyvqa.jsonl").exists()


def test_projector_only_folder_says_so(tmp_path):
    none_run = _train(tmp_path / "none", "peft=none", "debug=fast_dev_run")
    manifest = json.loads((none_run / "adapter" / "llava_san_adapter.json").read_text())
    assert manifest["kind"] == "projector_only" and manifest["lora"] is None
    assert all(n.startswith("model.multi_modal_projector.") for n in manifest["extra_trainable"])

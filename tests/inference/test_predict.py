"""`python -m llava_san.predict`: a folder or a JSONL of inputs gives the batch-size-1 answers in input
order; a crashed run resumes to the same file; bad input stops before generation, naming the file."""
import json
import os
from pathlib import Path

import pytest

from evaluation.resolve import resolve_benchmark
from llava_san.data.images import load_image
from llava_san.predict import main

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "easyvqa"
MAX_NEW = 6
QUESTION = "What shape is in the image?"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Five images (easy-vqa, some cut to non-square shapes) in a folder, with a file and a folder that
    are not images; returns (folder, sorted image names, easy-vqa questions)."""
    out = tmp_path_factory.mktemp("predict") / "images"
    out.mkdir()
    qs = resolve_benchmark("easyvqa", overrides={"cache_dir": str(CACHE)}, limit=3).questions
    names = []
    for k, q in enumerate(qs):
        img = load_image(str(q.image))
        img.save(out / f"img{k}.png")
        names.append(f"img{k}.png")
        if k < 2:
            img.crop((0, 0, img.width // 2, img.height)).save(out / f"cut{k}.JPG")
            names.append(f"cut{k}.JPG")
    (out / "notes.txt").write_text("not an image")
    (out / "sub.png").mkdir()
    return out, sorted(names), [q.prompt for q in qs]


def _reference(assistant, pairs):
    """Answers one at a time (batch size 1)."""
    return [assistant.answer_many([(q, str(p))], max_new_tokens=MAX_NEW, batch_size=1)[0] for q, p in pairs]


def _run(*argv):
    return main([str(a) for a in argv])


def _lines(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def folder_answers(trained_run, assistant, folder, tmp_path_factory):
    images, names, _ = folder
    out = tmp_path_factory.mktemp("predict-out") / "answers.jsonl"
    assert _run(trained_run, "--images", images, "--question", QUESTION, "--output", out, "--batch-size", 3,
                "--max-new-tokens", MAX_NEW) == 0
    return out


def test_folder_input(assistant, folder, folder_answers):
    images, names, _ = folder
    expected = _reference(assistant, [(QUESTION, images / n) for n in names])
    assert _lines(folder_answers) == [{"image": os.path.join(str(images), n), "question": QUESTION, "text": t,
                                       "model_id": "run"} for n, t in zip(names, expected)]
    assert len(set(expected)) > 1


def test_jsonl_input(trained_run, assistant, folder, tmp_path, capsys):
    images, names, prompts = folder
    inputs = [{"image": f"images/{names[0]}", "question": prompts[0], "id": 7},
              {"image": str(images / names[1])},  # absolute; --question
              {"id": "b", "image": f"images/{names[2]}", "question": prompts[1]},
              {"image": f"images/{names[0]}", "question": prompts[2]}]
    jsonl = images.parent / "inputs.jsonl"
    lines = [json.dumps(x) for x in inputs]
    jsonl.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]))  # a blank line, no final newline
    out = tmp_path / "nested" / "answers.jsonl"
    assert _run(trained_run, "--images", jsonl, "--question", QUESTION, "--output", out, "--max-new-tokens",
                MAX_NEW) == 0
    questions = [prompts[0], QUESTION, prompts[1], prompts[2]]
    paths = [images / names[0], images / names[1], images / names[2], images / names[0]]
    expected = _reference(assistant, list(zip(questions, paths)))
    got = _lines(out)
    assert got == [{**({"id": x["id"]} if "id" in x else {}), "image": x["image"], "question": q, "text": t,
                    "model_id": "run"} for x, q, t in zip(inputs, questions, expected)]
    assert list(got[0]) == ["id", "image", "question", "text", "model_id"]
    assert "4 answers written, 0 already there (4 inputs" in capsys.readouterr().err


def test_resume_after_a_crash(trained_run, folder, folder_answers, tmp_path, capsys):
    images, _, _ = folder
    complete = folder_answers.read_bytes()
    first, second = complete.split(b"\n")[:2]
    out = tmp_path / "answers.jsonl"
    out.write_bytes(first + b"\n" + second[:len(second) // 2])  # one answer, then a line torn by the crash
    argv = [trained_run, "--images", images, "--question", QUESTION, "--output", out, "--batch-size", 2,
            "--max-new-tokens", MAX_NEW]
    assert _run(*argv) == 0
    assert out.read_bytes() == complete  # no duplicate, no loss, same order
    assert "4 answers written, 1 already there (5 inputs" in capsys.readouterr().err
    assert _run(*argv) == 0 and out.read_bytes() == complete
    assert "0 answers written, 5 already there" in capsys.readouterr().err


def test_resume_refuses_another_models_answers(trained_run, folder, folder_answers, tmp_path, capsys):
    """The same inputs answered by the run's merged/ folder (model id "merged") do not continue
    the run's file: the file is left as it was."""
    images, _, _ = folder
    out = tmp_path / "answers.jsonl"
    partial = folder_answers.read_bytes().split(b"\n")[0] + b"\n"
    out.write_bytes(partial)
    assert _run(trained_run / "merged", "--images", images, "--question", QUESTION, "--output", out,
                "--max-new-tokens", MAX_NEW) == 2
    err = capsys.readouterr().err
    assert f"{out}:1: this answer is by model 'run', not 'merged'" in err
    assert out.read_bytes() == partial


def test_bad_input_stops_before_generation(trained_run, folder, folder_answers, tmp_path, capsys):
    images, names, _ = folder

    def fails(*argv, output=tmp_path / "out.jsonl"):
        assert _run(trained_run, *argv, "--output", output) == 2
        err = capsys.readouterr().err  # nothing loads a model before these errors: one line
        assert err.startswith("llava_san.predict: error: ") and err.count("\n") == 1
        assert "Traceback" not in err
        return err

    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text(json.dumps({"image": str(images / names[0]), "question": "q"}) + "\n"
                     + json.dumps({"image": "gone.png", "question": "q"}) + "\n")
    assert f"{jsonl}:2: image file not found: {tmp_path / 'gone.png'}" in fails("--images", jsonl)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes((images / names[0]).read_bytes()[:60])  # a truncated PNG
    jsonl.write_text(json.dumps({"image": "corrupt.png", "question": "q"}) + "\n")
    assert f"cannot read image {corrupt}" in fails("--images", jsonl)
    jsonl.write_text(json.dumps({"image": names[0], "question": "q"}) + "\n"
                     + json.dumps({"image": names[1]}))
    assert f'{jsonl}:2: no "question" in the line and no --question given' in fails("--images", jsonl)
    assert "give the --question" in fails("--images", images)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"{empty}: no image files" in fails("--images", empty, "--question", "q")
    assert "no such folder or file" in fails("--images", tmp_path / "absent", "--question", "q")
    assert not (tmp_path / "out.jsonl").exists()

    # an output written for other inputs is left exactly as it was
    foreign = tmp_path / "foreign.jsonl"
    lines = folder_answers.read_text().splitlines()
    other = lines[1].replace(QUESTION, "Another question?")
    foreign.write_text(lines[0] + "\n" + other + "\n" + lines[2][:20])  # + a torn line
    before = foreign.read_bytes()
    err = fails("--images", images, "--question", QUESTION, output=foreign)
    assert f"{foreign}:2: this output line is not the answer to input 2" in err
    assert foreign.read_bytes() == before

"""`python -m llava_san.chat`: a one-shot answer (a real subprocess) is the Assistant's answer; a piped
conversation prints the answers of the growing conversation; bad input is one line and exit code 2."""
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evaluation.resolve import resolve_benchmark
from llava_san.chat import main
from llava_san.data.images import load_image
from llava_san.inference import Turn

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "easyvqa"
MAX_NEW = 8


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two easy-vqa images as files (the first cut to a non-square shape) and their questions."""
    folder = tmp_path_factory.mktemp("chat-images")
    qs = resolve_benchmark("easyvqa", overrides={"cache_dir": str(CACHE)}, limit=2).questions
    out = []
    for k, q in enumerate(qs):
        img = load_image(str(q.image))
        if k == 0:
            img = img.crop((0, 0, img.width, img.height * 2 // 3))
        img.save(folder / f"{k}.png")
        out.append((folder / f"{k}.png", q.prompt.splitlines()[0]))  # one line: a typed message
    return out


def test_one_shot_subprocess_prints_the_answer(trained_run, assistant, images):
    path, question = images[0]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "llava_san.chat", str(trained_run), "--image", str(path),
                           "--question", question, "--max-new-tokens", str(MAX_NEW), "--device", "cpu"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    expected = assistant.answer([Turn("user", question)], load_image(str(path)), MAX_NEW)
    assert expected and done.stdout == expected + "\n"


def test_one_shot_text_only_from_the_merged_folder(trained_run, assistant, capsys):
    assert main([str(trained_run / "merged"), "--question", "Hello?", "--max-new-tokens", str(MAX_NEW)]) == 0
    assert capsys.readouterr().out == assistant.answer([Turn("user", "Hello?")], None, MAX_NEW) + "\n"


def test_piped_conversation(trained_run, assistant, images, monkeypatch, capsys, tmp_path):
    (first, q1), (second, q3) = images
    q2 = "And what colour is it?"
    too_long = "red " * 2100
    script = [q1, q2, "/reset", f"/image {tmp_path / 'missing.png'}", f"/image {second}", "", too_long, q3,
              "/frobnicate", "/image", "/exit", "never read"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(script) + "\n"))
    assert main([str(trained_run), "--image", str(first), "--max-new-tokens", str(MAX_NEW)]) == 0
    out, err = capsys.readouterr()

    img1, img2 = load_image(str(first)), load_image(str(second))
    a1 = assistant.answer([Turn("user", q1)], img1, MAX_NEW)
    a2 = assistant.answer([Turn("user", q1), Turn("assistant", a1), Turn("user", q2)], img1, MAX_NEW)
    a3 = assistant.answer([Turn("user", q3)], img2, MAX_NEW)  # a new conversation about the second image
    assert a2 != assistant.answer([Turn("user", q2)], img1, MAX_NEW)  # the first exchange is in the prompt
    transcript = [f"USER: {q1}", f"ASSISTANT: {a1}", f"USER: {q2}", f"ASSISTANT: {a2}", "USER: /reset",
                  f"USER: /image {tmp_path / 'missing.png'}", f"USER: /image {second}", "USER: ",
                  f"USER: {too_long}", f"USER: {q3}", f"ASSISTANT: {a3}", "USER: /frobnicate", "USER: /image",
                  "USER: /exit"]
    assert out == "\n".join(transcript) + "\n"
    # the bad image, the long prompt and the unknown command were reported and the session went on
    assert f"image file not found: {tmp_path / 'missing.png'}" in err
    assert "reads at most 2048" in err and "unknown command '/frobnicate'" in err
    assert "/image needs a path" in err
    assert "Traceback" not in err


def test_end_of_input_ends_the_conversation(trained_run, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("/reset"))  # no newline at the end either
    assert main([str(trained_run), "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out == "USER: /reset\nUSER: \n"


def test_bad_input_is_one_line_and_exit_2(trained_run, images, tmp_path, capsys):
    def fails(*argv):
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err  # library warnings may come first, once a model is loaded
        assert err.endswith("\n") and "Traceback" not in err
        assert err.splitlines()[-1].startswith("llava_san.chat: error: ") and err.count("error:") == 1
        return err.splitlines()[-1]

    image, question = images[0]
    missing = tmp_path / "nope.png"
    assert f"image file not found: {missing}" in fails(trained_run, "--image", missing, "--question", "q")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(image.read_bytes()[:60])  # a truncated PNG
    assert f"cannot read image {corrupt}" in fails(trained_run, "--image", corrupt, "--question", "q")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"path={empty}: not a training run" in fails(empty, "--question", "q")
    assert f"path={tmp_path / 'absent'}: no such folder" in fails(tmp_path / "absent", "--question", "q")
    assert "reads at most 2048" in fails(trained_run, "--image", image, "--question", "red " * 2100)

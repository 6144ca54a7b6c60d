"""Exports other tools read as training prepared data: the exported processor's pixels and chat template,
transformers' own generate and pipeline against the project's answer loop, and `python -m llava_san.export`
(merge a finished run after the fact) with its errors."""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llava_san.inference.loading import load_model
from evaluation.resolve import resolve_benchmark
from llava_san.chat_template import chat_template
from llava_san.conversation import get_template
from llava_san.data.images import load_image, process_image
from llava_san.export import main
from llava_san.export_processor import export_processor
from llava_san.generation import PromptEncoder, generate_batch

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache"
MAX_NEW = 6


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    """easy-vqa questions: their own (square) images, and the same images cut to non-square shapes,
    saved as files (the pipeline reads paths) so that padding to a square matters."""
    folder = tmp_path_factory.mktemp("images")
    qs = resolve_benchmark("easyvqa", overrides={"cache_dir": str(CACHE / "easyvqa")}, limit=4).questions
    out = []
    for k, q in enumerate(qs):
        img = load_image(str(q.image))
        w, h = img.size
        cut = img.crop((0, 0, w, h * 3 // 5)) if k % 2 else img.crop((0, 0, w * 2 // 3, h))
        for name, im in ((f"{k}.png", img), (f"{k}-cut.png", cut)):
            im.save(folder / name)
            out.append((q.prompt, folder / name))
    return out


def _messages(question, image=None):
    parts = [{"type": "image"} if image is None else {"type": "image", "image": image}]
    return [{"role": "user", "content": parts + [{"type": "text", "text": question}]}]


# ------------------------------------------------------------------------------ processor, no training
@pytest.mark.parametrize("aspect", ["pad", "crop"])
def test_export_processor_pixels_equal_training(aspect):
    from llava_san.models import build_tiny

    _, processor = build_tiny(seed=0)
    exported = export_processor(processor, "vicuna_v1", aspect)
    rng = np.random.default_rng(0)
    for w, h in [(50, 30), (30, 51), (64, 64), (100, 37), (7, 200)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ours = process_image(img, processor.image_processor, aspect)
        theirs = exported.image_processor(images=img, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(theirs, ours, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["vicuna_v1", "plain"])
def test_chat_template_renders_the_training_prompt(name):
    from transformers.utils.chat_template_utils import render_jinja_template

    t = get_template(name)

    def render(messages, gen=True):
        return render_jinja_template(conversations=[messages], chat_template=chat_template(name),
                                     add_generation_prompt=gen)[0][0]

    question = "What colour is the shape?"
    assert render(_messages(question)) == t.render_prompt("<image>\n" + question)
    assert render([{"role": "user", "content": "text only"}]) == t.render_prompt("text only")
    turns = [{"role": "user", "content": "<image>\nq1"}, {"role": "assistant", "content": "a1"},
             {"role": "user", "content": "q2"}]
    pairs = [("human", "<image>\nq1"), ("gpt", "a1"), ("human", "q2"), ("gpt", None)]
    assert render(turns) == t.render(pairs)
    if name == "vicuna_v1":
        assert render(turns[:1], gen=False) + "ASSISTANT:" == render(turns[:1])
        system = render([{"role": "system", "content": "Be brief."}] + turns[:1])
        assert system == "Be brief. USER: <image>\nq1 ASSISTANT:"


# ---------------------------------------------------------------------------------- a trained export
def test_export_true_folder_reads_as_training(trained_run, questions):
    """(a) pixels, (b) chat template, (c) transformers' generate == the project's loop, token for token,
    (d) transformers' pipeline gives the same answer texts."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration, pipeline

    out = trained_run / "merged"
    assert (out / "chat_template.jinja").is_file()
    # torchvision is installed (timm needs it), so AutoProcessor would pick the torchvision image processor
    # whose bicubic resize differs slightly: backend="pil" is training's pixels (README "Export")
    hf_proc = AutoProcessor.from_pretrained(out, backend="pil")
    hf_model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    ours = load_model(path=out, device="cpu")  # python -m evaluation's loader
    enc = {mode: PromptEncoder(ours.processor, "vicuna_v1", mode, "pad") for mode in ("processor", "llava")}
    tok = ours.processor.tokenizer

    hf_ids, inputs = [], []
    for question, path in questions:
        image = load_image(str(path))
        prompt = hf_proc.apply_chat_template(_messages(question), add_generation_prompt=True, tokenize=False)
        assert prompt == get_template("vicuna_v1").render_prompt("<image>\n" + question)  # (b)
        batch = hf_proc(images=image, text=prompt, return_tensors="pt")
        mine = enc["processor"](f"<image>\n{question}", image, MAX_NEW)
        torch.testing.assert_close(batch["pixel_values"][0], mine.pixel_values, rtol=0, atol=0)  # (a)
        assert batch["input_ids"][0].tolist() == list(mine.input_ids)
        # tokenization=llava: LLaVA's tokenizer_image_token adds one "▁" token after the image tokens
        llava_ids = enc["llava"].encode_text(f"<image>\n{question}")
        assert len(llava_ids) == len(mine.input_ids) + 1
        with torch.no_grad():
            gen = hf_model.generate(**batch, do_sample=False, max_new_tokens=MAX_NEW)
        new = gen[0, batch["input_ids"].shape[1]:].tolist()
        hf_ids.append([t for t in new if t not in (tok.eos_token_id, tok.pad_token_id)])
        inputs.append(mine)
    loop_ids = generate_batch(ours.model, inputs, pad_token_id=tok.pad_token_id,
                              eos_token_id=tok.eos_token_id)
    assert hf_ids == loop_ids  # (c)
    assert len({tuple(x) for x in loop_ids}) > 1  # the answers depend on the question/image

    pipe = pipeline("image-text-to-text", model=str(out), processor=hf_proc)
    for (question, path), ids in zip(questions, loop_ids):  # (d)
        got = pipe(text=_messages(question, str(path)), return_full_text=False,
                   generate_kwargs={"do_sample": False, "max_new_tokens": MAX_NEW})
        assert got[0]["generated_text"].strip() == tok.decode(ids, skip_special_tokens=True).strip()


# --------------------------------------------------------------------------------------------- the CLI
def _logits(model, processor_folder):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    proc = AutoProcessor.from_pretrained(processor_folder, backend="pil")
    img = Image.new("RGB", (60, 40), (200, 30, 30))
    prompt = proc.apply_chat_template(_messages("What shape?"), add_generation_prompt=True, tokenize=False)
    batch = proc(images=img, text=prompt, return_tensors="pt")
    if not isinstance(model, torch.nn.Module):
        model = LlavaForConditionalGeneration.from_pretrained(model)
    with torch.no_grad():
        return model.eval()(**batch).logits


def test_cli_merges_a_run_like_export_true(trained_run, tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    out = tmp_path / "exported"
    done = subprocess.run([sys.executable, "-m", "llava_san.export", str(trained_run), str(out)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    merged = trained_run / "merged"
    torch.testing.assert_close(_logits(out, out), _logits(merged, out), rtol=0, atol=1e-5)
    for name in ("chat_template.jinja", "processor_config.json", "tokenizer.model"):
        assert (out / name).read_bytes() == (merged / name).read_bytes(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    base, _ = instantiate(OmegaConf.load(trained_run / "config.yaml").model.build)()
    assert (_logits(base, out) - _logits(out, out)).abs().max() > 1e-3  # the adapter is in

    again = subprocess.run([sys.executable, "-m", "llava_san.export", str(trained_run), str(out)], cwd=ROOT,
                           capture_output=True, text=True)
    assert again.returncode == 2 and "not empty" in again.stderr and str(out) in again.stderr
    assert "Traceback" not in again.stderr
    assert main([str(trained_run), str(out), "--overwrite"]) == 0
    torch.testing.assert_close(_logits(out, out), _logits(merged, out), rtol=0, atol=1e-5)


def test_cli_errors(trained_run, tmp_path, capsys):
    def fails(run, out, *extra):
        assert main([str(run), str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and not Path(out).exists()
        return err

    assert "not a training run folder" in fails(tmp_path, tmp_path / "o1")
    assert "is not a folder" in fails(tmp_path / "missing", tmp_path / "o2")
    no_adapter = tmp_path / "no_adapter"
    no_adapter.mkdir()
    shutil.copy(trained_run / "config.yaml", no_adapter / "config.yaml")
    assert "no adapter/ folder" in fails(no_adapter, tmp_path / "o3")
    damaged = tmp_path / "damaged"
    shutil.copytree(trained_run / "adapter", damaged / "adapter")
    shutil.copy(trained_run / "config.yaml", damaged / "config.yaml")
    weights = next((damaged / "adapter").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    err = fails(damaged, tmp_path / "o4")
    assert str(damaged) in err and "damaged" in err
    assert "would replace the run folder" in fails(trained_run, trained_run / "adapter" / "x", "--overwrite")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert main([str(no_adapter), str(taken)]) == 2 and (taken / "keep.txt").read_text() == "mine"

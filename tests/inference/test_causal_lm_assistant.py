"""A text-only causal LM (the LLaMA path) through `python -m llava_san.chat`: the answer is transformers'
own greedy decoding of LLM-Adapters' evaluation prompt; a LLaMA training run answers as its export does;
images are refused, and predict / serve say they serve LLaVA models: one line, exit code 2."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from llava_san.chat import main as chat_main
from llava_san.commonsense import encode_prompt
from llava_san.inference import Assistant, CausalLmAssistant, Turn
from llava_san.models import build_tiny_causal_lm
from llava_san.predict import main as predict_main

ROOT = Path(__file__).resolve().parents[2]
QUESTION = "Please choose the correct answer: which one is a bird? Answer format: answer1/answer2"
MAX_NEW = 12


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    model, tok = build_tiny_causal_lm(seed=3, initializer_range=0.2)  # peaked logits: a varied answer
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _hf_greedy(folder: Path, question: str) -> str:
    """The reference: transformers' generate (greedy) on the evaluation prompt's ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    ids = torch.tensor([encode_prompt(tok, question)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                         num_beams=1, pad_token_id=0, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True).strip()


def test_chat_answers_as_transformers_greedy(llama_folder, capsys):
    assert chat_main([str(llama_folder), "--question", QUESTION, "--max-new-tokens", str(MAX_NEW),
                      "--device", "cpu"]) == 0
    answer = capsys.readouterr().out.rstrip("\n")
    expected = _hf_greedy(llama_folder, QUESTION)
    assert answer == expected and answer  # a non-empty answer, token for token transformers' greedy one


def test_assistant_prompt_and_batched_answers(llama_folder):
    assistant = Assistant.load(llama_folder, device="cpu")
    assert isinstance(assistant, CausalLmAssistant)
    # the latest message alone, in LLM-Adapters' evaluation prompt; earlier turns are checked, not used
    turns = [Turn("user", "first"), Turn("assistant", "x"), Turn("user", QUESTION)]
    assert assistant.render(turns, False).endswith(f"### Instruction:\n                {QUESTION}\n\n"
                                                   "                ### Response:\n                ")
    one = assistant.answer([Turn("user", QUESTION)], max_new_tokens=MAX_NEW)
    assert assistant.answer(turns, max_new_tokens=MAX_NEW) == one
    many = assistant.answer_many([(QUESTION, None), ("Is the sky green? Answer format: true/false", None)],
                                 max_new_tokens=MAX_NEW, batch_size=2)
    assert many[0] == one  # batched (left-padded) equals one at a time
    with pytest.raises(ValueError, match="text-only"):
        assistant.answer([Turn("user", QUESTION)], image=object())
    with pytest.raises(ValueError, match="text-only"):
        assistant.answer_many([(QUESTION, "img.png")])
    with pytest.raises(ValueError, match="roles must alternate"):
        assistant.answer([Turn("user", "a"), Turn("user", "b")])
    with pytest.raises(ValueError, match="Alpaca"):
        Assistant.load(llama_folder, device="cpu", template="vicuna_v1")


def test_llama_training_run_answers_as_its_export(tmp_path, capsys):
    """The crash this fixes: a LLaMA run folder given to chat. Its answer equals its merged export's."""
    from train.run import run

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            f"paths.output_dir={tmp_path}", "experiment=csr_tiny", "trainer.max_steps=10", "export=true",
            "evaluate_commonsense=null", "data.num_workers=0", "callbacks.progress_bar.refresh_rate=0"])
    run(cfg)
    capsys.readouterr()  # the run's own report
    answers = []
    for folder in (tmp_path, tmp_path / "merged"):
        assert chat_main([str(folder), "--question", QUESTION, "--max-new-tokens", str(MAX_NEW),
                          "--device", "cpu"]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1]


def test_image_predict_and_serve_are_refused_in_one_line(llama_folder, tmp_path, capsys):
    from PIL import Image

    png = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(png)
    assert chat_main([str(llama_folder), "--image", str(png), "--question", "hi", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (after transformers' loading bar)
    assert err.startswith("llava_san.chat: error:") and "text-only causal LM" in err
    out = tmp_path / "answers.jsonl"
    assert predict_main([str(llama_folder), "--images", str(png), "--question", "hi", "--output", str(out),
                         "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("llava_san.predict: error:") and "python -m llava_san.chat" in err
    assert not out.exists()
    done = subprocess.run([sys.executable, "-m", "llava_san.serve", str(llama_folder), "--port", "0",
                           "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "text-only causal LM" in done.stderr

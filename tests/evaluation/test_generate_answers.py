"""Answer files: line-by-line appends, resume after a crash (torn last line, killed process), LLaVA's
contiguous chunks and their merge (the union of the chunks equals the unsharded answers)."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from evaluation.answers import AnswerFileError
from evaluation.generate import generate_answers
from evaluation.journal import AnswerFile
from llava_san.inference.loading import LoadedModel
from evaluation.resolve import resolve_benchmark
from evaluation.run import run
from evaluation.shards import answer_paths, chunk_slice, merge_answer_files

ROOT = Path(__file__).resolve().parents[2]
N = 12  # easy-vqa questions used here
FIELDS = ("question_id", "prompt", "text", "model_id", "metadata")


def _cfg(out, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="eval", overrides=[
            f"output_dir={out}", "benchmarks=[easyvqa]", f"limit={N}", "max_new_tokens=6", "batch_size=4",
            f"paths.cache_dir={ROOT / '.cache'}", *overrides])


def _lines(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def _core(records):
    return [{k: r[k] for k in FIELDS} for r in records]


@pytest.fixture(scope="module")
def tiny():
    # the tiny model exactly as conf/model/tiny.yaml builds it (what `python -m evaluation` loads by default)
    import hydra
    from omegaconf import OmegaConf

    build = OmegaConf.load(ROOT / "conf" / "model" / "tiny.yaml").build
    build.seed = 0
    model, processor = hydra.utils.instantiate(build)()
    return LoadedModel(model.eval(), processor, "tiny-test", "test")


@pytest.fixture(scope="module")
def questions():
    cache = str(ROOT / ".cache" / "easyvqa")
    return resolve_benchmark("easyvqa", overrides={"cache_dir": cache}, limit=N).questions


@pytest.fixture(scope="module")
def reference(tiny, questions, tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "easyvqa.jsonl"
    generate_answers(tiny.model, tiny.processor, questions, path, model_id=tiny.model_id, max_new_tokens=6,
                     batch_size=4)
    return _lines(path)


def llava_get_chunk(lst, n, k):
    """LLaVA's model_vqa_loader split_list / get_chunk."""
    chunk_size = math.ceil(len(lst) / n)
    return [lst[i:i + chunk_size] for i in range(0, len(lst), chunk_size)][k]


@pytest.mark.parametrize("n,k", [(10, 1), (10, 3), (10, 4), (12, 4), (7, 7), (1000, 8), (5, 2)])
def test_chunks_are_llavas(n, k):
    items = list(range(n))
    got = [items[chunk_slice(n, k, i)] for i in range(k)]
    assert sum(got, []) == items
    for i in range(k):
        assert got[i] == llava_get_chunk(items, k, i)
    assert items[chunk_slice(10, 6, 5)] == []  # LLaVA: IndexError (only 5 chunks of 2); here empty
    with pytest.raises(ValueError, match="chunk_idx"):
        chunk_slice(10, 2, 2)


def test_answer_lines_are_llava_records(reference, questions):
    assert [r["question_id"] for r in reference] == [q.question_id for q in questions]
    for r, q in zip(reference, questions):
        assert set(r) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert r["prompt"] == q.prompt
        assert r["prompt"].endswith("\nAnswer the question using a single word or phrase.")
        assert "<image>" not in r["prompt"] and r["model_id"] == "tiny-test"
        assert r["text"] == r["text"].strip()
    assert len({r["text"] for r in reference}) > 1


def test_resume_after_torn_line(tiny, questions, reference, tmp_path):
    path = tmp_path / "answers.jsonl"
    raw = ("\n".join(json.dumps(r, ensure_ascii=False) for r in reference) + "\n").encode()
    cut = sum(len(line) + 1 for line in raw.split(b"\n")[:5]) + 17  # 5 lines + a third of the 6th
    path.write_bytes(raw[:cut])
    f = AnswerFile(path, [str(q.question_id) for q in questions], "tiny-test")
    assert len(f.done) == 5 and f.truncated_bytes == 17 and path.read_bytes().endswith(b"\n")
    stats = generate_answers(tiny.model, tiny.processor, questions, path, model_id="tiny-test",
                             max_new_tokens=6, batch_size=3)
    assert (stats["resumed"], stats["generated"]) == (5, N - 5)
    assert _core(_lines(path)) == _core(reference)  # no duplicate, no loss, same answers, question order
    again = generate_answers(tiny.model, tiny.processor, questions, path, model_id="tiny-test",
                             max_new_tokens=6)
    assert again["generated"] == 0 and len(_lines(path)) == N


def test_damaged_or_foreign_files_stop(questions, tmp_path):
    ids = [str(q.question_id) for q in questions]
    good = json.dumps({"question_id": 0, "text": "a", "model_id": "m"})
    cases = {
        "not json": (good + "\n{oops\n" + good.replace('"question_id": 0', '"question_id": 1') + "\n",
                     ":2: not a JSON"),
        "twice": (good + "\n" + good + "\n", "answered twice"),
        "unknown": (json.dumps({"question_id": 99999, "text": "a"}) + "\n", "not a question of this run"),
        "other model": (json.dumps({"question_id": 0, "text": "a", "model_id": "other"}) + "\n",
                        "model_id 'other'"),
    }
    for name, (content, match) in cases.items():
        p = tmp_path / f"{name}.jsonl"
        p.write_text(content)
        with pytest.raises(AnswerFileError, match=match):
            AnswerFile(p, ids, "m")


def test_union_of_chunks_equals_unsharded(tiny, reference, tmp_path):
    out = tmp_path / "sharded"
    run(_cfg(out, "num_chunks=3", "score=false"), loaded=tiny)  # all chunks in process, then merged
    merged, chunks = answer_paths(out, "easyvqa", 3)
    assert [len(_lines(c)) for c in chunks] == [4, 4, 4]
    assert _core(_lines(merged)) == _core(reference)
    # a worker answers its chunk only and stops (no merge, no score)
    worker = tmp_path / "worker"
    assert run(_cfg(worker, "num_chunks=3", "chunk_idx=1"), loaded=tiny) == {}
    _, wchunks = answer_paths(worker, "easyvqa", 3)
    assert not wchunks[0].exists() and not (worker / "answers" / "easyvqa.jsonl").exists()
    assert _core(_lines(wchunks[1])) == _core(reference[4:8])
    # merging refuses incomplete chunks and names what to rerun
    with pytest.raises(ValueError, match=r"chunk 0/3: .* is missing .*chunk_idx=0"):
        run(_cfg(worker, "num_chunks=3", "generate=false"), loaded=tiny)
    lines = wchunks[1].read_text().splitlines(keepends=True)
    wchunks[1].write_text("".join(lines[:-1]))
    ids = [[str(r["question_id"]) for r in reference[i * 4:(i + 1) * 4]] for i in range(3)]
    with pytest.raises(ValueError, match="chunk 1/3: .* 3/4 answers; rerun chunk_idx=1"):
        merge_answer_files([chunks[0], wchunks[1], chunks[2]], ids, tmp_path / "m.jsonl")


def test_killed_process_resumes(reference, tmp_path):
    """A real crash: SIGKILL `python -m evaluation` mid-run, then the same command finishes the file."""
    out = tmp_path / "killed"
    answers = out / "answers" / "easyvqa.jsonl"
    args = [f"output_dir={out}", "benchmarks=[easyvqa]", f"limit={N}", "max_new_tokens=6", "batch_size=1",
            "model_id=tiny-test", f"paths.cache_dir={ROOT / '.cache'}", f"hydra.run.dir={out}",
            "num_workers=0"]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen([sys.executable, "-m", "evaluation", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if answers.exists() and answers.read_bytes().count(b"\n") >= 3:
                break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    n_before = answers.read_bytes().count(b"\n")
    assert 3 <= n_before < N, "the process should have been killed mid-run"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[a for a in args if not a.startswith("hydra.")])
    results = run(cfg)
    assert _core(_lines(answers)) == _core(reference)
    coverage = results["easyvqa"]["coverage"]
    assert coverage["expected"] == N and coverage["duplicates"] == 0


def test_launcher_runs_chunk_workers_then_merges(tiny, reference, tmp_path, monkeypatch):
    """num_chunks=K without chunk_idx: K workers `python -m evaluation --config-path <out> --config-name
    eval_config chunk_idx=i`, one per device, then merge and score in the parent. The workers run in
    this process here (a fake Popen composes their command line with Hydra, as the CLI would), so the
    test needs no K interpreter starts (a real 2-process launch takes ~50 s on this CPU)."""
    import evaluation.launch as launch

    launched = []

    class FakePopen:
        def __init__(self, cmd, env, stdout, stderr):
            assert cmd[1:3] == ["-m", "evaluation"]
            config_path = cmd[cmd.index("--config-path") + 1]
            config_name = cmd[cmd.index("--config-name") + 1]
            overrides = [a for a in cmd[cmd.index("--config-name") + 2:] if not a.startswith("hydra.")]
            launched.append((overrides, env.get("CUDA_VISIBLE_DEVICES")))
            with initialize_config_dir(config_dir=config_path, version_base="1.3"):
                cfg = compose(config_name=config_name, overrides=overrides)
            self.rc = 0 if run(cfg, loaded=tiny) == {} else 1

        def wait(self):
            return self.rc

    monkeypatch.setattr(launch.subprocess, "Popen", FakePopen)
    out = tmp_path / "launch"
    results = run(_cfg(out, "num_chunks=2", "model_id=tiny-test", "devices=[3,5]"))
    assert launched == [(["chunk_idx=0"], "3"), (["chunk_idx=1"], "5")]
    merged, chunks = answer_paths(out, "easyvqa", 2)
    assert [len(_lines(c)) for c in chunks] == [6, 6]
    assert _core(_lines(merged)) == _core(reference)
    assert results["easyvqa"]["coverage"]["expected"] == N

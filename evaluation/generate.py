"""Generation half of the evaluation: model -> LLaVA answer jsonl, resumable and sharded; then the run.

``python -m evaluation`` (``evaluation/__main__.py``, ``conf/eval.yaml``) calls :func:`run`:

1. resolve every benchmark's files (LLaVA's ``eval.zip`` layout under ``eval_root``, or per-benchmark
   overrides; easy-vqa from its cache) and read the questions, before any model is loaded, so a
   missing file or image folder fails in seconds with its path;
2. load the model (:func:`load_model`): a training run folder (base rebuilt from the run's config +
   ``adapter/``), its ``merged/`` folder, a llava-hf checkpoint, or any ``conf/model`` config;
3. answer the questions (:func:`generate_answers`): prompts exactly as LLaVA-1.5 builds them
   (:mod:`evaluation.tasks`), encoded by the training data code, greedy in batches
   (:mod:`llava_san.generation`), appended to the answer file line by line;
4. merge the chunk files of a sharded run (:func:`merge_answer_files`), score each benchmark
   (:func:`evaluation.score.score_benchmark`) and write ``metrics.json`` + ``report.md``/``report.json``
   (+ ``generation.json``: questions/s of this session, ``eval_config.yaml``: the resolved config).

Answer files (``<output_dir>/answers/<benchmark>.jsonl``) hold LLaVA's answer lines
(``question_id, prompt, text, answer_id, model_id, metadata`` + benchmark extras) in question order.

**Resume.** Each answer is one line written in one ``write`` and flushed; every batch is fsynced.
When a run restarts on the same file (:class:`AnswerFile`), bytes after the last newline (a line
torn by a crash) are cut off, the answered ``question_id`` s are skipped, and the rest is generated:
no duplicate, no loss. A complete line that is not JSON, a duplicate id, an id outside the run's
questions or a different ``model_id`` stop the run with the line number (the file is not ours to fix).

**Sharding** (LLaVA's ``--num-chunks K --chunk-idx i``): the (limited) question list is split into
``K`` contiguous chunks of ``ceil(n / K)`` questions (:func:`chunk_slice`, LLaVA's ``get_chunk``);
``chunk_idx=i`` answers chunk ``i`` into ``answers/<benchmark>/<K>_<i>.jsonl`` and stops. Without
``chunk_idx`` and with ``num_chunks=K > 1``, :func:`run` starts the ``K`` chunk workers itself (one per
GPU of ``devices``/``CUDA_VISIBLE_DEVICES``), then merges: the chunk files are checked complete
(each holds exactly its chunk's ids) and concatenated in chunk order into ``answers/<benchmark>.jsonl``.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import subprocess
import sys
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

from evaluation.answers import AnswerFileError, canonical_id, read_answers
from evaluation.tasks import BENCHMARKS, get_benchmark, llava_paths
from evaluation.tasks.base import EvalQuestion
from evaluation.files import DataFileError, atomic_write, write_json

__all__ = [
    "AnswerFile",
    "BenchmarkData",
    "LoadedModel",
    "answer_paths",
    "chunk_slice",
    "generate_answers",
    "load_model",
    "merge_answer_files",
    "resolve_benchmark",
    "run",
    "score_answers",
]

log = logging.getLogger("evaluation.generate")

#: Benchmarks whose scorer restricts the expected ids to the ``questions`` it is given, so a run with
#: ``limit`` is scored on its own questions. POPE (labels paired by position) and MMBench (ids from
#: the TSV) are scored on the whole file with missing answers allowed (reported in the coverage).
SUBSET_SCORABLE = ("vqav2", "gqa", "vizwiz", "scienceqa", "textvqa", "easyvqa")


# ==================================================================================================
# benchmark files and questions
# ==================================================================================================
@dataclass
class BenchmarkData:
    """A benchmark's files and the questions of this run (after ``limit``, before sharding)."""

    name: str
    questions_file: Path
    image_folder: Optional[Path]
    annotations: Optional[Path]
    questions: list[EvalQuestion]
    options: dict[str, Any] = field(default_factory=dict)  # extra scorer options (scienceqa pid_splits)
    extra_files: dict[str, Path] = field(default_factory=dict)  # e.g. vqav2 submission_questions
    total: int = 0  # questions in the file (before limit)

    @property
    def limited(self) -> bool:
        """Whether ``limit`` dropped questions."""
        return len(self.questions) < self.total


def _override(overrides: Mapping[str, Any] | None, key: str) -> Any:
    if not overrides:
        return None
    value = overrides.get(key)
    return None if value in (None, "") else value


def resolve_benchmark(
    name: str,
    *,
    eval_root: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    limit: Optional[int] = None,
    check_images: bool = True,
) -> BenchmarkData:
    """Find ``name``'s files and read its questions; every problem raises with the path in the message.

    Files: ``overrides`` (``questions``, ``image_folder``, ``annotations``, ``pid_splits``,
    ``split``; easy-vqa: ``cache_dir``) win over LLaVA's ``eval.zip`` layout under ``eval_root``
    (:func:`evaluation.tasks.llava_paths`). easy-vqa is prepared in ``overrides["cache_dir"]``
    (:func:`llava_san.data.easyvqa.prepare_easyvqa`). ``limit`` keeps the first questions. With
    ``check_images`` every image file of the kept questions must exist.
    """
    bench = get_benchmark(name)  # unknown names list the valid ones
    if name == "easyvqa":
        from llava_san.data.easyvqa import prepare_easyvqa

        cache = _override(overrides, "cache_dir") or ".cache/easyvqa"
        paths = prepare_easyvqa(str(cache))
        layout = {
            "questions": Path(paths.test_questions),
            "image_folder": Path(paths.image_folder),
            "annotations": Path(paths.test_answers),
        }
    else:
        if eval_root is None and not _override(overrides, "questions"):
            raise ValueError(f"{name}: set eval_root (LLaVA's playground/data/eval) or data.{name}.questions")
        layout = llava_paths(name, eval_root) if eval_root is not None else {}
    files: dict[str, Any] = dict(layout)
    for key in ("questions", "image_folder", "annotations", "pid_splits", "submission_questions"):
        value = _override(overrides, key)
        if value is not None:
            files[key] = Path(str(value)).expanduser()
    questions_file = files.get("questions")
    if questions_file is None or not Path(questions_file).is_file():
        raise FileNotFoundError(
            f"{name}: question file not found: {questions_file} (LLaVA's eval.zip layout under "
            f"eval_root={eval_root}; or set data.{name}.questions=...)"
        )
    image_folder = files.get("image_folder")
    if image_folder is not None and not Path(image_folder).is_dir():
        raise FileNotFoundError(
            f"{name}: image folder not found: {image_folder} (set data.{name}.image_folder=... or eval_root)"
        )
    annotations = files.get("annotations")
    if annotations is not None and not Path(annotations).exists():
        if name in ("vqav2", "vizwiz"):  # test splits have no ground truth: answers + upload file only
            annotations = None
        else:
            raise FileNotFoundError(
                f"{name}: annotations not found: {annotations} (needed to score; set "
                f"data.{name}.annotations=... or score=false)"
            )
    options: dict[str, Any] = {}
    extra: dict[str, Path] = {}
    if name == "scienceqa":
        if files.get("pid_splits") is not None and Path(files["pid_splits"]).is_file():
            options["pid_splits"] = Path(files["pid_splits"])
        split = _override(overrides, "split")
        if split is not None:
            options["split"] = str(split)
    if name == "vqav2" and files.get("submission_questions") is not None:
        if Path(files["submission_questions"]).is_file():
            extra["submission_questions"] = Path(files["submission_questions"])

    questions = bench.load_questions(questions_file, image_folder)
    total = len(questions)
    if limit is not None:
        if int(limit) < 1:
            raise ValueError(f"limit must be a positive number of questions, got {limit}")
        questions = questions[: int(limit)]
    ids = [canonical_id(q.question_id) for q in questions]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dups = [i for i in ids if i in seen or seen.add(i)]
        raise DataFileError(
            f"{questions_file}: duplicate question_id(s) {dups[:5]}; answers could not be resumed")
    if check_images:
        missing = [q.image for q in questions
                   if isinstance(q.image, (str, os.PathLike)) and not Path(q.image).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{name}: {len(missing)} of {len(questions)} image files not found, "
                f"e.g. {[str(m) for m in missing[:3]]} "
                f"(image folder: {image_folder})"
            )
    return BenchmarkData(
        name=name,
        questions_file=Path(questions_file),
        image_folder=Path(image_folder) if image_folder is not None else None,
        annotations=Path(annotations) if annotations is not None else None,
        questions=questions,
        options=options,
        extra_files=extra,
        total=total,
    )


# ==================================================================================================
# sharding
# ==================================================================================================
def chunk_slice(n: int, num_chunks: int, chunk_idx: int) -> slice:
    """LLaVA's ``get_chunk``: contiguous chunks of ``ceil(n / num_chunks)`` items; chunk ``chunk_idx``.

    A chunk past the end (more chunks than needed) is empty, where LLaVA raises ``IndexError``.
    """
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    if not 0 <= chunk_idx < num_chunks:
        raise ValueError(f"chunk_idx must be in [0, {num_chunks}), got {chunk_idx}")
    size = math.ceil(n / num_chunks) if n else 0
    start = min(chunk_idx * size, n)
    return slice(start, min(start + size, n))


def answer_paths(output_dir: str | os.PathLike, name: str, num_chunks: int = 1) -> tuple[Path, list[Path]]:
    """``(merged answer file, chunk files)``: ``answers/<name>.jsonl`` and, with ``num_chunks > 1``,
    ``answers/<name>/<K>_<i>.jsonl`` (LLaVA's naming); without sharding the chunk list is the file itself."""
    answers = Path(output_dir) / "answers"
    merged = answers / f"{name}.jsonl"
    if num_chunks == 1:
        return merged, [merged]
    return merged, [answers / name / f"{num_chunks}_{i}.jsonl" for i in range(num_chunks)]


# ==================================================================================================
# answer files
# ==================================================================================================
class AnswerFile:
    """An answer jsonl that a (possibly restarted) run appends to.

    On opening, an existing file is checked and repaired (see the module docstring): ``done`` holds
    the canonical ids already answered. :meth:`append` writes records one line each, flushed, and
    fsyncs once per call.

    Args:
        path: the answer file (created with its folder when absent).
        expected_ids: the question ids this file may hold (canonical form, :func:`canonical_id`).
        model_id: when given, every existing line must have this ``model_id``.
    """

    def __init__(self, path: str | os.PathLike, expected_ids: Sequence[str], model_id: Optional[str] = None):
        self.path = Path(path)
        self.expected = set(expected_ids)
        self.model_id = model_id
        self.done: set[str] = set()
        self.truncated_bytes = 0
        self._fh = None
        self._scan()

    def _scan(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        keep = data.rfind(b"\n") + 1  # everything after the last newline is a torn line
        if keep < len(data):
            self.truncated_bytes = len(data) - keep
            log.warning("%s: cutting a torn last line (%d bytes) left by an interrupted run",
                        self.path, self.truncated_bytes)
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())
        for lineno, raw in enumerate(data[:keep].split(b"\n")[:-1], start=1):
            if not raw.strip():
                continue
            where = f"{self.path}:{lineno}"
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise AnswerFileError(
                    f"{where}: not a JSON line ({e}); only a torn *last* line is repaired on resume: "
                    "fix or delete the file") from None
            if not isinstance(obj, dict) or "question_id" not in obj or not isinstance(obj.get("text"), str):
                raise AnswerFileError(f"{where}: not an answer line (needs question_id and text)")
            qid = canonical_id(obj["question_id"])
            if qid in self.done:
                raise AnswerFileError(f"{where}: question_id {qid!r} answered twice")
            if qid not in self.expected:
                raise AnswerFileError(
                    f"{where}: question_id {qid!r} is not a question of this run (another benchmark, "
                    "chunk or limit wrote this file?); use another output_dir or delete the file")
            if self.model_id is not None and obj.get("model_id") not in (None, self.model_id):
                raise AnswerFileError(
                    f"{where}: answered by model_id {obj.get('model_id')!r}, this run is {self.model_id!r}; "
                    "use another output_dir (or delete the file) to evaluate another model")
            self.done.add(qid)

    def append(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Append ``records`` (one JSON object per line), flush each line, fsync the batch."""
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")
        for r in records:
            qid = canonical_id(r["question_id"])
            if qid in self.done:
                raise AnswerFileError(f"{self.path}: question_id {qid!r} would be written twice")
            self._fh.write(json.dumps(r, ensure_ascii=False) + "\n")
            self._fh.flush()
            self.done.add(qid)
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "AnswerFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def merge_answer_files(chunk_files: Sequence[str | os.PathLike], chunk_ids: Sequence[Sequence[str]],
                       out: str | os.PathLike) -> Path:
    """Concatenate complete chunk files in chunk order into ``out`` (atomically), each chunk's lines
    in its question order. A chunk file that is missing or does not hold exactly its chunk's ids
    raises ``ValueError`` naming the chunk and what to rerun."""
    problems = []
    lines: list[str] = []
    k = len(chunk_files)
    for i, (path, ids) in enumerate(zip(chunk_files, chunk_ids)):
        path = Path(path)
        if not path.exists():
            if ids:
                problems.append(f"chunk {i}/{k}: {path} is missing ({len(ids)} questions; run chunk_idx={i})")
            continue
        answers = read_answers(path)
        got = [canonical_id(a.question_id) for a in answers]
        want = set(ids)
        extra = [g for g in got if g not in want]
        dups = len(got) - len(set(got))
        missing = want - set(got)
        if extra or dups or missing:
            problems.append(
                f"chunk {i}/{k}: {path} has {len(set(got) & want)}/{len(want)} answers"
                + (f", {dups} duplicate(s)" if dups else "")
                + (f", {len(extra)} outside the chunk (e.g. {extra[:3]})" if extra else "")
                + (f"; rerun chunk_idx={i} to finish it" if missing else ""))
            continue
        order = {qid: n for n, qid in enumerate(ids)}
        for a in sorted(answers, key=lambda a: order[canonical_id(a.question_id)]):
            lines.append(json.dumps(dict(a.record), ensure_ascii=False) + "\n")
    if problems:
        raise ValueError(f"cannot merge into {out}: " + "; ".join(problems))
    with atomic_write(out) as f:
        f.writelines(lines)
    return Path(out)


# ==================================================================================================
# generation
# ==================================================================================================
def _question_image(q: EvalQuestion) -> Any:
    if q.image is None:
        return None
    if callable(q.image):
        return q.load_image()  # MMBench: decoded from base64
    from llava_san.data.images import load_image

    return load_image(os.fspath(q.image))  # clear error naming the file


def _prefetched(batches: Sequence[Sequence[EvalQuestion]], prepare: Callable[[EvalQuestion], Any],
                workers: int, depth: int = 2) -> Iterator[tuple[Sequence[EvalQuestion], list[Any]]]:
    """``(batch, [prepare(q) for q in batch])`` in order; with ``workers > 0`` the next ``depth``
    batches are prepared in threads (image decoding + CLIP preprocessing) while one generates."""
    if workers <= 0:
        for b in batches:
            yield b, [prepare(q) for q in b]
        return
    ex = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="eval-prep")
    pending: deque = deque()
    it = iter(batches)

    def submit() -> None:
        b = next(it, None)
        if b is not None:
            pending.append((b, [ex.submit(prepare, q) for q in b]))

    try:
        for _ in range(depth):
            submit()
        while pending:
            b, futures = pending.popleft()
            submit()
            yield b, [f.result() for f in futures]
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def generate_answers(
    model: Any,
    processor: Any,
    questions: Sequence[EvalQuestion],
    answers_file: str | os.PathLike,
    *,
    model_id: str,
    batch_size: int = 16,
    max_new_tokens: Optional[int] = None,
    template: str = "vicuna_v1",
    tokenization: str = "llava",
    image_aspect_ratio: str = "pad",
    num_workers: int = 2,
    log_every_s: float = 30.0,
) -> dict[str, Any]:
    """Answer ``questions`` into ``answers_file``, skipping those already answered there (resume).

    Each question's user message is :meth:`EvalQuestion.model_prompt` (``<image>\\n`` + prompt),
    encoded by :class:`llava_san.generation.PromptEncoder` (training's template, tokenization and
    image preprocessing) and answered greedily, ``batch_size`` at a time, for at most the question's
    ``max_new_tokens`` (or ``max_new_tokens`` when given). Returns counts and timing.
    """
    from llava_san.generation import GenerationInput, PromptEncoder, decode, generate_batch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    encoder = PromptEncoder(processor, template, tokenization, image_aspect_ratio)
    tok = processor.tokenizer
    ids = [canonical_id(q.question_id) for q in questions]
    t0 = time.perf_counter()
    with AnswerFile(answers_file, ids, model_id) as out:
        todo = [q for q, i in zip(questions, ids) if i not in out.done]
        resumed = len(questions) - len(todo)
        if resumed:
            log.info("%s: %d/%d questions already answered; resuming", answers_file, resumed, len(questions))

        def pixels(q: EvalQuestion):  # in the prefetch threads (the tokenizer stays in this thread)
            image = _question_image(q)
            return None if image is None else encoder.pixel_values(image)

        def _input(q: EvalQuestion, pv: Any) -> GenerationInput:
            message = q.model_prompt()
            if message.count("<image>") != (pv is not None):
                raise ValueError(f"question {q.question_id!r}: {message.count('<image>')} <image> "
                                 f"placeholder(s) for {int(pv is not None)} image(s) in {message[:80]!r}")
            return GenerationInput(encoder.encode_text(message), pv, max_new_tokens or q.max_new_tokens)

        batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
        was_training = model.training
        model.eval()
        last_log, n_done = time.perf_counter(), 0
        try:
            for batch, pvs in _prefetched(batches, pixels, num_workers):
                inputs = [_input(q, pv) for q, pv in zip(batch, pvs)]
                new = generate_batch(model, inputs, pad_token_id=tok.pad_token_id,
                                     eos_token_id=tok.eos_token_id)
                out.append([
                    q.answer_record(decode(tok, x), answer_id=uuid.uuid4().hex, model_id=model_id,
                                    metadata={})
                    for q, x in zip(batch, new)
                ])
                n_done += len(batch)
                if time.perf_counter() - last_log > log_every_s:
                    rate = n_done / (time.perf_counter() - t0)
                    log.info("%s: %d/%d answered (%.2f questions/s, ~%.0f s left)", Path(answers_file).name,
                             resumed + n_done, len(questions), rate, (len(todo) - n_done) / max(rate, 1e-9))
                    last_log = time.perf_counter()
        finally:
            model.train(was_training)
    dt = time.perf_counter() - t0
    return {"questions": len(questions), "resumed": resumed, "generated": n_done, "seconds": dt,
            "questions_per_s": n_done / dt if n_done and dt > 0 else None}


# ==================================================================================================
# models
# ==================================================================================================
@dataclass
class LoadedModel:
    """A model ready to answer: in eval mode, on its device."""

    model: Any
    processor: Any
    model_id: str
    source: str  # what was loaded, for the logs and the report


def _resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def _eval_dtype(dtype: Optional[str], device: str) -> Optional[str]:
    """``auto``: float16 on a GPU (LLaVA's ``load_pretrained_model``), the model's own dtype on CPU."""
    if dtype in (None, "auto"):
        return "float16" if device.startswith("cuda") else None
    return str(dtype)


def _run_config_file(path: Path) -> Optional[Path]:
    for cand in (path / "config.yaml", path / ".hydra" / "config.yaml"):
        if cand.is_file():
            return cand
    return None


def describe_path(path: str | os.PathLike) -> str:
    """What ``path`` is: ``"run"`` (a ``python -m train`` folder: config + ``adapter/`` or ``merged/``),
    ``"checkpoint"`` (a transformers LLaVA folder: ``config.json``), ``"adapter"`` (a
    :func:`llava_san.peft.save_adapter` folder). Anything else raises ``FileNotFoundError``."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"path={path}: no such folder (a training run, its merged/ folder, a "
                                "llava-hf checkpoint or an adapter folder)")
    if (p / "config.json").is_file():
        return "checkpoint"
    if (p / "llava_san_adapter.json").is_file() or (p / "extra_trainable.safetensors").is_file():
        return "adapter"
    if _run_config_file(p) is not None and ((p / "adapter").is_dir() or (p / "merged").is_dir()):
        return "run"
    found = sorted(x.name for x in p.iterdir())[:12]
    raise FileNotFoundError(
        f"path={path}: not a training run (config.yaml + adapter/ or merged/), a transformers checkpoint "
        f"(config.json) or an adapter folder (llava_san_adapter.json); found {found}")


def _build(model_node: Any, dtype: Optional[str]) -> tuple[Any, Any]:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    node = OmegaConf.create(OmegaConf.to_container(model_node, resolve=True))
    if dtype is not None and "dtype" in node.build:
        node.build.dtype = dtype
    built = instantiate(node.build)
    if isinstance(built, functools.partial):  # conf/model/*.yaml: `_partial_: true`
        built = built()
    if isinstance(built, tuple):
        return built
    return built, instantiate(node.processor)


def load_model(
    model_cfg: Any = None,
    *,
    path: str | os.PathLike | None = None,
    adapter: str | os.PathLike | None = None,
    use_merged: bool = False,
    merge: bool = True,
    dtype: Optional[str] = "auto",
    attn_implementation: Optional[str] = None,
    device: Optional[str] = "auto",
    model_id: Optional[str] = None,
) -> LoadedModel:
    """Load what ``python -m evaluation`` evaluates.

    * ``path`` = a training run folder: the base model is rebuilt from the run's ``config.yaml``
      (``model.build``: tiny / Vicuna+CLIP parts / llava-hf, same seed and paths) and the run's
      ``adapter/`` loaded onto it (:func:`llava_san.peft.load_adapter`); ``use_merged`` loads the
      run's ``merged/`` folder instead.
    * ``path`` = a transformers LLaVA checkpoint (a ``merged/`` folder, ``llava-hf/llava-1.5-7b-hf``):
      :func:`llava_san.models.load_llava_hf`.
    * ``path`` = an adapter folder, or ``adapter`` given: loaded onto ``model_cfg`` 's model.
    * otherwise ``model_cfg`` (a ``conf/model/*.yaml`` node: ``build`` + ``processor``) alone.

    ``merge`` folds LoRA/DoRA/SAN into the weights before generating (LLaVA's ``load_pretrained_model``
    merges LoRA the same way; it is also faster). ``dtype="auto"``: float16 on a GPU as LLaVA
    evaluates, the configured dtype on CPU. ``attn_implementation`` (``eager``/``sdpa``/...) overrides
    the model's.
    """
    import torch

    dev = _resolve_device(device)
    dt = _eval_dtype(dtype, dev)
    kind = describe_path(path) if path is not None else None
    p = Path(path).expanduser().resolve() if path is not None else None
    adapter_dir = Path(adapter).expanduser() if adapter is not None else None
    checkpoint: Optional[Path] = None
    node = model_cfg
    if kind == "run":
        if use_merged or not (p / "adapter").is_dir():
            checkpoint = p / "merged"
            if not checkpoint.is_dir():
                raise FileNotFoundError(
                    f"{p} has no merged/ folder (train with export=true, or use its adapter)")
        else:
            from omegaconf import OmegaConf

            cfg_file = _run_config_file(p)
            run_cfg = OmegaConf.load(cfg_file)
            if "model" not in run_cfg or "build" not in run_cfg.model:
                raise ValueError(f"{cfg_file}: no model.build node; is {p} a `python -m train` run folder?")
            node = run_cfg.model
            adapter_dir = adapter_dir or p / "adapter"
        source = f"run {p}" + (" (merged/)" if checkpoint is not None else f" (adapter {adapter_dir})")
    elif kind == "checkpoint":
        checkpoint, source = p, f"checkpoint {p}"
    elif kind == "adapter":
        adapter_dir, source = p, f"adapter {p}"
    else:
        source = "model config"
    if checkpoint is not None:
        from llava_san.models import load_llava_hf

        model, processor = load_llava_hf(str(checkpoint), dtype=dt or "auto",
                                         attn_implementation=attn_implementation or "sdpa")
    else:
        if node is None:
            raise ValueError("nothing to evaluate: give path=<run | checkpoint | adapter> or a model config")
        model, processor = _build(node, dt)
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
        if adapter_dir is not None:
            from llava_san.peft import apply_adapter_folder

            model = apply_adapter_folder(model, adapter_dir, merge)
            source += "" if kind else f" + adapter {adapter_dir}"
    if dt is not None:
        from llava_san.models import resolve_dtype

        model.to(resolve_dtype(dt))
    model.to(torch.device(dev))
    for prm in model.parameters():
        prm.requires_grad_(False)
    model.eval()
    model_id = model_id or default_model_id(path, adapter=adapter, use_merged=use_merged)
    log.info("evaluating %s as model_id=%r on %s", source, model_id, dev)
    return LoadedModel(model, processor, str(model_id), source)


def default_model_id(path: str | os.PathLike | None = None, *, adapter: str | os.PathLike | None = None,
                     use_merged: bool = False, model_cfg: Any = None) -> str:
    """The ``model_id`` written in the answers (and checked on resume) when none is configured: the
    folder name of ``path`` (``-merged`` added for a run's ``merged/``), else of ``adapter``, else the
    model config's builder name (``build_tiny``...)."""
    if path is not None:
        p = Path(path).expanduser().resolve()
        merged = ((p / "merged").is_dir() and not (p / "config.json").is_file()
                  and (use_merged or not (p / "adapter").is_dir()))  # what load_model loads
        return p.name + ("-merged" if merged else "")
    if adapter is not None:
        return Path(adapter).expanduser().resolve().name
    try:
        return str(model_cfg.build["_target_"]).rsplit(".", 1)[-1]
    except (AttributeError, KeyError, TypeError):
        return "model"


# ==================================================================================================
# scoring
# ==================================================================================================
def score_answers(data: BenchmarkData, answers: str | os.PathLike) -> dict[str, Any]:
    """Score an answer file with :func:`evaluation.score.score_benchmark`, giving each benchmark the
    files LLaVA's converters use. A ``limit`` run is scored on its own questions where the scorer
    allows (:data:`SUBSET_SCORABLE`), else over the whole file with missing answers allowed."""
    from evaluation.score import score_benchmark

    name = data.name
    kwargs: dict[str, Any] = {"annotations": data.annotations}
    options = dict(data.options)
    split = options.pop("split", None)
    if name in SUBSET_SCORABLE:
        kwargs["questions"] = data.questions
    else:
        kwargs["questions"] = data.questions_file
        kwargs["allow_missing"] = data.limited
    if name == "vqav2" and "submission_questions" in data.extra_files and not data.limited:
        # LLaVA's convert_vqav2_for_submission: every test2015 id, "" where test-dev has no answer
        kwargs["questions"] = data.extra_files["submission_questions"]
        kwargs["allow_missing"] = True
    if name == "mmbench":
        kwargs["annotations"] = data.annotations or data.questions_file
    return score_benchmark(name, str(answers), split=split, **kwargs, **options)


# ==================================================================================================
# the run
# ==================================================================================================
def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def _benchmark_names(cfg: Any) -> list[str]:
    names = cfg.benchmarks
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError(f"benchmarks is empty; choose from {', '.join(BENCHMARKS)}")
    for n in names:
        get_benchmark(n)  # an unknown name lists the valid ones
    return names


def _launch_chunks(cfg: Any, out: Path, k: int) -> None:
    """Start the ``k`` chunk workers (``python -m evaluation chunk_idx=i``, same resolved config),
    one per device, and wait for all; a failed worker raises after the others finished."""
    cfg_file = out / "eval_config.yaml"
    devices = list(_cfg_get(cfg, "devices", []) or [])
    if not devices:
        import torch

        devices = list(range(torch.cuda.device_count()))
    procs = []
    for i in range(k):
        env = dict(os.environ)
        if devices:
            env["CUDA_VISIBLE_DEVICES"] = str(devices[i % len(devices)])
        log_file = out / "logs" / f"chunk_{k}_{i}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "evaluation", "--config-path", str(out.resolve()), "--config-name",
               cfg_file.stem, f"chunk_idx={i}", f"hydra.run.dir={out.resolve() / 'logs' / f'chunk_{i}'}",
               "hydra.output_subdir=null"]
        fh = open(log_file, "w")
        procs.append((i, subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT), fh, log_file))
    failed = []
    for i, proc, fh, log_file in procs:
        rc = proc.wait()
        fh.close()
        if rc != 0:
            failed.append(f"chunk {i} (exit {rc}, log {log_file})")
    if failed:
        raise RuntimeError("chunk worker(s) failed: " + "; ".join(failed) + "; rerun to resume them")


def run(cfg: Any, loaded: Optional[LoadedModel] = None) -> dict[str, Any]:
    """Generate, merge, score and report, as configured (``conf/eval.yaml``); returns
    ``{benchmark: score result}`` (empty for a chunk worker, which only generates).

    ``loaded`` skips model loading (tests reuse one model)."""
    from omegaconf import OmegaConf

    out = Path(str(cfg.output_dir))
    out.mkdir(parents=True, exist_ok=True)
    names = _benchmark_names(cfg)
    k = int(_cfg_get(cfg, "num_chunks", 1))
    idx = cfg.get("chunk_idx")
    if k < 1:
        raise ValueError(f"num_chunks must be >= 1, got {k}")
    if idx is not None and not 0 <= int(idx) < k:
        raise ValueError(f"chunk_idx must be in [0, {k}), got {idx}")
    data_over = cfg.get("data") or {}
    datas = {
        n: resolve_benchmark(n, eval_root=cfg.get("eval_root"), overrides=data_over.get(n),
                             limit=cfg.get("limit"))
        for n in names
    }
    if idx is None:  # the resolved config: a record, and what chunk workers start from
        (out / "eval_config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    chunks = [int(idx)] if idx is not None else list(range(k))
    plan = []  # (benchmark, chunk file, questions)
    for n in names:
        _, files = answer_paths(out, n, k)
        qs = datas[n].questions
        for i in chunks:
            plan.append((n, files[i], qs[chunk_slice(len(qs), k, i)]))

    gen_stats: dict[str, Any] = {}
    if _cfg_get(cfg, "generate", True):
        if k > 1 and idx is None and loaded is None:
            _launch_chunks(cfg, out, k)
        else:
            model_id = (loaded.model_id if loaded else cfg.get("model_id")) or default_model_id(
                cfg.get("path"), adapter=cfg.get("adapter"), use_merged=bool(cfg.get("use_merged")),
                model_cfg=cfg.get("model"))
            remaining = 0
            for n, path, qs in plan:  # check (and repair) every answer file before loading the model
                with AnswerFile(path, [canonical_id(q.question_id) for q in qs], model_id) as f:
                    remaining += len(qs) - len(f.done)
            lm = loaded
            if lm is None and remaining:
                lm = load_model(cfg.get("model"), path=cfg.get("path"), adapter=cfg.get("adapter"),
                                use_merged=bool(cfg.get("use_merged")),
                                merge=bool(_cfg_get(cfg, "merge", True)), dtype=cfg.get("dtype"),
                                attn_implementation=cfg.get("attn_implementation"),
                                device=cfg.get("device"), model_id=model_id)
            for n, path, qs in plan:
                if not remaining:
                    break
                stats = generate_answers(
                    lm.model, lm.processor, qs, path, model_id=model_id,
                    batch_size=int(_cfg_get(cfg, "batch_size", 16)),
                    max_new_tokens=cfg.get("max_new_tokens"),
                    template=_cfg_get(cfg, "template", "vicuna_v1"),
                    tokenization=_cfg_get(cfg, "tokenization", "llava"),
                    image_aspect_ratio=_cfg_get(cfg, "image_aspect_ratio", "pad"),
                    num_workers=int(_cfg_get(cfg, "num_workers", 2)))
                gen_stats[str(path.relative_to(out))] = stats
                log.info("%s: %d answers in %s (%d resumed)", n, stats["questions"], path, stats["resumed"])
            if not remaining:
                log.info("every question is already answered; nothing to generate")
            else:  # this session's counts and speed, per answer file
                suffix = f"_{k}_{idx}" if idx is not None else ""
                write_json(out / f"generation{suffix}.json", gen_stats, indent=2)
    if idx is not None:
        return {}

    results: dict[str, Any] = {}
    for n in names:
        merged, files = answer_paths(out, n, k)
        if k > 1:
            qs = datas[n].questions
            ids = [canonical_id(q.question_id) for q in qs]
            merge_answer_files(files, [ids[chunk_slice(len(ids), k, i)] for i in range(k)], merged)
        if _cfg_get(cfg, "score", True):
            if not merged.exists():
                raise FileNotFoundError(f"{n}: no answer file {merged} to score (run with generate=true)")
            results[n] = score_answers(datas[n], merged)
            log.info("%s: %s", n, {kk: v for kk, v in results[n].items() if not isinstance(v, dict)})
    if results:
        from evaluation.report import build_report, run_row, write_report

        write_json(out / "metrics.json", results, indent=2)
        notes = [f"{n}: first {len(d.questions)} of {d.total} questions"
                 for n, d in datas.items() if d.limited]
        name = _cfg_get(cfg, "run_name", None) or (loaded.model_id if loaded else None) or (
            cfg.get("model_id") or default_model_id(cfg.get("path"), adapter=cfg.get("adapter"),
                                                    use_merged=bool(cfg.get("use_merged")),
                                                    model_cfg=cfg.get("model")))
        row = run_row(name, results, notes="; ".join(notes))
        title = _cfg_get(cfg, "title", "LLaVA-1.5-7B: paper vs. ours")
        paths = write_report(build_report([row], title=title), out)
        log.info("report: %s", paths["markdown"])
    return results

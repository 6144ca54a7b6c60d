"""easy-vqa (the ``easy-vqa`` wheel: 64x64 shapes, 13 answers) as LLaVA-format data.

:func:`prepare_easyvqa` writes, atomically and idempotently, into a cache folder:

* ``train.json`` -- the 38,575 training questions as LLaVA mix665k records, one question per record:
  ``{"id", "image": "train/images/<n>.png", "conversations": [{"from": "human", "value":
  "<image>\\n<question>\\nAnswer the question using a single word or phrase."}, {"from": "gpt",
  "value": <answer>}], "question_type"}`` (the prompt of LLaVA-1.5's short-answer VQA data);
* ``test_questions.jsonl`` -- the 9,673 test questions in LLaVA's evaluation question format
  (``{"question_id", "image", "text": question + "\\nAnswer the question using a single word or
  phrase.", "category": question_type}``; no ``<image>`` in ``text``, as in LLaVA's files);
* ``test_answers.json`` -- ``{question_id: {"answer", "question_type", "question"}}`` for scoring;
* ``manifest.json`` -- written last; its presence (with matching version/counts) means "done".

The image folder is the wheel's own ``easy_vqa/data`` directory (``train/images``, ``test/images``).
Question types are derived from the answer (``yes``/``no`` -> ``yes-no``, colour names -> ``colour``,
shape names -> ``shape``); :func:`question_type_from_text` derives the same from the wording, and
:func:`prepare_easyvqa` checks both agree for every question.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

from ..utils.atomic import atomic_file
from ..utils.cache_lock import cache_lock
from .datamodule import LlavaDataModule

SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
COLOURS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
YES_NO = ("yes", "no")
QUESTION_TYPES = ("colour", "shape", "yes-no")
FORMAT_VERSION = 1


def question_type(answer: str) -> str:
    """``"yes-no"``, ``"colour"`` or ``"shape"`` from an easy-vqa answer (``ValueError`` otherwise)."""
    a = answer.strip().lower()
    if a in YES_NO:
        return "yes-no"
    if a in COLOURS:
        return "colour"
    if a in SHAPES:
        return "shape"
    raise ValueError(f"not an easy-vqa answer: {answer!r}")


def question_type_from_text(question: str) -> str:
    """The question type from its wording: "what color ..." / "what is the color of ..." -> colour,
    other "what ..." -> shape, anything else (does / is ...) -> yes-no."""
    q = question.strip().lower()
    if q.startswith("what"):
        return "colour" if ("color" in q or "colour" in q) else "shape"
    return "yes-no"


@dataclass(frozen=True)
class EasyVQAPaths:
    """Where :func:`prepare_easyvqa` writes (or found) the easy-vqa files."""

    cache_dir: str
    train_records: str
    test_questions: str
    test_answers: str
    manifest: str
    image_folder: str


def easyvqa_image_folder() -> str:
    """The wheel's data folder (contains ``train/images`` and ``test/images``)."""
    import easy_vqa

    return os.path.join(os.path.dirname(os.path.abspath(easy_vqa.__file__)), "data")


def easyvqa_paths(cache_dir: str) -> EasyVQAPaths:
    """The file names under ``cache_dir`` (nothing is written)."""
    cache_dir = os.path.abspath(os.path.expanduser(os.fspath(cache_dir)))
    return EasyVQAPaths(
        cache_dir=cache_dir,
        train_records=os.path.join(cache_dir, "train.json"),
        test_questions=os.path.join(cache_dir, "test_questions.jsonl"),
        test_answers=os.path.join(cache_dir, "test_answers.json"),
        manifest=os.path.join(cache_dir, "manifest.json"),
        image_folder=easyvqa_image_folder(),
    )


def _atomic_write(path: str, write) -> None:
    """``write(file)`` into ``path`` atomically (readers never see a partial file)."""
    with atomic_file(path, encoding="utf-8") as f:
        write(f)


def _load_split(split: str) -> tuple[list[str], list[str], list[int]]:
    from easy_vqa import get_test_questions, get_train_questions

    return get_train_questions() if split == "train" else get_test_questions()


def train_records() -> list[dict[str, Any]]:
    """The easy-vqa training questions as LLaVA records (one single-turn conversation each)."""
    questions, answers, image_ids = _load_split("train")
    records = []
    for i, (q, a, img) in enumerate(zip(questions, answers, image_ids)):
        qtype = question_type(a)
        if question_type_from_text(q) != qtype:
            raise ValueError(f"easy-vqa train question {i} {q!r} -> {a!r}: type from the answer ({qtype}) "
                             f"and from the wording ({question_type_from_text(q)}) disagree")
        records.append({
            "id": f"easyvqa-train-{i:06d}",
            "image": f"train/images/{img}.png",
            "conversations": [
                {"from": "human", "value": f"<image>\n{q}\n{SHORT_ANSWER_PROMPT}"},
                {"from": "gpt", "value": a},
            ],
            "question_type": qtype,
        })
    return records


def test_questions() -> tuple[list[dict[str, Any]], dict[str, dict[str, str]]]:
    """(LLaVA question-jsonl rows, answers by question id) for the easy-vqa test split."""
    questions, answers, image_ids = _load_split("test")
    rows, truth = [], {}
    for i, (q, a, img) in enumerate(zip(questions, answers, image_ids)):
        qtype = question_type(a)
        if question_type_from_text(q) != qtype:
            raise ValueError(f"easy-vqa test question {i} {q!r} -> {a!r}: question types disagree")
        rows.append({"question_id": i, "image": f"test/images/{img}.png",
                     "text": f"{q}\n{SHORT_ANSWER_PROMPT}", "category": qtype})
        truth[str(i)] = {"answer": a, "question_type": qtype, "question": q}
    return rows, truth


def _manifest_ok(paths: EasyVQAPaths) -> bool:
    try:
        with open(paths.manifest, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError):
        return False
    files = (paths.train_records, paths.test_questions, paths.test_answers)
    sizes = m.get("sizes", {})
    return m.get("version") == FORMAT_VERSION and all(
        os.path.isfile(p) and os.path.getsize(p) == sizes.get(os.path.basename(p)) for p in files)


def prepare_easyvqa(cache_dir: str, force: bool = False) -> EasyVQAPaths:
    """Write the easy-vqa records / question / answer files into ``cache_dir`` (reuses existing ones).

    Safe to call from several processes at once: one prepares under
    :func:`~llava_san.utils.cache_lock.cache_lock` while the others wait and then reuse its files (every
    file is written to a temporary name and renamed; the manifest is renamed last). Returns the paths,
    including the image folder.
    """
    paths = easyvqa_paths(cache_dir)
    if not force and _manifest_ok(paths):
        return paths
    with cache_lock(paths.cache_dir):
        if not force and _manifest_ok(paths):  # another process prepared it while this one waited
            return paths
        return _write_easyvqa(paths)


def _write_easyvqa(paths: EasyVQAPaths) -> EasyVQAPaths:
    """Write every file of :func:`prepare_easyvqa` (the caller holds the cache lock)."""
    records = train_records()
    rows, truth = test_questions()
    _atomic_write(paths.train_records, lambda f: json.dump(records, f, ensure_ascii=False, indent=1))

    def write_jsonl(f):
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    _atomic_write(paths.test_questions, write_jsonl)
    _atomic_write(paths.test_answers, lambda f: json.dump(truth, f, ensure_ascii=False, indent=1))
    counts = collections.Counter(r["question_type"] for r in records)
    manifest = {
        "version": FORMAT_VERSION,
        "train_records": len(records),
        "test_questions": len(rows),
        "train_question_types": dict(sorted(counts.items())),
        "image_folder": paths.image_folder,
        "prompt": SHORT_ANSWER_PROMPT,
        "sizes": {os.path.basename(p): os.path.getsize(p)
                  for p in (paths.train_records, paths.test_questions, paths.test_answers)},
    }
    _atomic_write(paths.manifest, lambda f: json.dump(manifest, f, indent=1))
    return paths


def check_question_types(question_types: Optional[Sequence[str]]) -> Optional[tuple[str, ...]]:
    """``None`` (every type) or the sorted, de-duplicated easy-vqa types; ``ValueError`` names a bad one."""
    if question_types is None:
        return None
    types = tuple(sorted(set(str(t) for t in question_types)))
    bad = [t for t in types if t not in QUESTION_TYPES]
    if bad or not types:
        raise ValueError(f"question_types must be a non-empty subset of {list(QUESTION_TYPES)}, "
                         f"got {list(question_types)}")
    return types


def check_answer_map(answer_map: Optional[dict]) -> Optional[dict[str, str]]:
    """``None`` or ``{easy-vqa answer: new answer}`` (non-empty strings); ``ValueError`` names a bad entry."""
    if not answer_map:
        return None
    out = {str(k).strip().lower(): str(v).strip() for k, v in dict(answer_map).items()}
    known = set(COLOURS) | set(SHAPES) | set(YES_NO)
    bad = [k for k, v in out.items() if k not in known or not v]
    if bad:
        raise ValueError(f"answer_map keys must be easy-vqa answers {sorted(known)} with non-empty values; "
                         f"bad: {bad}")
    return out


def _map_tag(answer_map: dict[str, str]) -> str:

    return hashlib.sha1(json.dumps(answer_map, sort_keys=True).encode()).hexdigest()[:8]


def prepare_easyvqa_subset(cache_dir: str, question_types: Optional[Sequence[str]],
                           answer_map: Optional[dict] = None) -> str:
    """The training records of the given question types only (``None``: all), with answers renamed by
    ``answer_map`` (e.g. a permuted colour vocabulary), as ``train_<types>[@<map hash>].json`` beside
    ``train.json`` (written once, reused afterwards); returns its path."""
    types = check_question_types(question_types) or tuple(sorted(QUESTION_TYPES))
    answer_map = check_answer_map(answer_map)
    paths = prepare_easyvqa(cache_dir)
    if types == tuple(sorted(QUESTION_TYPES)) and answer_map is None:
        return paths.train_records
    tag = f"@{_map_tag(answer_map)}" if answer_map else ""
    out = os.path.join(paths.cache_dir, f"train_{'+'.join(types)}{tag}.json")
    with open(paths.manifest, encoding="utf-8") as f:
        expected = sum(int(n) for t, n in json.load(f)["train_question_types"].items() if t in types)
    stale = False  # a file there that is damaged or of another length
    try:
        with open(out, encoding="utf-8") as f:
            if len(json.load(f)) == expected:
                return out
        stale = True
    except FileNotFoundError:
        pass
    except (OSError, ValueError):
        stale = True
    with open(paths.train_records, encoding="utf-8") as f:
        records = [r for r in json.load(f) if r["question_type"] in types]
    for r in records if answer_map else ():
        answer = r["conversations"][1]["value"]
        r["conversations"][1]["value"] = answer_map.get(answer, answer)
    # first writer wins (a hard link never replaces an existing file): a process that already indexed
    # the file is never handed a new inode by a concurrent writer
    if stale:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(out)
    with atomic_file(out, encoding="utf-8", keep_existing=True) as f:
        json.dump(records, f, ensure_ascii=False, indent=1)
    return out


# ---------------------------------------------------------------------- blind baselines
def majority_answer(answers: Iterable[str]) -> str:
    """The most frequent answer (ties: the alphabetically first)."""
    counts = collections.Counter(answers)
    if not counts:
        raise ValueError("no answers")
    best = max(counts.values())
    return min(a for a, c in counts.items() if c == best)


def per_question_answers(questions: Sequence[str], answers: Sequence[str]) -> dict[str, str]:
    """For each distinct question text, its most frequent training answer (a "blind" predictor)."""
    by_q: dict[str, list[str]] = collections.defaultdict(list)
    for q, a in zip(questions, answers):
        by_q[q].append(a)
    return {q: majority_answer(a) for q, a in by_q.items()}


def blind_baselines() -> dict[str, Any]:
    """Test accuracy of the two image-blind baselines, overall and per question type.

    ``majority``: always the most frequent training answer (~0.37); ``per_question``: the most
    frequent training answer of the same question text, else the majority answer (~0.67).
    """
    tq, ta, _ = _load_split("train")
    q, a, _ = _load_split("test")
    maj = majority_answer(ta)
    per_q = per_question_answers(tq, ta)
    out: dict[str, Any] = {"majority_answer": maj}
    for name, predict in (("majority", lambda x: maj), ("per_question", lambda x: per_q.get(x, maj))):
        hits = collections.Counter()
        totals = collections.Counter()
        for question, answer in zip(q, a):
            t = question_type(answer)
            totals[t] += 1
            hits[t] += int(predict(question) == answer)
        out[name] = {"accuracy": sum(hits.values()) / max(sum(totals.values()), 1),
                     "by_type": {t: hits[t] / totals[t] for t in sorted(totals)}}
    return out


# ---------------------------------------------------------------------- datamodule
class EasyVQADataModule(LlavaDataModule):
    """:class:`LlavaDataModule` on easy-vqa: prepares the cache, then the same code path as mix665k.

    Args:
        cache_dir: where :func:`prepare_easyvqa` writes the records.
        question_types: train on these question types only (``colour``, ``shape``, ``yes-no``;
            ``None``: all), e.g. the SAN study's shifted target (:func:`prepare_easyvqa_subset`).
        answer_map: rename answers, ``{"red": "teal", ...}`` (``None``: none), e.g. the study's
            permuted colour vocabulary; the evaluator takes the same map.
        **kwargs: every :class:`LlavaDataModule` argument except ``train_file``/``image_folder``.
    """

    def __init__(self, cache_dir: str = ".cache/easyvqa", question_types: Optional[Sequence[str]] = None,
                 answer_map: Optional[dict] = None, **kwargs: Any):
        self.question_types = check_question_types(question_types)
        self.answer_map = check_answer_map(answer_map)
        paths = easyvqa_paths(cache_dir)
        for k in ("train_file", "image_folder"):
            if kwargs.get(k) is not None:
                raise ValueError(f"EasyVQADataModule sets {k} itself (from cache_dir)")
            kwargs.pop(k, None)
        super().__init__(train_file=paths.train_records, image_folder=paths.image_folder, **kwargs)
        self.cache_dir = paths.cache_dir
        self.paths: Optional[EasyVQAPaths] = None

    def _prepare(self) -> None:
        self.paths = prepare_easyvqa(self.cache_dir)
        if self.question_types is not None or self.answer_map is not None:
            self.train_file = prepare_easyvqa_subset(self.cache_dir, self.question_types, self.answer_map)

    def prepare_data(self) -> None:
        """Write the cache (Lightning runs this once per node before ``setup``)."""
        self._prepare()

    def setup(self, stage: Optional[str] = None) -> None:
        """Make sure the cache exists (idempotent, concurrency-safe), then the usual setup."""
        if self.paths is None:
            self._prepare()
        super().setup(stage)


__all__ = ["EasyVQADataModule", "EasyVQAPaths", "QUESTION_TYPES", "SHORT_ANSWER_PROMPT",
           "blind_baselines", "check_answer_map", "check_question_types", "easyvqa_image_folder", "easyvqa_paths", "majority_answer",
           "per_question_answers", "prepare_easyvqa", "prepare_easyvqa_subset", "question_type", "question_type_from_text",
           "test_questions", "train_records"]

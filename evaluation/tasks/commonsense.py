"""The eight commonsense benchmarks of LLM-Adapters (the SAN paper's LLaMA experiments, Table 2):
what they share. Each benchmark is its own module (``evaluation/tasks/<name>.py``: one line,
``TASK = commonsense_task(NAME)``) and one registry line; the per-benchmark facts (LLM-Adapters folder,
answer pattern, column title) are one row of :data:`llava_san.commonsense.BENCHMARKS`.

Files (LLM-Adapters ``dataset/<folder>/test.json``, ``eval_root`` = that ``dataset`` folder): a JSON
list of ``{"instruction", "input", "output", "answer"}``. ``question_id`` is the 0-based index in
the list. The file is both the questions and the annotations.

Prompt: ``commonsense_evaluate.py`` builds ``generate_prompt(instruction)`` -- the ``input`` field is
never passed (``evaluate(instructions)``) -- and tokenizes it with the tokenizer's special tokens
(BOS): :func:`llava_san.commonsense.generate_prompt`, sent as raw text (no chat template).

Decoding (``commonsense_evaluate.py``'s ``evaluate`` defaults): ``num_beams=4``, ``max_new_tokens=32``,
``do_sample`` unset (False), so its ``temperature=0.1``, ``top_p=0.75``, ``top_k=40`` have no effect:
deterministic 4-beam search. The output kept is ``decoded.split("### Response:")[-1].strip()``.

Scoring: :func:`llava_san.commonsense.extract_answer` (the official first regex match) compared with
``answer``; ``accuracy`` = correct / questions (a fraction; the paper prints percentages).
"""

from __future__ import annotations

import os
from typing import Any

from evaluation.answers import as_answers, canonical_id, match_answers
from evaluation.files import DataFileError
from evaluation.tasks.base import EvalQuestion, load_json_or_value, mean, result
from evaluation.tasks.task import ScoreInput, Task
from llava_san.commonsense import BENCHMARKS as COMMONSENSE, extract_answer, generate_prompt, response_text

__all__ = ["HEADLINE", "MAX_NEW_TOKENS", "NUM_BEAMS", "commonsense_task", "load_items", "load_questions",
           "score", "score_files"]

HEADLINE = "accuracy"
#: ``commonsense_evaluate.py``: ``evaluate(..., num_beams=4, max_new_tokens=32)``
MAX_NEW_TOKENS = 32
NUM_BEAMS = 4
SUITE = "commonsense"


def load_items(test_json: Any, benchmark: str = "commonsense") -> list[dict[str, Any]]:
    """The test items (a path to ``test.json`` or the loaded list), each checked to have a string
    ``instruction`` and ``answer``."""
    items = load_json_or_value(test_json)
    if not isinstance(items, list):
        raise DataFileError(f"{benchmark}: {test_json}: expected a JSON list of test items")
    for i, it in enumerate(items):
        if not isinstance(it, dict) or not isinstance(it.get("instruction"), str) \
                or not isinstance(it.get("answer"), str):
            raise DataFileError(f"{benchmark}: {test_json}[{i}]: needs string 'instruction' and 'answer'")
    return items


def load_questions(questions: Any, image_folder: Any = None, *, benchmark: str = "commonsense",
                   ) -> list[EvalQuestion]:
    """``test.json`` -> questions: id = index, prompt = ``generate_prompt(instruction)`` (the official
    evaluation prompt), ``answer_prompt`` = the instruction, ``meta["answer"]`` = the label."""
    if image_folder is not None:
        raise ValueError(f"{benchmark} is text only; it takes no image folder")
    return [EvalQuestion(question_id=i, prompt=generate_prompt(it["instruction"]), max_new_tokens=MAX_NEW_TOKENS,
                         answer_prompt=it["instruction"], meta={"answer": it["answer"]})
            for i, it in enumerate(load_items(questions, benchmark))]


def score(answers: Any, annotations: Any, *, questions: Any = None, allow_missing: bool = False,
          allow_unknown: bool = False, benchmark: str) -> dict[str, Any]:
    """``accuracy`` (official extraction == ``answer``), ``correct``, ``unparsed`` (outputs where no
    candidate matched), ``n_questions``, ``predictions`` (count per extracted answer) and coverage.
    ``questions`` (EvalQuestions or a path) restricts the expected ids (a ``limit`` run)."""
    items = load_items(annotations, benchmark)
    if questions is None:
        ids = [str(i) for i in range(len(items))]
    else:
        qs = load_questions(questions, benchmark=benchmark) if isinstance(questions, (str, os.PathLike)) \
            else list(questions)
        ids = [canonical_id(q.question_id) for q in qs]
        outside = [i for i in ids if not (i.isdigit() and int(i) < len(items))]
        if outside:
            raise ValueError(f"{benchmark}: question ids {outside[:5]} are not indices of {annotations}")
    matched = match_answers(as_answers(answers), ids, allow_missing=allow_missing, allow_unknown=allow_unknown)
    preds = {i: extract_answer(benchmark, matched.one(i).text) for i in ids}
    hits = [float(preds[i] == items[int(i)]["answer"]) for i in ids]
    counts: dict[str, int] = {}
    for p in preds.values():
        counts[p] = counts.get(p, 0) + 1
    metrics = {"accuracy": mean(hits), "correct": int(sum(hits)), "unparsed": counts.get("", 0),
               "n_questions": len(ids), "predictions": dict(sorted(counts.items()))}
    return result(benchmark, HEADLINE, metrics, matched.coverage)


def score_files(answers: Any, *, questions: Any = None, annotations: Any = None, split: str | None = None,
                submission: Any = None, allow_missing: bool = False, allow_unknown: bool = False,
                benchmark: str) -> dict[str, Any]:
    """CLI entry: ``--annotations`` (or ``--questions``) is the benchmark's ``test.json``; answers
    are ``{"question_id": <index>, "text": <model output>}`` lines."""
    gt = annotations if annotations is not None else questions
    if gt is None:
        raise ValueError(f"{benchmark} needs --annotations dataset/{COMMONSENSE[benchmark].folder}/test.json")
    qs = questions if annotations is not None and questions is not None else None
    return score(answers, gt, questions=qs, allow_missing=allow_missing, allow_unknown=allow_unknown,
                 benchmark=benchmark)


def _score_inputs(data: Any) -> dict[str, Any]:
    """A run scores against the test.json it read its questions from when no separate annotation file
    is found (``data.<name>.questions`` set alone: the Task's ``annotations_optional``)."""
    return {} if data.annotations is not None else {"annotations": data.questions_file}


def commonsense_task(name: str) -> Task:
    """The :class:`Task` of commonsense benchmark ``name`` (a key of
    :data:`llava_san.commonsense.BENCHMARKS`); its functions are this module's with ``benchmark=name``
    (closures, so ``--help`` and the option check see only the generic arguments)."""
    b = COMMONSENSE[name]
    layout = {"folder": b.folder, "questions": "test.json", "annotations": "test.json"}

    def load(questions: Any, image_folder: Any = None) -> list[EvalQuestion]:
        return load_questions(questions, image_folder, benchmark=name)

    def score_one(answers: Any, annotations: Any, *, questions: Any = None, allow_missing: bool = False,
                  allow_unknown: bool = False) -> dict[str, Any]:
        return score(answers, annotations, questions=questions, allow_missing=allow_missing,
                     allow_unknown=allow_unknown, benchmark=name)

    def score_files_one(answers: Any, *, questions: Any = None, annotations: Any = None,
                        split: str | None = None, submission: Any = None, allow_missing: bool = False,
                        allow_unknown: bool = False) -> dict[str, Any]:
        return score_files(answers, questions=questions, annotations=annotations, allow_missing=allow_missing,
                           allow_unknown=allow_unknown, benchmark=name)

    return Task(name, b.title, HEADLINE, MAX_NEW_TOKENS, layout, load, score_one, score_files_one,
                score_inputs=_score_inputs, annotations_optional=True, num_beams=NUM_BEAMS, prompt_format="text", suite=SUITE,
                postprocess=response_text, score_needs=(
                    ScoreInput("annotations", "either", f"LLM-Adapters dataset/{b.folder}/test.json"),
                    ScoreInput("questions", "either", "the same test.json (restricts the ids when both)")))

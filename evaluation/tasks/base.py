"""What every benchmark module shares: the question item, LLaVA's prompt suffixes and generation
settings, and small readers.

A benchmark module (``evaluation/tasks/<name>.py``) provides:

* ``NAME``, ``TITLE`` (column title in the report), ``HEADLINE`` (key of the headline metric in the
  result of ``score``), ``MAX_NEW_TOKENS`` and ``LLAVA_LAYOUT`` (where LLaVA's ``eval.zip`` puts the
  files, relative to ``playground/data/eval/<folder>``);
* ``load_questions(questions, image_folder=None, ...) -> list[EvalQuestion]``: the prompts exactly
  as LLaVA-1.5's ``model_vqa_loader`` / ``model_vqa_science`` / ``model_vqa_mmbench`` build them;
* ``score(answers, ...) -> dict``: metrics as fractions in [0, 1] plus ``coverage``;
* ``score_files(answers, *, questions, annotations, split, submission, allow_missing, allow_unknown)``:
  what ``python -m evaluation.score`` calls;
* ``write_submission(path, ...)`` where the benchmark has an upload format;
* ``TASK``: all of the above and the run's per-benchmark decisions as one
  :class:`evaluation.tasks.task.Task`, which the registry returns.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from evaluation.answers import canonical_id
from evaluation.files import DataFileError, iter_jsonl

__all__ = [
    "DEFAULT_IMAGE_TOKEN",
    "GENERATION_DEFAULTS",
    "MCQ_SUFFIX",
    "SHORT_ANSWER_SUFFIX",
    "VIZWIZ_SUFFIX",
    "EvalQuestion",
    "read_llava_question_jsonl",
]

DEFAULT_IMAGE_TOKEN = "<image>"

#: Suffix of LLaVA-1.5's short-answer prompts (VQAv2, GQA, TextVQA, POPE question files).
SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."
#: VizWiz's prompt suffix in ``llava_test.jsonl``.
VIZWIZ_SUFFIX = (
    "\nWhen the provided information is insufficient, respond with 'Unanswerable'."
    "\nAnswer the question using a single word or phrase."
)
#: ``--single-pred-prompt`` suffix of ``model_vqa_science`` and ``model_vqa_mmbench`` (lang en).
MCQ_SUFFIX = "\nAnswer with the option's letter from the given choices directly."

#: LLaVA-1.5's evaluation scripts: greedy decoding (``--temperature 0``), one beam, ``vicuna_v1``
#: template. ``max_new_tokens`` is per benchmark (:attr:`EvalQuestion.max_new_tokens`): 128 in
#: ``model_vqa_loader``, 1024 in ``model_vqa_science`` and ``model_vqa_mmbench``.
GENERATION_DEFAULTS: dict[str, Any] = {
    "temperature": 0.0,
    "do_sample": False,
    "num_beams": 1,
    "conv_mode": "vicuna_v1",
}

ImageSource = str | os.PathLike | Callable[[], Any] | None


@dataclass(frozen=True)
class EvalQuestion:
    """One question to generate an answer for.

    ``prompt`` is the user turn **without** the image token: the generator sends
    ``"<image>\\n" + prompt`` when ``image`` is set (LLaVA puts the image first), else ``prompt``,
    through the ``vicuna_v1`` template, and writes :meth:`answer_record` as the answer line.
    ``answer_prompt`` is what LLaVA saves in the answer's ``prompt`` field when it differs from
    ``prompt`` (ScienceQA keeps ``<image>\\n``; MMBench drops the letter instruction); TextVQA's
    scorer reads the question back from it.
    """

    question_id: int | str
    prompt: str
    image: ImageSource = None
    max_new_tokens: int = 128
    answer_prompt: str | None = None
    meta: Mapping[str, Any] = field(
        default_factory=dict
    )  # category, answer type, ... (not sent to the model)
    extra: Mapping[str, Any] = field(default_factory=dict)  # extra fields LLaVA writes in the answer line

    @property
    def has_image(self) -> bool:
        """Whether the question comes with an image."""
        return self.image is not None

    def model_prompt(self, image_token: str = DEFAULT_IMAGE_TOKEN) -> str:
        """The user message as LLaVA builds it: ``image_token + "\\n" + prompt`` for image questions."""
        return f"{image_token}\n{self.prompt}" if self.has_image else self.prompt

    def load_image(self):
        """The image as an RGB ``PIL.Image`` (opened from the path, or produced by the callable),
        or ``None`` for a text-only question."""
        if self.image is None:
            return None
        if callable(self.image):
            img = self.image()
        else:
            from PIL import Image

            with Image.open(self.image) as f:
                img = f.copy()
        return img.convert("RGB")

    def answer_record(self, text: str, **fields: Any) -> dict[str, Any]:
        """The answer line LLaVA writes: ``question_id``, ``prompt``, ``text``, then ``extra`` and
        ``fields`` (``answer_id``, ``model_id``, ``metadata``...)."""
        rec = {
            "question_id": self.question_id,
            "prompt": self.answer_prompt if self.answer_prompt is not None else self.prompt,
            "text": text,
        }
        rec.update(self.extra)
        rec.update(fields)
        return rec


def resolve_image(image: str, image_folder: str | os.PathLike | None) -> Path:
    """``image_folder / image`` (``image`` unchanged when no folder is given or it is absolute)."""
    return Path(image_folder) / image if image_folder is not None else Path(image)


def read_llava_question_jsonl(
    path: str | os.PathLike,
    image_folder: str | os.PathLike | None = None,
    *,
    max_new_tokens: int = 128,
    meta_keys: Iterable[str] = (),
) -> list[EvalQuestion]:
    """Read a LLaVA question jsonl (``question_id``, ``image``, ``text`` [, ``category``...]) as
    ``model_vqa_loader`` does: the prompt is ``text`` verbatim. Keys in ``meta_keys`` present in a
    line are copied to :attr:`EvalQuestion.meta`. Line-numbered :class:`DataFileError` on bad lines."""
    out = []
    for lineno, obj in iter_jsonl(path):
        for k in ("question_id", "image", "text"):
            if k not in obj:
                raise DataFileError(f"{path}:{lineno}: missing {k!r}")
        if not isinstance(obj["text"], str) or not isinstance(obj["image"], str):
            raise DataFileError(f"{path}:{lineno}: 'text' and 'image' must be strings")
        try:
            canonical_id(obj["question_id"])
        except TypeError as e:
            raise DataFileError(f"{path}:{lineno}: {e}") from None
        meta = {k: obj[k] for k in meta_keys if k in obj}
        meta["line"] = lineno
        out.append(
            EvalQuestion(
                question_id=obj["question_id"],
                prompt=obj["text"],
                image=resolve_image(obj["image"], image_folder),
                max_new_tokens=max_new_tokens,
                meta=meta,
            )
        )
    return out


def default_submission_path(answers: Any, suffix: str) -> Path | None:
    """``<answers stem>_submission<suffix>`` beside an answers *file*; None for in-memory answers."""
    if isinstance(answers, (str, os.PathLike)):
        p = Path(answers)
        return p.with_name(f"{p.stem}_submission{suffix}")
    return None


def result(benchmark: str, headline: str, metrics: Mapping[str, Any], coverage: Any) -> dict[str, Any]:
    """Assemble a scorer's output: ``benchmark``, ``headline`` (the key of the headline metric),
    the metrics, then ``coverage``."""
    out: dict[str, Any] = {"benchmark": benchmark, "headline": headline}
    out.update(metrics)
    out["coverage"] = coverage.as_dict() if hasattr(coverage, "as_dict") else dict(coverage)
    return out


def mean(values: list[float]) -> float:
    """Plain mean; ``nan`` is never returned: an empty list raises ``ValueError``."""
    if not values:
        raise ValueError("no questions to score")
    return float(sum(values)) / len(values)


def group_means(values: Iterable[tuple[str, float]]) -> dict[str, float]:
    """Mean per group for ``(group, value)`` pairs, groups sorted by name."""
    groups: dict[str, list[float]] = {}
    for g, v in values:
        groups.setdefault(str(g), []).append(v)
    return {g: mean(vs) for g, vs in sorted(groups.items())}


def load_json_or_value(obj: Any) -> Any:
    """A path (str/PathLike) is read as JSON; anything else is returned as is (already loaded)."""
    if isinstance(obj, (str, os.PathLike)):
        from evaluation.files import read_json

        return read_json(obj)
    return obj


def require(value: Any, what: str, benchmark: str) -> Any:
    """Raise ``ValueError`` when a needed input is missing (CLI-friendly wording)."""
    if value is None:
        raise ValueError(f"{benchmark} needs {what}")
    return value

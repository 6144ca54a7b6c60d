"""``python -m llava_san.predict <model> --images <folder | JSONL> --output <JSONL>``: answer many images.

    python -m llava_san.predict outputs/run --images photos/ --question "What is shown?" --output out.jsonl
    python -m llava_san.predict outputs/run/merged --images questions.jsonl --output answers.jsonl

``--images`` is a folder (every ``png/jpg/jpeg/webp/bmp/gif`` file in it, sorted by name, not
recursive; each asked ``--question``), a JSONL file of ``{"image": path, "question": text, "id": any}``
lines (``image`` relative to the JSONL's folder unless absolute; ``question`` defaults to
``--question``; ``id`` optional, copied to the output), or one image file.

The output gets one line per input, in input order: ``{"image": <as given>, "question": ..., "text":
<answer>, "model_id": <the model folder's name>}`` (``"id"`` first when the input has one). Answers are greedy and batched
(:meth:`llava_san.inference.Assistant.answer_many`: the loop of ``python -m evaluation``, with the
prompt format the model was trained with), so they equal the answers of ``python -m llava_san.chat``.

The output is a crash-safe journal (:class:`llava_san.utils.jsonl_journal.JsonlJournal`): every
batch is flushed and fsynced; running the same command again skips the inputs already answered,
cuts a line torn by a crash and appends the rest. An output line that is not the answer to the
input at its position by the same model (another input set, order, question or model) stops the run
and leaves the file as it was.

Every input is read before the model is loaded (a JSONL line without question...), every image still
to answer is decoded once (missing or unreadable), and every prompt is checked against the model's
context before generation starts; bad input is one line on stderr naming the file (and line), and
exit code 2. Ctrl-C keeps the answers of finished batches (exit code 130): the same command resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["IMAGE_SUFFIXES", "Item", "PredictError", "check_images", "main", "predict", "read_inputs"]

PROG = "python -m llava_san.predict"
#: the files of an ``--images`` folder that are read (case-insensitive)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


class PredictError(ValueError):
    """Input that cannot be answered; the message names the file (and line)."""


@dataclass(frozen=True)
class Item:
    """One input: the image as given (written back), the file read, the question, an optional id."""

    image: str
    path: Path
    question: str
    where: str  # for messages: the JSONL line or the image file
    id: Any = None
    has_id: bool = False

    def record(self, text: str, model_id: str) -> dict[str, Any]:
        """The output line of this input."""
        head = {"id": self.id} if self.has_id else {}
        return {**head, "image": self.image, "question": self.question, "text": text, "model_id": model_id}

    def answered_by(self, obj: Any) -> bool:
        """Whether an output line is this input's answer."""
        return (isinstance(obj, dict) and obj.get("image") == self.image
                and obj.get("question") == self.question and isinstance(obj.get("text"), str)
                and ("id" in obj) == self.has_id and obj.get("id") == self.id)


def _checked_question(question: Any, where: str) -> str:
    from .conversation import IMAGE_PLACEHOLDER

    if not isinstance(question, str) or not question.strip():
        raise PredictError(f"{where}: the question must be a non-empty string, got {question!r}")
    if IMAGE_PLACEHOLDER in question:
        raise PredictError(f"{where}: the question contains {IMAGE_PLACEHOLDER!r}; the image is placed "
                           "before the question by itself")
    return question


def _from_jsonl(file: Path, question: Optional[str]) -> list[Item]:
    items = []
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise PredictError(f"cannot read {file}: {err}") from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{file}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise PredictError(f"{where}: not a JSON line ({err})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("image"), str) or not obj["image"]:
            raise PredictError(f'{where}: expected {{"image": <path>, "question": <text>, "id": ...}} with a '
                               "non-empty image path")
        if "question" not in obj and question is None:
            raise PredictError(f'{where}: no "question" in the line and no --question given')
        path = Path(obj["image"]).expanduser()
        items.append(Item(obj["image"], path if path.is_absolute() else file.parent / path,
                          _checked_question(obj.get("question", question), where), where,
                          obj.get("id"), "id" in obj))
    if not items:
        raise PredictError(f"{file}: no input lines")
    return items


def read_inputs(images: str | os.PathLike, question: Optional[str] = None) -> list[Item]:
    """The inputs of ``--images`` (see the module docstring), in order; :class:`PredictError` when the
    inputs cannot be read (nothing is decoded here: see :func:`check_images`)."""
    given = os.fspath(images)
    src = Path(given).expanduser()
    if src.is_dir():
        files = sorted(p.name for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise PredictError(f"{given}: no image files ({', '.join(IMAGE_SUFFIXES)}) in the folder")
        if question is None:
            raise PredictError(f"--images {given} is a folder: give the --question to ask about its images")
        q = _checked_question(question, "--question")
        return [Item(os.path.join(given, name), src / name, q, os.path.join(given, name)) for name in files]
    if src.is_file() and src.suffix.lower() in IMAGE_SUFFIXES:
        if question is None:
            raise PredictError(f"--images {given} is an image: give the --question to ask about it")
        return [Item(given, src, _checked_question(question, "--question"), given)]
    if src.is_file():
        return _from_jsonl(src, question)
    raise PredictError(f"--images {given}: no such folder or file (a folder of images or a JSONL file)")


def check_images(items: Sequence[Item], workers: int = 2) -> None:
    """Decode every image once (in ``workers`` threads): :class:`PredictError` naming the first missing
    or unreadable one, in input order."""
    from .data.images import ImageLoadError, load_image

    def check(item: Item) -> Optional[str]:
        try:
            load_image(os.fspath(item.path))
        except ImageLoadError as err:
            return str(err) if item.where == item.image else f"{item.where}: {err}"
        return None

    unique = list({item.path: item for item in items}.values())
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="predict-check")
    try:
        for problem in pool.map(check, unique):
            if problem is not None:
                raise PredictError(problem)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # after an error: the images not yet read are not


def _answered(journal: Any, items: Sequence[Item], model_id: str) -> int:
    """How many inputs the existing output answers (its lines must be the first answers, in order, by
    the same model)."""
    for k, (lineno, obj) in enumerate(journal.lines):
        if isinstance(obj, dict) and obj.get("model_id") != model_id:
            raise PredictError(
                f"{journal.path}:{lineno}: this answer is by model {obj.get('model_id')!r}, not {model_id!r}; "
                "use another --output for another model, or delete the file")
        if k >= len(items) or not items[k].answered_by(obj):
            expected = (f"the answer to input {k + 1} ({items[k].where}: image {items[k].image!r}, "
                        f"question {items[k].question!r})" if k < len(items)
                        else f"expected: the inputs are only {len(items)}")
            raise PredictError(
                f"{journal.path}:{lineno}: this output line is not {expected}; the file holds answers to "
                "other inputs (another input set, order or question): use another --output or delete it")
    return len(journal.lines)


def _check_context(assistant: Any, items: Sequence[Item]) -> None:
    """Every prompt leaves room for an answer in the model's context (each question tokenized once)."""
    from .inference import Turn

    limit = assistant.context_length
    if limit is None:
        return
    sizes: dict[str, int] = {}
    for item in items:
        if item.question not in sizes:
            sizes[item.question] = assistant.prompt_tokens([Turn("user", item.question)], image=True)
        if sizes[item.question] >= limit:
            raise PredictError(f"{item.where}: the prompt is {sizes[item.question]} tokens (image included), "
                               f"the model reads at most {limit}; shorten the question")


def predict(args: argparse.Namespace) -> dict[str, Any]:
    """Answer the inputs of ``args`` (the parsed command line) into ``args.output``; returns counts."""
    from .utils.jsonl_journal import JsonlJournal

    t0 = time.perf_counter()
    from .inference.loading import default_model_id

    items = read_inputs(args.images, args.question)
    model_id = default_model_id(args.model)
    with JsonlJournal(args.output, PredictError) as journal:
        resumed = _answered(journal, items, model_id)
        todo = items[resumed:]
        if todo:
            from .inference import describe_path

            try:
                describe_path(args.model)
            except FileNotFoundError as err:
                raise PredictError(str(err)) from None
            check_images(todo, args.num_workers)
            assistant = _load(args)
            _check_context(assistant, todo)
        journal.repair()  # the file is ours: cut a line torn by a crash before appending
        if todo:
            _generate(assistant, todo, journal, args, resumed, len(items), model_id)
    return {"inputs": len(items), "resumed": resumed, "generated": len(todo),
            "seconds": time.perf_counter() - t0}


def _load(args: argparse.Namespace) -> Any:
    from .inference import Assistant, CausalLmAssistant

    try:
        assistant = Assistant.load(args.model, device=args.device, dtype=args.dtype, template=args.template)
    except (OSError, ValueError) as err:  # damaged config or weights: the loaders' own messages
        raise PredictError(f"cannot load {args.model}: {err}") from None
    if isinstance(assistant, CausalLmAssistant):
        raise PredictError(f"{args.model} is a text-only causal LM (LLaMA) and predict answers questions about "
                           "images: ask it with `python -m llava_san.chat`, or score benchmarks with "
                           "`python -m evaluation`")
    return assistant


def _generate(assistant: Any, todo: Sequence[Item], journal: Any, args: argparse.Namespace, resumed: int,
              total: int, model_id: str) -> None:
    from tqdm import tqdm

    from .data.images import ImageLoadError

    bar = tqdm(total=total, initial=resumed, unit="image", file=sys.stderr, disable=None, desc="answering")
    done = 0

    def write(batch: Sequence[Any], texts: list[str]) -> None:
        nonlocal done
        journal.append([item.record(text, model_id) for item, text in zip(todo[done:done + len(batch)], texts)])
        done += len(batch)
        bar.update(len(batch))

    try:
        assistant.answer_many([(item.question, os.fspath(item.path)) for item in todo],
                              max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                              num_workers=args.num_workers, on_batch=write)
    except ImageLoadError as err:  # changed since it was checked; the answers so far are kept
        raise PredictError(f"{err} (the answers so far are in {journal.path}; run again to resume)") from None
    finally:
        bar.close()


def _parser() -> argparse.ArgumentParser:
    from .inference.cli_args import add_model_arguments

    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--images", required=True, help="a folder of images, a JSONL file of inputs, or one image")
    p.add_argument("--question", help="the question (for a folder; the default of JSONL lines without one)")
    p.add_argument("--output", required=True, help="the answers JSONL (appended to when it exists: resume)")
    p.add_argument("--batch-size", type=int, default=16, help="questions per forward pass (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="answer length limit in tokens (default 128)")
    p.add_argument("--num-workers", type=int, default=2, help="threads preparing images ahead (default 2)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; returns the exit code (0 done, 2 bad input, 130 interrupted)."""
    args = _parser().parse_args(argv)
    try:
        for name in ("batch_size", "max_new_tokens"):
            if getattr(args, name) < 1:
                raise PredictError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        stats = predict(args)
    except PredictError as err:
        print(f"llava_san.predict: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # every finished batch is in the output: the same command resumes
        print(f"\ninterrupted: run the same command again to answer the rest into {args.output}",
              file=sys.stderr)
        return 130
    print(f"{args.output}: {stats['generated']} answers written, {stats['resumed']} already there "
          f"({stats['inputs']} inputs, {stats['seconds']:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

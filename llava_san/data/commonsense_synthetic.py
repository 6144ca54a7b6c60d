"""``csr_tiny``: a procedurally generated multiple-choice set in LLM-Adapters' format, for the CPU path.

Eight small tasks, one per commonsense benchmark, each rendered with that benchmark's instruction
wording and answer style as in ``commonsense_170k.json`` (``the correct answer is <label>``)::

    boolq          true/false            is a greater than b?                       (comparison)
    piqa           solution1/2           how do you get from a to b? add / take away (comparison)
    social_i_qa    answer1..3            <name> has a apples: few / some / many      (bins of a number)
    hellaswag      ending1..4            the <animal> likes to eat: fish/grass/meat/seeds  (lookup)
    winogrande     option1/2             a is _ than b: more / less                 (comparison)
    arc_easy       answer1..4            what colour is a <thing>?                  (lookup)
    arc_challenge  answer1..5            which day comes after <day>?               (lookup)
    openbookqa     answer1..4            where does a <animal> live?                (lookup)

The facts (digits 0-9, a fixed table of things, animals and days) are learnable from the training
records; the options of a task are listed in a fixed order, so a model answers by knowing the fact,
not by matching option texts (a 2-layer model in a few CPU minutes learns the former, not the latter).
Questions are drawn uniformly, so the majority-answer baseline sits near ``1/k`` per task. The test
set is drawn with another seed from the same small universe (questions repeat: the check measures
whether the facts were learned, not generalisation). Each record carries ``dataset`` (the benchmark's
registry name) for scoring; training ignores it.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Optional

from .commonsense import CommonsenseDataModule

__all__ = ["CsrTinyDataModule", "csr_tiny_paths", "generate_records", "prepare_csr_tiny", "tokenizer_corpus"]

_NAMES = ["tom", "ann", "bob", "eve", "sam", "kim", "max", "joe"]
_FOOD = ["fish", "grass", "meat", "seeds"]
_EATS = {"cat": "fish", "seal": "fish", "cow": "grass", "sheep": "grass", "horse": "grass", "lion": "meat",
         "wolf": "meat", "tiger": "meat", "bird": "seeds", "hen": "seeds", "duck": "seeds", "bear": "fish"}
_COLOURS = ["red", "green", "yellow", "white"]
_COLOUR = {"apple": "red", "cherry": "red", "rose": "red", "leaf": "green", "frog": "green", "grass": "green",
           "banana": "yellow", "lemon": "yellow", "sun": "yellow", "snow": "white", "milk": "white",
           "cloud": "white"}
_DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday"]
_BEFORE = {"sunday": "monday", "monday": "tuesday", "tuesday": "wednesday", "wednesday": "thursday",
           "thursday": "friday"}
_PLACES = ["sea", "forest", "farm", "desert"]
_LIVES = {"fish": "sea", "shark": "sea", "whale": "sea", "fox": "forest", "deer": "forest", "owl": "forest",
          "cow": "farm", "pig": "farm", "goat": "farm", "camel": "desert", "snake": "desert",
          "lizard": "desert"}


def _choices(prefix: str, options: list[str]) -> str:
    return "".join(f"\n\n{prefix}{k + 1}: {o}" for k, o in enumerate(options))


def _fmt(word: str, n: int) -> str:
    return "/".join(f"{word}{k + 1}" for k in range(n))


def _pair(rng: random.Random) -> tuple[int, int]:
    a, b = rng.sample(range(10), 2)
    return a, b


def _boolq(rng):
    a, b = _pair(rng)
    ins = (f"Please answer the following question with true or false, question: is {a} greater than {b}?"
           "\n\nAnswer format: true/false")
    return ins, "true" if a > b else "false"


def _piqa(rng):
    a, b = _pair(rng)
    ins = (f"Please choose the correct solution to the question: how do you get from {a} to {b}?"
           + _choices("Solution", ["add to it", "take away from it"]) + "\n\nAnswer format: solution1/solution2")
    return ins, "solution1" if b > a else "solution2"


def _siqa(rng):
    name, a = rng.choice(_NAMES), rng.randrange(10)
    ins = (f"Please choose the correct answer to the question: {name} has {a} apples. How many apples is that?"
           + _choices("Answer", ["few", "some", "many"]) + f"\n\nAnswer format: {_fmt('answer', 3)}")
    return ins, f"answer{1 if a <= 3 else 2 if a <= 6 else 3}"


def _hellaswag(rng):
    name, animal = rng.choice(_NAMES), rng.choice(sorted(_EATS))
    ins = (f"Please choose the correct ending to complete the given sentence: {name} sees a {animal}. "
           f"The {animal} likes to eat" + _choices("Ending", _FOOD) + f"\n\nAnswer format: {_fmt('ending', 4)}")
    return ins, f"ending{_FOOD.index(_EATS[animal]) + 1}"


def _winogrande(rng):
    a, b = _pair(rng)
    ins = ("Please choose the correct answer to fill in the blank to complete the given sentence: "
           f"{a} is _ than {b}." + _choices("Option", ["more", "less"]) + "\n\nAnswer format: option1/option2")
    return ins, "option1" if a > b else "option2"


def _arc_easy(rng):
    thing = rng.choice(sorted(_COLOUR))
    ins = (f"Please choose the correct answer to the question: what colour is a {thing}?"
           + _choices("Answer", _COLOURS) + f"\n\nAnswer format: {_fmt('answer', 4)}")
    return ins, f"answer{_COLOURS.index(_COLOUR[thing]) + 1}"


def _arc_challenge(rng):
    day = rng.choice(sorted(_BEFORE))
    ins = (f"Please choose the correct answer to the question: which day comes after {day}?"
           + _choices("Answer", _DAYS) + f"\n\nAnswer format: {_fmt('answer', 5)}")
    return ins, f"answer{_DAYS.index(_BEFORE[day]) + 1}"


def _obqa(rng):
    animal = rng.choice(sorted(_LIVES))
    ins = (f"Please choose the correct answer to the question: where does a {animal} live?"
           + _choices("Answer", _PLACES) + f"\n\nAnswer format: {_fmt('answer', 4)}")
    return ins, f"answer{_PLACES.index(_LIVES[animal]) + 1}"


#: benchmark registry name (llava_san.commonsense.BENCHMARKS) -> question maker
TASKS = {"boolq": _boolq, "piqa": _piqa, "social_i_qa": _siqa, "hellaswag": _hellaswag,
         "winogrande": _winogrande, "arc_easy": _arc_easy, "arc_challenge": _arc_challenge,
         "openbookqa": _obqa}


def generate_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` records (the eight tasks in turn), deterministic for ``seed``: ``instruction``, ``input``
    (empty, as commonsense_170k), ``output`` (``the correct answer is <answer>``), ``answer``, ``dataset``."""
    rng = random.Random(f"csr_tiny:{seed}")
    names = list(TASKS)
    out = []
    for k in range(int(n)):
        name = names[k % len(names)]
        ins, ans = TASKS[name](rng)
        out.append({"instruction": ins, "input": "", "output": f"the correct answer is {ans}", "answer": ans,
                    "dataset": name})
    return out


def tokenizer_corpus() -> list[str]:
    """Texts the tiny LLaMA's tokenizer is trained on (besides the prompt phrases): csr_tiny's records."""
    from ..commonsense import generate_prompt

    recs = generate_records(400, seed=12345)
    return ([generate_prompt(r["instruction"], None, r["output"]) for r in recs]
            + [generate_prompt(r["instruction"]) for r in recs[:50]])


def csr_tiny_paths(cache_dir: str | os.PathLike) -> tuple[Path, Path]:
    """``(train.json, test.json)`` under ``cache_dir``."""
    root = Path(cache_dir)
    return root / "train.json", root / "test.json"


def prepare_csr_tiny(cache_dir: str | os.PathLike, n_train: int = 4000, n_test: int = 400,
                     seed: int = 0) -> tuple[Path, Path]:
    """Write ``train.json`` (seed ``seed``) and ``test.json`` (seed ``seed + 1``) into ``cache_dir`` if
    absent or made with other sizes/seed (atomically; ``meta.json`` records how they were made)."""
    from ..utils.atomic import atomic_file
    from ..utils.cache_lock import cache_lock

    train, test = csr_tiny_paths(cache_dir)
    meta_file = Path(cache_dir) / "meta.json"
    meta = {"n_train": int(n_train), "n_test": int(n_test), "seed": int(seed), "version": 1}
    def ready() -> bool:
        try:
            return json.loads(meta_file.read_text()) == meta and train.is_file() and test.is_file()
        except (OSError, ValueError):
            return False

    if ready():
        return train, test
    with cache_lock(cache_dir):  # runs started together: one writes, the others wait and reuse
        if ready():
            return train, test
        for path, records in ((train, generate_records(n_train, seed)), (test, generate_records(n_test, seed + 1))):
            with atomic_file(path) as f:
                json.dump(records, f, indent=1)
        with atomic_file(meta_file) as f:
            json.dump(meta, f)
    return train, test


class CsrTinyDataModule(CommonsenseDataModule):
    """:class:`CommonsenseDataModule` on the generated csr_tiny set: writes ``cache_dir/{train,test}.json``
    on first use (:func:`prepare_csr_tiny`), then the commonsense_170k code path."""

    def __init__(self, cache_dir: str = ".cache/csr_tiny", n_train: int = 4000, n_test: int = 400,
                 data_seed: int = 0, **kwargs: Any):
        if kwargs.get("train_file") is not None:
            raise ValueError("CsrTinyDataModule sets train_file itself (cache_dir/train.json)")
        kwargs.pop("train_file", None)
        self.cache_dir, self.n_train, self.n_test, self.data_seed = str(cache_dir), int(n_train), int(n_test), int(data_seed)
        super().__init__(train_file=str(csr_tiny_paths(cache_dir)[0]), **kwargs)
        self.test_file: Optional[str] = str(csr_tiny_paths(cache_dir)[1])

    def _prepare(self) -> None:
        prepare_csr_tiny(self.cache_dir, self.n_train, self.n_test, self.data_seed)

    def prepare_data(self) -> None:
        self._prepare()

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_dataset is None:
            self._prepare()
        super().setup(stage)

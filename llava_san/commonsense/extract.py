"""Answer extraction of LLM-Adapters' ``commonsense_evaluate.py`` (``extract_answer(args, sentence)``).

Read in ``AGI-Edgerunners/LLM-Adapters`` ``commomsense_evaluate.py`` and ``NVlabs/DoRA``
``commonsense_reasoning/commonsense_evaluate.py`` (identical there): the output is ``strip()``-ped,
``re.findall`` runs one alternation per dataset and the **first** match is the prediction, ``""``
when nothing matches. A question is correct when the prediction equals the test item's ``answer``.

Quirks kept on purpose (they decide the published numbers):

* case-sensitive: ``True`` / ``Answer1`` / ``Option2`` match nothing;
* no word boundaries: ``untrue`` gives ``true``, ``answer12`` gives ``answer1``, ``solution10``
  gives ``solution1``;
* several candidates: the first in the text wins (``"answer2 or answer1"`` -> ``answer2``);
* the alternation includes options a dataset does not have (``answer5`` for SIQA/OBQA/ARC,
  where SIQA has 3 and OBQA 4 answers): matched, then simply wrong;
* an empty or whitespace-only output gives ``""`` (always wrong: no test answer is empty).

The model output itself is, in the official script, ``decoded.split("### Response:")[-1].strip()``
of the whole decoded sequence (prompt included; :func:`response_text`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .prompt import RESPONSE_SPLIT

__all__ = ["BENCHMARKS", "CommonsenseBenchmark", "benchmark", "extract_answer", "is_correct", "response_text"]


@dataclass(frozen=True)
class CommonsenseBenchmark:
    """One of the eight benchmarks.

    Attributes:
        name: our registry name (``python -m evaluation benchmarks=[<name>]``).
        folder: LLM-Adapters' dataset folder and ``--dataset`` value (``dataset/<folder>/test.json``).
        style: the answer family (``true/false``, ``solution``, ``answer``, ``ending``, ``option``).
        pattern: the official regular expression.
        title: the paper's column title.
    """

    name: str
    folder: str
    style: str
    pattern: str
    title: str


_TF = r"true|false"
_SOL = r"solution1|solution2"
_ANS = r"answer1|answer2|answer3|answer4|answer5"
_END = r"ending1|ending2|ending3|ending4"
_OPT = r"option1|option2"

#: our name -> benchmark, in the paper's column order (Table 2: BoolQ, PIQA, SIQA, HellaSwag,
#: WinoGrande, ARC-e, ARC-c, OBQA).
BENCHMARKS: dict[str, CommonsenseBenchmark] = {
    b.name: b
    for b in (
        CommonsenseBenchmark("boolq", "boolq", "true/false", _TF, "BoolQ"),
        CommonsenseBenchmark("piqa", "piqa", "solution", _SOL, "PIQA"),
        CommonsenseBenchmark("social_i_qa", "social_i_qa", "answer", _ANS, "SIQA"),
        CommonsenseBenchmark("hellaswag", "hellaswag", "ending", _END, "HellaSwag"),
        CommonsenseBenchmark("winogrande", "winogrande", "option", _OPT, "WinoGrande"),
        CommonsenseBenchmark("arc_easy", "ARC-Easy", "answer", _ANS, "ARC-e"),
        CommonsenseBenchmark("arc_challenge", "ARC-Challenge", "answer", _ANS, "ARC-c"),
        CommonsenseBenchmark("openbookqa", "openbookqa", "answer", _ANS, "OBQA"),
    )
}

_BY_FOLDER = {b.folder: b for b in BENCHMARKS.values()}
_COMPILED = {b.name: re.compile(b.pattern) for b in BENCHMARKS.values()}


def benchmark(dataset: str) -> CommonsenseBenchmark:
    """The benchmark for our name (``arc_challenge``) or LLM-Adapters' (``ARC-Challenge``);
    ``ValueError`` listing both otherwise."""
    b = BENCHMARKS.get(dataset) or _BY_FOLDER.get(dataset)
    if b is None:
        raise ValueError(
            f"unknown commonsense dataset {dataset!r}; valid: {', '.join(BENCHMARKS)} "
            f"(or {', '.join(_BY_FOLDER)})"
        )
    return b


def extract_answer(dataset: str, text: str) -> str:
    """The official prediction for ``text``: the first match of the dataset's alternation in
    ``text.strip()``, or ``""``. ``dataset``: our name or LLM-Adapters' folder name."""
    b = benchmark(dataset)
    found = _COMPILED[b.name].findall((text or "").strip())
    return found[0] if found else ""


def is_correct(dataset: str, text: str, answer: str) -> bool:
    """``label == predict`` of the official loop."""
    return extract_answer(dataset, text) == answer


def response_text(decoded: str) -> str:
    """``o.split("### Response:")[-1].strip()``: what the official script keeps of the decoded
    sequence (prompt + generation); a generation that repeats ``### Response:`` keeps only the text
    after its last occurrence."""
    return decoded.split(RESPONSE_SPLIT)[-1].strip()

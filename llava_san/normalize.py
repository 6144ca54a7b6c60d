"""Answer normalisation and the VQA soft accuracy, as the official tools compute them.

Two normalisers exist upstream (``docs/benchmarks.md`` section 0):

* **Normaliser A** -- :func:`normalize_vqa`: ``processPunctuation`` then ``processDigitArticle`` of the
  official VQA evaluation (``vqaEval.py``). Also the first two steps of the VizWiz evaluation.
* **Normaliser B** -- :func:`normalize_evalai`: ``EvalAIAnswerProcessor`` (LLaVA's
  ``m4c_evaluator.py``): lower-case, drop every ``,`` and ``?``, split ``'s`` off, then A's steps.

Both reproduce the upstream quirks on purpose (they are part of the published numbers): the
digit-comma-digit test is global, the malformed period regex only checks "not followed by a digit",
at most 32 periods are removed (``re.UNICODE`` passed as ``count``), number words stop at "ten",
and the contraction table keeps ``"somebody'd" -> "somebodyd"``.
"""

from __future__ import annotations

import functools
import re
from typing import Sequence

__all__ = [
    "ARTICLES",
    "CONTRACTIONS",
    "NUMBER_MAP",
    "PUNCTUATION",
    "normalize_evalai",
    "normalize_vqa",
    "process_digit_article",
    "process_punctuation",
    "vqa_soft_accuracy",
]

# fmt: off
#: Punctuation handled by ``processPunctuation``, in upstream order. ``'``, ``:``, ``.`` and
#: ``$ % # & * ~ ^ |`` are not in it.
PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)

#: Whole-token number words (nothing above ten).
NUMBER_MAP: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

#: The 120-entry contraction table shared by ``vqaEval.py`` and ``EvalAIAnswerProcessor`` (data).
#: Keys with a capital letter (``Im``, ``Ive``, ``Id've``...) never fire: tokens are lower-cased first.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}

# fmt: on

# vqaEval.py: commaStrip = "(\d)(\,)(\d)"; EvalAIAnswerProcessor: "(?<=\d)(\,)+(?=\d)".
_COMMA_STRIP_A = re.compile(r"(\d)(\,)(\d)")
_COMMA_STRIP_B = re.compile(r"(?<=\d)(\,)+(?=\d)")
# The lookbehind is malformed upstream ("(?!<=\d)" is a negative lookahead for the text "<=\d"), so
# in effect only "not followed by a digit" is tested. Kept as is.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
# Upstream calls ``periodStrip.sub("", text, re.UNICODE)``: re.UNICODE (32) lands in ``count``.
_PERIOD_COUNT = int(re.UNICODE)


def process_punctuation(text: str, *, evalai: bool = False) -> str:
    """Upstream ``processPunctuation`` (A.1 + A.2).

    Each listed punctuation char is deleted when the *input* has it next to a space, or when the
    input holds a digit-comma-digit anywhere; otherwise it becomes a space. Then periods not
    followed by a digit are removed (32 at most). ``evalai=True`` uses EvalAI's comma regex.
    """
    comma_strip = _COMMA_STRIP_B if evalai else _COMMA_STRIP_A
    digit_comma = comma_strip.search(text) is not None
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str, contractions: dict[str, str] = CONTRACTIONS) -> str:
    """Upstream ``processDigitArticle`` (A.3): lower-case, number words to digits, drop articles,
    expand contractions, re-join with single spaces."""
    words = []
    for word in text.lower().split():
        word = NUMBER_MAP.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(contractions.get(w, w) for w in words)


@functools.lru_cache(maxsize=1 << 16)  # pure; gt answers repeat a lot
def normalize_vqa(text: str) -> str:
    """Normaliser A (official ``vqaEval.py``): whitespace clean-up, punctuation, digits/articles."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


@functools.lru_cache(maxsize=1 << 16)
def normalize_evalai(text: str) -> str:
    """Normaliser B (``EvalAIAnswerProcessor.__call__``, used by LLaVA's submission converters and
    the TextVQA evaluator).

    >>> normalize_evalai("The red one.")
    'red 1'
    >>> normalize_evalai("man's")
    "man 's"
    """
    # word_tokenize
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text, evalai=True))


def vqa_soft_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """VQA soft accuracy of one prediction, computed exactly as the official loop does.

    For each annotator ``i`` the other answers are compared with the prediction and
    ``min(1, matches / 3)`` is taken; the result is the mean over the leave-one-out subsets
    (``min(1, 0.3 * m)`` for 10 answers, ``m`` = matching annotators). No normalisation here:
    the caller applies the convention of the benchmark. An empty answer list raises ``ValueError``.
    """
    if not gt_answers:
        raise ValueError("vqa_soft_accuracy needs at least one ground-truth answer")
    matches = sum(1 for g in gt_answers if g == prediction)
    accs = [min(1, float(matches - (g == prediction)) / 3) for g in gt_answers]
    return float(sum(accs)) / len(accs)

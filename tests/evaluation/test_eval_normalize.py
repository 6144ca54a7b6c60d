"""Golden cases of docs/benchmarks.md section 0 for both normalisers, and the VQA soft accuracy."""

import pytest

from llava_san.normalize import (
    CONTRACTIONS,
    normalize_evalai,
    normalize_vqa,
    process_punctuation,
    vqa_soft_accuracy,
)

# (input, Normaliser A, Normaliser B) -- the table of docs/benchmarks.md section 0.3 plus section 0.2 examples.
GOLDEN = [
    ("Yes", "yes", "yes"),
    ("dont", "don't", "don't"),
    ("I dont know", "i don't know", "i don't know"),
    ("Two dogs", "2 dogs", "2 dogs"),
    ("The red one.", "red 1", "red 1"),
    ("1,000", "1000", "1000"),
    ("3.5.", "3.5", "3.5"),
    (".5", ".5", ".5"),
    ("10.", "10", "10"),
    ("t-shirt", "t shirt", "t shirt"),
    ("red - white", "red white", "red white"),
    ("yes, it is", "yes it is", "yes it is"),
    ("e.g.", "eg", "eg"),
    ("U.S.A.", "usa", "usa"),
    ("A.M.", "am", "am"),
    ("man's", "man's", "man 's"),
    ("it's", "it's", "it 's"),
    ("3:00 pm", "3:00 pm", "3:00 pm"),
    ("$5", "$5", "$5"),
    ("#1", "#1", "#1"),
    ("50%", "50%", "50%"),
    ("whats up?", "what's up", "what's up"),
    ("2,5 and a-b", "25 and ab", "25 and b"),
    ('what"s', "what s", "what s"),
    ("none", "0", "0"),
    ("a", "", ""),
    ("Im", "im", "im"),  # capitalised table keys never fire
    ("twenty", "twenty", "twenty"),
    ("one thousand", "1 thousand", "1 thousand"),
    ("  Yes\n", "yes", "yes"),
]


@pytest.mark.parametrize("text,a,b", GOLDEN)
def test_golden_normalisers(text, a, b):
    assert normalize_vqa(text) == a
    assert normalize_evalai(text) == b


def test_contraction_table_is_the_upstream_one():
    assert len(CONTRACTIONS) == 120
    assert CONTRACTIONS["somebody'd"] == "somebodyd"  # odd upstream entry kept
    assert CONTRACTIONS["dont"] == "don't" and CONTRACTIONS["yall'd've"] == "y'all'd've"


def test_period_quirks():
    assert process_punctuation("3.5.") == "3.5"
    # re.UNICODE lands in `count`: at most 32 periods are removed.
    assert process_punctuation("." * 40) == "." * 8


def test_digit_comma_test_is_global():
    # A: the digit-comma-digit anywhere makes every listed punctuation char vanish.
    assert normalize_vqa("1,000 t-shirts") == "1000 tshirts"
    assert normalize_vqa("a-b") == "b"  # no digit comma: '-' becomes a space, article dropped


def test_b_output_never_hits_a_contraction_key():
    """After Normaliser B no token is a key of the contraction table (except identity entries), so
    the VizWiz server's back-tick table cannot change a B-normalised prediction."""
    for key in CONTRACTIONS:
        for token in normalize_evalai(key).split():
            assert token not in CONTRACTIONS or CONTRACTIONS[token] == token, (key, token)


def _loo(pred, gts):
    """The official loop written out: leave annotator i out, count matches among the other nine."""
    accs = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1 :]
        accs.append(min(1.0, sum(g == pred for g in others) / 3))
    return sum(accs) / len(accs)


@pytest.mark.parametrize(
    "m,expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)]
)
def test_soft_accuracy_values(m, expected):
    gts = ["cat"] * m + [f"other{i}" for i in range(10 - m)]
    assert vqa_soft_accuracy("cat", gts) == pytest.approx(expected)
    assert vqa_soft_accuracy("cat", gts) == _loo("cat", gts)  # bit-identical to the official loop


def test_soft_accuracy_by_hand_and_empty():
    # m = 2: annotators 0 and 1 say "dog". Leaving one of them out gives 1/3, else 2/3.
    gts = ["dog", "dog"] + ["cat"] * 8
    assert vqa_soft_accuracy("dog", gts) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    with pytest.raises(ValueError):
        vqa_soft_accuracy("dog", [])

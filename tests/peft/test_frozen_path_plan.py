"""The frozen-path plan of a SAN layer (:func:`llava_san.peft.san.plan_frozen_path`), as a table."""
import pytest

from llava_san.peft.san import FrozenPath, plan_frozen_path

#: A long batch (tokens >= in_features) with a detached row scaling, no ZeRO-3, no hooks, no extra args.
BASE = dict(has_row=True, has_col=False, row_requires_grad=False, grad_enabled=True, tokens=512,
            in_features=64, partitioned=False, base_has_hooks=False, extra_args=False,
            weight_side_scaling="auto")

CASES = [
    # (name, changes to BASE, weight_side, row_in_place)
    ("long batch, auto: weight side", {}, True, True),
    ("short batch, auto: activations", {"tokens": 63}, False, True),
    ("tokens == in_features: weight side", {"tokens": 64}, True, True),
    ("short batch, forced weight side", {"tokens": 1, "weight_side_scaling": True}, True, True),
    ("long batch, weight side off", {"weight_side_scaling": False}, False, True),
    ("no scaling received", {"has_row": False}, False, False),
    ("column scaling only", {"has_row": False, "has_col": True}, True, False),
    ("column scaling, short batch", {"has_row": False, "has_col": True, "tokens": 2}, False, False),
    ("ZeRO-3: module call, never in place", {"partitioned": True}, False, False),
    ("ZeRO-3 forced: still the module call", {"partitioned": True, "weight_side_scaling": True}, False, False),
    ("row γ keeps its gradient", {"row_requires_grad": True}, False, False),
    ("row γ gradient, no_grad forward: in place", {"row_requires_grad": True, "grad_enabled": False}, False, True),
    ("hook on the base layer: not in place", {"base_has_hooks": True}, True, False),
    ("extra forward arguments: activations", {"extra_args": True}, False, True),
]


@pytest.mark.parametrize("name,changes,weight_side,row_in_place", CASES, ids=[c[0] for c in CASES])
def test_plan(name, changes, weight_side, row_in_place):
    assert plan_frozen_path(**{**BASE, **changes}) == FrozenPath(weight_side=weight_side,
                                                                  row_in_place=row_in_place)


def test_plan_takes_keywords_only():
    with pytest.raises(TypeError):
        plan_frozen_path(*BASE.values())

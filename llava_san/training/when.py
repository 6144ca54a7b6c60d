"""When an end-of-training check runs: ``evaluate.when`` against the kind of data the run trained on."""
from __future__ import annotations

from typing import Optional

__all__ = ["WHEN", "trained_on"]

#: ``auto``: only after training on the check's own kind of data; ``always``: whatever the data
WHEN = ("auto", "always")


def trained_on(when: str, data_target: Optional[str], data_class: type, kind: str, hint: str) -> tuple[bool, str]:
    """``(run the check?, why)``: with ``when="auto"`` the check runs only when ``data_target`` (the data
    config's ``_target_``) is ``data_class`` or a subclass -- a model tuned on other data is not scored
    on a task it never saw. ``kind`` names that data in the reason; ``hint`` says what to do instead."""
    if when not in WHEN:
        raise ValueError(f"evaluate.when must be one of {list(WHEN)}, got {when!r}")
    if when == "always":
        return True, "evaluate.when=always"
    from hydra.utils import get_class

    try:
        matches = data_target is not None and issubclass(get_class(data_target), data_class)
    except (ImportError, ValueError, TypeError):
        matches = False
    if matches:
        return True, f"the training data is {kind}"
    return False, f"the training data ({data_target}) is not {kind}; {hint}"

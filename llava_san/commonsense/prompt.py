"""The Alpaca-style prompt of LLM-Adapters' commonsense experiments, byte for byte.

Two templates exist in the official code and they differ in whitespace (checked in
``AGI-Edgerunners/LLM-Adapters`` ``finetune.py`` / ``commomsense_evaluate.py`` and in the copies of the
DoRA repository, ``NVlabs/DoRA`` ``commonsense_reasoning/finetune.py`` and
``commonsense_reasoning/commonsense_evaluate.py``, which the SAN paper's LLaMA experiments follow):

* **training** (``finetune.py``, ``generate_prompt(data_point)``): the header line ends in one space
  (with ``input``) or two spaces (without); the blank lines between sections hold 16 spaces; the
  ``output`` follows the 16-space indent after ``### Response:``. With ``train_on_inputs=False``
  the masked user part is this same template with ``output=""``.
* **evaluation** (``commonsense_evaluate.py``, ``generate_prompt(instruction, input=None)``): the
  header line ends in no space (with ``input``) or one space (without); the blank lines are empty;
  the prompt ends with ``### Response:`` + newline + 16 spaces, where generation starts. The
  official evaluation calls it with the instruction only (``input=None``), so the no-input branch is
  the one every benchmark uses; an empty ``input`` string selects it too (``if input:``).

Every line after the header is indented by 16 spaces (the f-string's source indentation).
"""

from __future__ import annotations

__all__ = ["INDENT", "RESPONSE_SPLIT", "generate_prompt", "train_prompt", "eval_prompt"]

#: the source indentation that the official f-strings carry into every line after the first
INDENT = " " * 16
#: ``commonsense_evaluate.py`` keeps ``decoded.split(RESPONSE_SPLIT)[-1].strip()`` as the output
RESPONSE_SPLIT = "### Response:"

_HEAD_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request."
)
_HEAD_NO_INPUT = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


def train_prompt(instruction: str, input: str | None, output: str) -> str:
    """``finetune.py``'s ``generate_prompt(data_point)``: the full training text (prompt + output)."""
    i = INDENT
    if input:
        return (
            f"{_HEAD_INPUT} \n\n"
            f"{i}### Instruction:\n{i}{instruction}\n{i}\n"
            f"{i}### Input:\n{i}{input}\n{i}\n"
            f"{i}### Response:\n{i}{output}"
        )
    return (
        f"{_HEAD_NO_INPUT}  \n\n"
        f"{i}### Instruction:\n{i}{instruction}\n{i}\n"
        f"{i}### Response:\n{i}{output}"
    )


def eval_prompt(instruction: str, input: str | None = None) -> str:
    """``commonsense_evaluate.py``'s ``generate_prompt(instruction, input=None)``: the prompt that
    ends where the response starts."""
    i = INDENT
    if input:
        return (
            f"{_HEAD_INPUT}\n\n"
            f"{i}### Instruction:\n{i}{instruction}\n\n"
            f"{i}### Input:\n{i}{input}\n\n"
            f"{i}### Response:\n{i}"
        )
    return (
        f"{_HEAD_NO_INPUT} \n\n"
        f"{i}### Instruction:\n{i}{instruction}\n\n"
        f"{i}### Response:\n{i}"
    )


def generate_prompt(instruction: str, input: str | None = None, output: str | None = None) -> str:
    """LLM-Adapters' prompt.

    ``output`` given (a string, ``""`` included): the training text of ``finetune.py`` (``output=""``
    is its user part, the span masked when ``train_on_inputs=False``). ``output=None``: the
    evaluation prompt of ``commonsense_evaluate.py``, ending after ``### Response:\\n`` + 16 spaces.
    The two templates differ in whitespace, as in the official code (module docstring).
    """
    if output is not None:
        return train_prompt(instruction, input, output)
    return eval_prompt(instruction, input)

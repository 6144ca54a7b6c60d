"""Key conversion from the original LLaVA (haotian-liu/LLaVA) stage-1 projector to transformers.

LLaVA-1.5's stage 1 saves only the projector, ``mm_projector.bin``: a ``torch.save``'d dict whose
keys are those of ``model.mm_projector`` (``build_vision_projector`` with ``mm_projector_type =
"mlp2x_gelu"``: ``nn.Sequential(Linear(1024, 4096), GELU(), Linear(4096, 4096))``), i.e.
``model.mm_projector.0.weight``, ``model.mm_projector.0.bias``, ``model.mm_projector.2.weight``,
``model.mm_projector.2.bias``. LLaVA itself reads it back keeping whatever follows ``mm_projector.``
(``get_w`` in ``llava/model/llava_arch.py``), so prefixes such as ``base_model.model.`` are accepted
too. transformers' ``LlavaMultiModalProjector`` names the two linears ``linear_1`` and ``linear_2``
(``act`` in between, GELU for ``projector_hidden_act="gelu"`` - the exact erf GELU of ``nn.GELU()``).
"""
from __future__ import annotations

from pathlib import Path

import torch

MM_PROJECTOR_FILE = "mm_projector.bin"
_KEYWORD = "mm_projector."
# original Sequential index -> transformers LlavaMultiModalProjector name
_KEY_MAP = {
    "0.weight": "linear_1.weight",
    "0.bias": "linear_1.bias",
    "2.weight": "linear_2.weight",
    "2.bias": "linear_2.bias",
}


def expected_projector_shapes(vision_hidden: int, text_hidden: int) -> dict[str, tuple[int, ...]]:
    """Original-key → shape for an mlp2x_gelu projector from ``vision_hidden`` to ``text_hidden``."""
    return {
        "0.weight": (text_hidden, vision_hidden),
        "0.bias": (text_hidden,),
        "2.weight": (text_hidden, text_hidden),
        "2.bias": (text_hidden,),
    }


def _describe(state: dict) -> str:
    def shape(v):
        return tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__

    return "{" + ", ".join(f"{k!r}: {shape(v)}" for k, v in state.items()) + "}"


def load_mm_projector(path: str | Path, vision_hidden: int, text_hidden: int) -> dict[str, torch.Tensor]:
    """Read a LLaVA ``mm_projector.bin`` and return a ``LlavaMultiModalProjector`` state dict.

    Args:
        path: the ``.bin`` file (``torch.load(weights_only=True)``, tensors kept in their saved dtype).
        vision_hidden: input width of the projector (vision hidden size × number of feature layers).
        text_hidden: the language model's hidden size.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a tensor dict, lacks the mlp2x_gelu keys, has extra projector keys
            (e.g. another ``mm_projector_type``) or shapes that do not fit ``vision_hidden → text_hidden``;
            the message names the file and lists the expected and found keys and shapes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"mm_projector file {str(path)!r} does not exist; expected LLaVA's stage-1 {MM_PROJECTOR_FILE} "
            "(e.g. from liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5)"
        )
    expected = expected_projector_shapes(vision_hidden, text_hidden)
    want = "{" + ", ".join(f"'model.mm_projector.{k}': {s}" for k, s in expected.items()) + "}"
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except Exception as err:  # pickle / zip errors come in many types
        raise ValueError(
            f"mm_projector file {str(path)!r} could not be read as a torch.save'd tensor dict "
            f"({type(err).__name__}: {err}); expected mlp2x_gelu keys and shapes {want}"
        ) from None
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        found = _describe(raw) if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(
            f"mm_projector file {str(path)!r} is not a dict of tensors (found {found}); "
            f"expected mlp2x_gelu keys and shapes {want}"
        )
    stripped = {k.split(_KEYWORD, 1)[1]: v for k, v in raw.items() if _KEYWORD in k}
    problems = []
    missing = sorted(set(expected) - set(stripped))
    extra = sorted(set(stripped) - set(expected))
    if missing:
        problems.append(f"missing {missing}")
    if extra:
        problems.append(f"unexpected {extra} (an mm_projector_type other than mlp2x_gelu?)")
    for k, shape in expected.items():
        if k in stripped and tuple(stripped[k].shape) != shape:
            problems.append(f"{k} has shape {tuple(stripped[k].shape)}, expected {shape}")
    if problems:
        raise ValueError(
            f"mm_projector file {str(path)!r} does not fit an mlp2x_gelu projector from the vision tower "
            f"(hidden {vision_hidden}) to the language model (hidden {text_hidden}): {'; '.join(problems)}. "
            f"Expected keys and shapes {want}; found {_describe(raw)}"
        )
    return {_KEY_MAP[k]: stripped[k] for k in expected}

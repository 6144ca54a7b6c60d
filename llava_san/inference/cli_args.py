"""The command-line options every model-using command shares (chat, predict, serve)."""
from __future__ import annotations

import argparse

__all__ = ["add_model_arguments"]

MODEL_HELP = "a training run folder, its merged/ (or an exported) folder, or a llava-hf checkpoint folder"


def add_model_arguments(parser: argparse.ArgumentParser, *, template: bool = True) -> None:
    """Add ``model`` (positional), ``--device``, ``--dtype`` and (``template``) ``--template``."""
    from ..conversation import TEMPLATES

    parser.add_argument("model", help=MODEL_HELP)
    parser.add_argument("--device", default="auto", help="cuda, cuda:1, cpu... (default auto: a GPU when there is one)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                        help="weights dtype (default auto: float16 on a GPU, the model's own on CPU)")
    if template:
        parser.add_argument("--template", choices=sorted(TEMPLATES),
                            help="conversation template (default: the one the model was trained with)")

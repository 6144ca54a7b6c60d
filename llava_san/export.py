"""``python -m llava_san.export <run folder> <out folder>``: merge a finished training run after the fact.

Reads the run's resolved ``config.yaml`` (or ``.hydra/config.yaml``), rebuilds its base model from
``model.build`` (same seed and paths), folds ``adapter/`` into it
(:func:`llava_san.checkpoint.export_merged_from_adapter`: LoRA/DoRA and SAN merged into the weights,
any strategy including ZeRO-3 runs) and writes a plain transformers LLaVA folder: the
``LlavaForConditionalGeneration`` weights plus a processor that prepares inputs as the run's data did
(:mod:`llava_san.export_processor`: pad-to-square image preprocessing, the chat template of the run's
conversation template); a LLaMA run (a causal LM) becomes a plain ``LlamaForCausalLM`` folder with its
tokenizer. The same folder as ``python -m train ... export=true`` writes to ``<run>/merged``.

The folder is written atomically (nothing is left behind on failure) and an existing non-empty out
folder is refused unless ``--overwrite``. Bad input (not a run folder, no or damaged ``adapter/``, an
existing out folder) is one line on stderr naming the path, and exit code 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["ExportError", "RUN_CONFIGS", "export_run", "main", "run_config_file"]

#: where a ``python -m train`` run folder keeps its resolved config, in order of preference
RUN_CONFIGS = ("config.yaml", ".hydra/config.yaml")


class ExportError(ValueError):
    """The input cannot be exported; the message names the path and what is wrong."""


def run_config_file(run: Path) -> Optional[Path]:
    """The resolved config of a ``python -m train`` run folder (:data:`RUN_CONFIGS`), or ``None``."""
    return next((run / name for name in RUN_CONFIGS if (run / name).is_file()), None)


def _run_config(run: Path) -> Path:
    """The run's config file, or :class:`ExportError` when ``run`` is not a training run folder."""
    if not run.is_dir():
        raise ExportError(f"{run} is not a folder (expected a `python -m train` run folder)")
    found = run_config_file(run)
    if found is None:
        raise ExportError(f"{run} is not a training run folder: no config.yaml or .hydra/config.yaml "
                          f"(found {sorted(p.name for p in run.iterdir())[:12]})")
    return found


def _check_out(run: Path, out: Path, overwrite: bool) -> None:
    """Refuse an out folder that would destroy the run, is a file, or holds files (unless ``overwrite``)."""
    run_r, out_r = run.resolve(), out.resolve()
    if out_r == run_r or out_r in run_r.parents or run_r / "adapter" in (out_r, *out_r.parents):
        raise ExportError(f"out folder {out} would replace the run folder {run} or its adapter")
    if out.exists() and not out.is_dir():
        raise ExportError(f"out folder {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"out folder {out} exists and is not empty (pass --overwrite to replace it)")


def export_run(run: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Merge the training run folder ``run`` into the plain transformers folder ``out``; returns ``out``.

    Raises :class:`ExportError` for bad input (see the module docstring); nothing is written then.
    """
    from omegaconf import OmegaConf

    from .checkpoint import export_merged_from_adapter
    from .models import build_from_config
    from .models.llama import export_causal_lm_from_adapter, is_causal_lm

    run, out = Path(run).expanduser(), Path(out).expanduser()
    cfg_file = _run_config(run)
    adapter = run / "adapter"
    if not adapter.is_dir():
        raise ExportError(f"{run} has no adapter/ folder: nothing to merge (the run did not finish, or "
                          "its adapter was moved)")
    _check_out(run, out, overwrite)
    cfg = OmegaConf.load(cfg_file)
    if "model" not in cfg or "build" not in cfg.model:
        raise ExportError(f"{cfg_file}: no model.build node; is {run} a `python -m train` run folder?")
    data = cfg.get("data") or {}
    try:
        built = build_from_config(cfg.model)  # (model, processor or tokenizer)
        model = built[0] if isinstance(built, tuple) else built
        if is_causal_lm(model):  # a LLaMA run: a plain LlamaForCausalLM folder + its tokenizer
            return export_causal_lm_from_adapter(lambda: built, adapter, None, out)
        return export_merged_from_adapter(
            lambda: built, adapter, None, out, template=data.get("template", "vicuna_v1"),
            image_aspect_ratio=data.get("image_aspect_ratio", "pad"))
    except (ValueError, OSError) as err:  # the loaders' own messages: damaged adapter, missing base...
        raise ExportError(f"cannot export {run}: {err}") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; returns the exit code (0 done, 2 bad input)."""
    parser = argparse.ArgumentParser(prog="python -m llava_san.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a finished `python -m train` run folder (config.yaml + adapter/)")
    parser.add_argument("out", help="the folder to write (a plain transformers LLaVA checkpoint)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty out folder")
    args = parser.parse_args(argv)
    try:
        written = export_run(args.run, args.out, overwrite=args.overwrite)
    except ExportError as err:
        print(f"llava_san.export: error: {err}", file=sys.stderr)
        return 2
    print(f"merged {args.run} into {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

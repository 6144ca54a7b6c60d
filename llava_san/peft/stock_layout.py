"""Where an adapter folder puts its tensors so that stock peft reads it the way llava-san does.

Stock ``PeftModel.from_pretrained(base, folder)`` restores two things from ``adapter_model.safetensors``:
the LoRA/DoRA tensors and, for each module named in the config's ``modules_to_save``, that module's
whole state (keys ``base_model.model.<module>.<tensor>``; peft wraps the module in a
``ModulesToSaveWrapper`` and loads them into its trained copy). The trained tensors beside the
adapters -- LLaVA's projector -- are therefore saved as ``modules_to_save`` modules whenever they form
whole modules, and the folder is then a stock peft LoRA/DoRA adapter.

SAN's γ̄ has no stock peft equivalent: a SAN folder (or one whose trained tensors are not whole modules)
gets an ``adapter_config.json`` whose ``peft_type`` is not a peft type, so stock peft (and every tool
that reads ``adapter_config.json`` through it: LLaMA-Factory, ``AutoPeftModel``) raises with the
instruction in its message instead of loading LoRA without γ̄; the folder's real LoRA config is then
``lora_config.json``, which :func:`llava_san.peft.load_adapter` reads. That stub has no ``r`` /
``lora_alpha`` / ``target_modules`` either, so a tool that parses the JSON itself (vLLM) fails too.
"""
from __future__ import annotations

from typing import Iterable, Optional

from torch import nn

from .adapters import is_adapter_param

#: prefix of the transformers model's tensors in a peft state dict
PEFT_PREFIX = "base_model.model."

#: the ``peft_type`` of a folder stock peft must refuse: peft raises ``KeyError(<this text>)``
REFUSAL = ("llava-san adapter with SAN scaling (gamma, in san_state.safetensors), which stock peft "
           "cannot apply: loading it as plain LoRA would give a wrong model. Load it with "
           "llava_san.peft.load_adapter(base_model, <this folder>), evaluate the run with "
           "`python -m evaluation path=<run folder>`, or export a plain transformers model with "
           "`python -m llava_san.export <run folder> <out folder>`; see README.md in this folder")

#: same, for a folder whose trained non-adapter tensors are not whole modules (stock peft would drop them)
REFUSAL_PARTIAL = ("llava-san adapter whose trained tensors outside the adapters "
                   "(extra_trainable.safetensors) are not whole modules, which stock peft cannot restore: "
                   "loading it as plain LoRA would give a wrong model. Load it with "
                   "llava_san.peft.load_adapter(base_model, <this folder>) or export a plain "
                   "transformers model with `python -m llava_san.export <run folder> <out folder>`; "
                   "see README.md in this folder")


def modules_to_save(model: nn.Module, trained: Iterable[str]) -> Optional[list[str]]:
    """The modules of ``model`` (a transformers model) whose whole state is ``trained`` (names of its
    trained non-adapter parameters), as stock peft's ``modules_to_save`` names them; ``None`` when the
    trained tensors are not whole modules (e.g. one bias of a frozen layer) or a name would be ambiguous.

    Each trained parameter is covered by its largest enclosing module all of whose parameters are
    trained (LLaVA's projector: ``model.multi_modal_projector``, not its two linears).
    """
    trained = set(trained)
    if not trained:
        return []
    if any(is_adapter_param(n) for n in trained):
        raise ValueError("modules_to_save: adapter tensors are saved by peft itself, not as whole modules")
    params_of = {}  # module name -> names of all its parameters (full names)
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        params_of[name] = {prefix + p for p, _ in module.named_parameters()}
    chosen: set[str] = set()
    for param in trained:
        owner = param.rpartition(".")[0]
        if owner not in params_of or not params_of[owner] <= trained:
            return None
        while owner:  # climb while the parent is still made of trained parameters only
            parent = owner.rpartition(".")[0]
            if not parent or not params_of[parent] <= trained:
                break
            owner = parent
        chosen.add(owner)
    # peft matches a modules_to_save entry against every module name by plain suffix (``str.endswith``):
    # each must name one module
    names = list(params_of)
    if any(sum(n.endswith(c) for n in names) != 1 for c in chosen):
        return None
    return sorted(chosen)


def module_tensors(model: nn.Module, modules: Iterable[str]) -> dict[str, "object"]:
    """The state of each module in ``modules``, keyed as stock peft saves ``modules_to_save``
    (``base_model.model.<module>.<tensor>``)."""
    out = {}
    for m in modules:
        for k, v in model.get_submodule(m).state_dict().items():
            out[f"{PEFT_PREFIX}{m}.{k}"] = v
    return out


def split_module_tensors(tensors: dict, modules: Iterable[str]) -> tuple[dict, dict]:
    """``(adapter tensors, module tensors named relative to the transformers model)`` of a saved
    ``adapter_model.safetensors`` whose config lists ``modules``."""
    prefixes = tuple(f"{PEFT_PREFIX}{m}." for m in modules)
    adapter, whole = {}, {}
    for k, v in tensors.items():
        if k.startswith(prefixes):
            whole[k.removeprefix(PEFT_PREFIX)] = v
        else:
            adapter[k] = v
    return adapter, whole


__all__ = ["PEFT_PREFIX", "REFUSAL", "REFUSAL_PARTIAL", "module_tensors", "modules_to_save",
           "split_module_tensors"]

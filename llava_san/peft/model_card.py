"""The ``README.md`` model card of an adapter folder: what it is and how to load it.

Written by :func:`llava_san.peft.save_adapter` from the folder's manifest, so the card states what the
files hold (a stock peft LoRA/DoRA adapter, or a SAN adapter that only llava-san loads) and the exact
calls that load it.
"""
from __future__ import annotations

from typing import Any, Optional

from ..models.source import is_hub_id


def _method(manifest: dict) -> str:
    lora = manifest.get("lora") or {}
    name = "DoRA" if lora.get("use_dora") else "LoRA"
    return f"SAN-{name}" if manifest.get("san") else name


def _base_call(manifest: dict) -> str:
    """Python that builds the base model the adapter was trained on, as far as the folder knows it."""
    name = manifest.get("base_model_name_or_path")
    if name:
        return ("from transformers import LlavaForConditionalGeneration\n"
                f'base = LlavaForConditionalGeneration.from_pretrained("{name}")')
    build = manifest.get("base_model") or {}
    target = build.get("_target_")
    if target:
        args = ", ".join(f"{k}={v!r}" for k, v in build.items() if not k.startswith("_"))
        module, _, fn = target.rpartition(".")
        return f"from {module} import {fn}\nbase, processor = {fn}({args})"
    return "base = ...  # the base model this adapter was trained on (see llava_san_adapter.json)"


def _front_matter(manifest: dict) -> str:
    lines = ["---"]
    if manifest.get("stock_peft"):
        lines.append("library_name: peft")
    name = manifest.get("base_model_name_or_path")
    if name and is_hub_id(str(name)):
        lines.append(f"base_model: {name}")
    tags = ["llava", "llava-san", _method(manifest).lower()]
    lines += ["tags:"] + [f"- {t}" for t in tags] + ["---", ""]
    return "\n".join(lines)


def model_card(manifest: dict[str, Any], san: Optional[dict] = None) -> str:
    """The card's Markdown for an adapter folder with ``manifest`` (``llava_san_adapter.json``)."""
    lora = manifest.get("lora") or {}
    method = _method(manifest)
    name = manifest.get("base_model_name_or_path")
    builder = (manifest.get("base_model") or {}).get("_target_")
    base = (f"`{name}`" if name else f"the model `{builder}` builds (see Load)" if builder
            else "the model it was trained on")
    extra = manifest.get("modules_to_save") or []
    parts = [_front_matter(manifest), f"# LLaVA {method} adapter (llava-san)", "",
             f"A {method} adapter (r={lora.get('r')}, alpha={lora.get('lora_alpha'):g}) on the language "
             f"tower of a `{manifest.get('base_model_class')}`, trained with llava-san. Base: {base}."]
    if extra:
        parts.append(f"The modules trained in full beside it ({', '.join(f'`{m}`' for m in extra)}, "
                     "LLaVA's projector) are saved as peft `modules_to_save`.")
    if san:
        parts.append(f"SAN scaling: propagation `{san.get('propagation')}`; its per-channel scaling "
                     "(gamma, `san_state.safetensors`) changes the frozen weights of later layers.")
    parts += ["", "## Load", ""]
    load_ours = ["```python", "from llava_san.peft import load_adapter", _base_call(manifest),
                 'model = load_adapter(base, "<this folder>")  # eval mode, frozen', "```"]
    if manifest.get("stock_peft"):
        parts += ["With stock peft (the same model as llava-san's loader):", "", "```python",
                  "from peft import PeftModel", _base_call(manifest), 'model = PeftModel.from_pretrained(base, "<this folder>")', "```", "",
                  "or with llava-san:", ""] + load_ours
    else:
        parts += ["**Stock peft cannot load this folder** (its `adapter_config.json` says so and "
                  "`PeftModel.from_pretrained` raises): plain LoRA without the SAN scaling would be a "
                  "different model. Load it with llava-san:", ""] + load_ours + [
            "", "or export a plain transformers LLaVA (SAN folded into the weights) from the training "
            "run folder that holds this `adapter/`:", "", "```bash",
            "python -m llava_san.export <run folder> <out folder>", "```"]
    parts += ["", "Evaluate the run: `python -m evaluation path=<run folder>`.", "",
              "## Files", "", "| file | content |", "|---|---|"]
    files = manifest.get("files", {})
    rows = [(files.get("lora_config"), "peft `LoraConfig`"),
            ("adapter_model.safetensors", "LoRA/DoRA tensors" + (" and the `modules_to_save` modules"
                                                                 if extra else "")),
            (files.get("extra"), "other trained tensors") if files.get("extra") != "adapter_model.safetensors"
            else (None, ""),
            ("san_config.json" if san else None, "SAN config with its source -> target pairs"),
            ("san_state.safetensors" if san else None, "SAN gamma (one vector per SAN layer)"),
            ("llava_san_adapter.json", "manifest: base class and shapes checked when loading")]
    if files.get("lora_config") != "adapter_config.json":
        rows.insert(0, ("adapter_config.json", "refuses stock peft (its `peft_type` says why)"))
    parts += [f"| `{f}` | {what} |" for f, what in rows if f]
    return "\n".join(parts) + "\n"


__all__ = ["model_card"]

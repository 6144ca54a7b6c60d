"""Keep the ranks of a distributed step in lockstep when a batch has no image or no sample at all.

Three things need every rank to run the same graph every step:

* **DDP** (``find_unused_parameters: false``, the fast setting) expects a gradient for every trainable
  parameter on every rank; a parameter outside the graph stalls the gradient all-reduce.
* **DeepSpeed ZeRO-3** gathers each module's partitioned weights with a collective when the module
  runs: a module that runs on one rank only waits forever for the others.
* **Lightning** refuses a ``training_step`` that returns ``None`` with more than one process (and the
  DeepSpeed engine always steps), so a batch cannot simply be skipped.

Two batches break that, both real in LLaVA's data:

* a **text-only** batch (``llava_v1_5_mix665k.json`` holds ~40K text-only ShareGPT conversations; the
  modality-grouped sampler never mixes modalities in a batch): the vision tower and the trained
  projector are not run. LLaVA itself feeds a zero image for every text-only sample and drops its
  features; :func:`zero_image_in_forward` does the same once per batch: it adds
  ``0 · Σ projector(CLIP(zeros))`` (:func:`image_branch_zero`) to the token embeddings, where an image
  batch writes its image features;
* a batch whose samples were **all skipped as bad** (``on_bad_sample: skip``): :func:`placeholder_loss`
  runs the same modules on one ``<s>`` token, times 0.

Both add exactly zero to the loss and give every trainable parameter a zero gradient (not ``None``): on
DDP the rank contributes zeros to the gradient average (a skipped rank dilutes that step's gradient
by ``1/world_size``, as a smaller batch would); the optimizer still steps. SAN's γ̄ running averages
(``san_gamma_ema``) are restored after the placeholder forward, so a fake token never enters them.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ..peft import san_layers
from ..peft.adapters import base_transformers_model


def _llava(model: nn.Module) -> nn.Module:
    """The ``LlavaForConditionalGeneration`` inside a peft wrapper (or the model itself)."""
    inner = base_transformers_model(model)
    if not hasattr(inner, "model") or not hasattr(inner.model, "get_image_features"):
        raise TypeError(f"{type(inner).__name__} is not a LLaVA model (no .model.get_image_features)")
    return inner


def _anchor(model: nn.Module) -> torch.Tensor:
    """A tensor on the model's device and compute dtype (inputs are built from it)."""
    return next(p for p in _llava(model).model.multi_modal_projector.parameters())


def image_branch_zero(model: nn.Module) -> torch.Tensor:
    """``0 · Σ projector(vision_tower(zero image))``: a 0-d zero that puts the vision tower and the
    projector into the graph (LLaVA's zero image for text-only samples), with the model's own
    ``vision_feature_layer``/``vision_feature_select_strategy``.

    The image is ``(1, 3, S, S)`` zeros, ``S = vision_config.image_size``; returns fp32.
    """
    llava = _llava(model)
    cfg = llava.config
    size = int(cfg.vision_config.image_size)
    vision_dtype = next(llava.model.vision_tower.parameters()).dtype
    pixels = torch.zeros(1, 3, size, size, dtype=vision_dtype, device=_anchor(model).device)
    out = llava.model.get_image_features(
        pixel_values=pixels, vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    features = out.pooler_output if hasattr(out, "pooler_output") else out  # list of (n_img_tokens, D)
    total = sum(f.float().sum() for f in features)
    return total * 0.0


@contextlib.contextmanager
def frozen_gamma_ema(model: nn.Module) -> Iterator[None]:
    """Restore SAN's ``san_gamma_ema`` buffers on exit: a forward inside leaves γ̄ as it found it."""
    saved = [(layer.san_gamma_ema, layer.san_gamma_ema.detach().clone()) for layer in san_layers(model)]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


@contextlib.contextmanager
def zero_image_in_forward(model: nn.Module) -> Iterator[None]:
    """Inside, a text-only forward of the LLaVA backbone runs the graph of an image batch.

    A forward pre-hook on ``LlavaModel`` (removed on exit) replaces ``input_ids`` with
    ``inputs_embeds = embed_tokens(input_ids) + image_branch_zero``: the same values, but the embeddings
    now depend on the projector, as in an image batch, where LLaVA writes the projected image features
    into the embeddings before the decoder. Being a hook of ``LlavaModel``, it runs where an image batch
    runs them: ``LlavaModel → embed_tokens → vision tower → projector → decoder`` forward, decoder then
    projector backward. ZeRO-3 gathers each module's weights with a collective as the module runs and
    prefetches along the recorded module order: every rank must run the same modules in the same order,
    whatever its batch holds. Only keyword calls (``backbone(input_ids=...)``) are rewritten.
    """
    llava = _llava(model)

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        ids = kwargs.pop("input_ids", None)
        if ids is None or kwargs.get("pixel_values") is not None:
            raise ValueError("zero_image_in_forward: expected a text-only call with input_ids=... as a keyword")
        embeds = module.get_input_embeddings()(ids)  # (B, T, D)
        kwargs["inputs_embeds"] = embeds + image_branch_zero(model).to(embeds.dtype)
        return args, kwargs

    handle = llava.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def placeholder_loss(model: nn.Module) -> torch.Tensor:
    """A 0-d zero loss through every trained tensor, for a rank whose batch was all skipped:
    the backbone on one ``<s>`` token inside :func:`zero_image_in_forward` (vision tower, projector,
    decoder with its adapters and SAN), ``lm_head``, times 0.
    """
    llava = _llava(model)
    bos = llava.config.text_config.bos_token_id
    ids = torch.tensor([[1 if bos is None else int(bos)]], device=_anchor(model).device)
    with zero_image_in_forward(model), frozen_gamma_ema(model):
        out = llava.model(input_ids=ids, attention_mask=torch.ones_like(ids))
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (1, 1, D)
    logits = llava.lm_head(hidden[:, -1])  # (1, V)
    return logits.float().sum() * 0.0


__all__ = ["frozen_gamma_ema", "image_branch_zero", "placeholder_loss", "zero_image_in_forward"]

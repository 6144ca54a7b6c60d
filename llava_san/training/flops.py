r"""Model FLOPs of a training step (for MFU) and the peak FLOP/s of known accelerators.

A PEFT step leaves the base weights frozen: their weight gradients are never computed, only the input
gradients that flow to earlier adapters. Per matrix multiply ``y = x Wᵀ`` over ``N`` rows: forward
``2·|W|·N``; backward ``2·|W|·N`` for the input gradient, plus ``2·|W|·N`` for the weight gradient only
if ``W`` trains. Summed over a LLaVA step of ``B`` sequences of ``T`` positions (padding included: it is
computed), with

* ``P``      the frozen linear weights of the decoder blocks (LLaMA: ``L·(2d² + 2d·d_kv + 3d·f)``);
* ``P_t``    the decoder's linear weights that train (full fine-tuning; 0 under LoRA/DoRA);
* ``P_lora`` the LoRA weights, ``Σ r·(in + out)`` over the adapted layers;
* ``P_2``    the frozen weights of DoRA layers with dropout > 0 (DoRA multiplies ``W`` by ``x`` and by
  ``drop(x)``), ``R = Σ r·|W|`` over the DoRA layers (the ``B A`` product of ``‖W + s·BA‖``, once per forward);
* ``N = B·T``; ``N_ans`` the trained positions (labels ≠ −100 after the shift: ``lm_head`` runs on those
  rows only, :func:`~llava_san.training.loss.causal_lm_loss`); ``d`` hidden size, ``L`` decoder layers,
  ``V`` the ``lm_head`` rows;
* per image: ``n_img`` image tokens, ``T_v = n_img + 1`` vision positions (CLS), ``P_vis`` the vision
  encoder's linear weights, ``L_v`` its layers, ``d_v`` its width (every layer runs, no gradient);
  ``P_proj`` the projector's weights and ``P_proj2`` those after its first layer; ``B_img`` images::

    forward  = 2·(P + P_2)·N + 2·P_lora·N + 2·R + 4·L·B·T²·d + 2·d·V·N_ans
               + B_img·(2·P_vis·T_v + 4·L_v·T_v²·d_v) + 2·P_proj·B_img·n_img
    backward = 2·(P + P_2)·N + 2·P_t·N + 4·P_lora·N + 2·(4·L·B·T²·d) + 2·d·V·N_ans [+ 2·d·V·N_ans if lm_head trains]
               + [projector trains] 2·P_proj·B_img·n_img + 2·P_proj2·B_img·n_img
    model FLOPs = forward + backward;   MFU = model FLOPs / step time / peak FLOP/s

Attention counts the full ``T × T`` square (``QKᵀ`` and ``AV``); element-wise work (norms, activations,
softmax, SAN's γ sums and scalings) is not counted. For LLaVA-1.5 batches of one image per sequence and
equal lengths this is the formula of ``benchmarks/gpu_check.py`` (``tests/training/test_throughput.py``
checks that they agree). ``peak``: the card's dense bf16 tensor-core FLOP/s (:data:`PEAK_BF16`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import nn

#: dense bf16 tensor-core FLOP/s by GPU name, first match wins (no sparsity); ``torch.cuda.get_device_name()``
#: gives e.g. "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H200", "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB"
PEAK_BF16 = (("H200", 989.4e12), ("H100 PCIe", 756.0e12), ("H100 NVL", 835.0e12), ("H100", 989.4e12),
             ("H800", 989.4e12), ("A100", 312.0e12))

IGNORE_INDEX = -100


def peak_flops(device_name: Optional[str]) -> Optional[float]:
    """Dense bf16 FLOP/s of a GPU from its name (:data:`PEAK_BF16`), or None when unknown."""
    if not device_name:
        return None
    for key, value in PEAK_BF16:
        if key in device_name:
            return value
    return None


def _linear_size(module: nn.Module) -> int:
    """``in · out`` of a linear layer (from its features, so a ZeRO-3-partitioned weight counts in full)."""
    return int(module.in_features) * int(module.out_features)


def _trains(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return weight is not None and weight.requires_grad


@dataclass(frozen=True)
class FlopModel:
    """The sizes that set a step's FLOPs (module doc); :meth:`of` reads them from a built model."""

    hidden: int
    layers: int
    vocab: int  # lm_head rows
    frozen: int  # P
    trained_dense: int  # P_t
    lora: int  # P_lora
    dora_twice: int  # P_2
    dora_norm: int  # R
    head_trains: bool = False
    image_tokens: int = 0  # n_img (image tokens per image in the sequence)
    vision_linear: int = 0  # P_vis
    vision_layers: int = 0
    vision_hidden: int = 0
    projector: int = 0  # P_proj
    projector_inner: int = 0  # P_proj2
    projector_trains: bool = False

    @classmethod
    def of(cls, model: nn.Module) -> "FlopModel":
        """Read the sizes from a LLaVA (or LLaMA-family causal LM), plain or wrapped by peft (+ SAN)."""
        from peft.tuners.lora import LoraLayer

        from ..peft.adapters import base_transformers_model, language_tower_prefix

        base = base_transformers_model(model)
        config = base.config
        text = getattr(config, "text_config", None) or config
        tower = base.get_submodule(language_tower_prefix(model))
        frozen = trained = lora = twice = norm = 0
        inside_lora: set[int] = set()
        for module in tower.layers.modules():
            if isinstance(module, LoraLayer):
                inside_lora.update(id(m) for m in module.modules())
                w = module.get_base_layer()
                size = _linear_size(w)
                frozen, trained = (frozen, trained + size) if _trains(w) else (frozen + size, trained)
                for name in module.active_adapters:
                    if name not in module.lora_A:
                        continue
                    a, b = module.lora_A[name], module.lora_B[name]
                    lora += _linear_size(a) + _linear_size(b)
                    if module.use_dora.get(name, False):
                        norm += int(a.out_features) * size
                        drop = module.lora_dropout[name]
                        if isinstance(drop, nn.Dropout) and drop.p > 0:
                            twice += size
            elif isinstance(module, nn.Linear) and id(module) not in inside_lora:
                size = _linear_size(module)
                frozen, trained = (frozen, trained + size) if _trains(module) else (frozen + size, trained)
        head = base.get_output_embeddings()
        fields: dict[str, Any] = dict(
            hidden=int(text.hidden_size), layers=int(text.num_hidden_layers), vocab=int(head.out_features),
            frozen=frozen, trained_dense=trained, lora=lora, dora_twice=twice, dora_norm=norm,
            head_trains=_trains(head))
        vision_cfg = getattr(config, "vision_config", None)
        inner = getattr(base, "model", base)
        vision, projector = getattr(inner, "vision_tower", None), getattr(inner, "multi_modal_projector", None)
        if vision_cfg is not None and vision is not None and projector is not None:
            proj = [m for m in projector.modules() if isinstance(m, nn.Linear)]
            fields.update(
                image_tokens=(vision_cfg.image_size // vision_cfg.patch_size) ** 2,
                vision_linear=sum(_linear_size(m) for m in vision.modules() if isinstance(m, nn.Linear)),
                vision_layers=int(vision_cfg.num_hidden_layers), vision_hidden=int(vision_cfg.hidden_size),
                projector=sum(_linear_size(m) for m in proj), projector_inner=sum(_linear_size(m) for m in proj[1:]),
                projector_trains=any(p.requires_grad for p in projector.parameters()))
        return cls(**fields)

    def step(self, *, batch: int, seq_len: int, n_answer: int, n_images: int = 0) -> dict[str, float]:
        """FLOPs of one forward + backward over ``batch`` sequences of ``seq_len`` positions with
        ``n_answer`` trained positions and ``n_images`` images: ``forward``, ``backward``, ``model``
        (their sum) and ``decoder_forward`` (what activation checkpointing recomputes)."""
        d, n = self.hidden, batch * seq_len
        attn = 4 * self.layers * batch * seq_len ** 2 * d
        head = 2 * d * self.vocab * n_answer
        t_v = self.image_tokens + 1
        vision = n_images * (2 * self.vision_linear * t_v + 4 * self.vision_layers * t_v ** 2 * self.vision_hidden)
        proj_rows = n_images * self.image_tokens
        decoder_fwd = 2 * (self.frozen + self.dora_twice) * n + 2 * self.lora * n + 2 * self.dora_norm + attn
        forward = decoder_fwd + head + vision + 2 * self.projector * proj_rows
        backward = (2 * (self.frozen + self.dora_twice) * n + 2 * self.trained_dense * n + 4 * self.lora * n
                    + 2 * attn + head * (2 if self.head_trains else 1))
        if self.projector_trains:
            backward += 2 * self.projector * proj_rows + 2 * self.projector_inner * proj_rows
        return {"forward": float(forward), "backward": float(backward), "model": float(forward + backward),
                "decoder_forward": float(decoder_fwd)}

    def batch_counts(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """``batch``/``seq_len``/``n_images`` (ints) and ``n_answer`` (a 0-d tensor: no device sync) of a
        collated batch."""
        ids = batch["input_ids"]  # (B, T)
        labels = batch.get("labels")
        n_answer = (labels[:, 1:] != IGNORE_INDEX).sum() if labels is not None else torch.tensor(0)
        pixels = batch.get("pixel_values")
        return {"batch": int(ids.shape[0]), "seq_len": int(ids.shape[1]), "n_answer": n_answer,
                "n_images": int(pixels.shape[0]) if pixels is not None and self.image_tokens else 0}


__all__ = ["FlopModel", "PEAK_BF16", "peak_flops"]

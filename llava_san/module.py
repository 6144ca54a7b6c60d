"""``LlavaSanModule``: LLaVA-1.5 + (SAN-)LoRA/DoRA as a Lightning module.

What it trains (the LLaVA-1.5 LoRA recipe)::

    CLIP vision tower ── frozen
    multi_modal_projector ── trained in full at ``optim.projector_lr`` (2e-5)   [train_projector]
    language model ── frozen base + peft LoRA/DoRA (+ SAN) at ``optim.lr`` (2e-4)
    lm_head, embeddings ── frozen

The model is built in :meth:`configure_model` (not ``__init__``) so that DeepSpeed ZeRO-3 partitions the
weights while they are created. What trains beside the projector is one adapter recipe
(:mod:`llava_san.peft.recipes`, the ``peft`` config group): LoRA/DoRA with optional SAN, none (only the
projector trains, LLaVA's stage-1 setting) or full fine-tuning.

Checkpoints (Lightning ``.ckpt``) keep only the trained tensors, SAN's γ̄ buffers and the optimiser
state, never the frozen base: :meth:`on_save_checkpoint` filters the state dict, and
:meth:`on_load_checkpoint` checks that a checkpoint belongs to this model (same architecture, same
trained tensor names and shapes) before anything is loaded. Mid-epoch resume is exact at the index
level through the datamodule's ``state_dict``/``load_state_dict`` (saved by Lightning in the checkpoint).

Logged: ``train/loss`` (the LM loss; a SAN regulariser is logged apart as ``train/san_reg``),
``train/lr``, ``train/lr_projector`` and, every ``log_gamma_every_n_steps`` optimiser steps, SAN's γ
statistics ``san/<module type>/{mean,std,min,max,clamped,ema_mean}``. The throughput counters
(``train/tokens_per_s``, ``train/samples_per_s``, ``train/mfu``, ``train/peak_mem_gb``) are
:class:`~llava_san.training.throughput.Throughput`'s (``conf/callbacks/default.yaml``; added with its
defaults by :meth:`LlavaSanModule.configure_callbacks` when the trainer has none).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import lightning as L
from lightning.pytorch.strategies import DeepSpeedStrategy
import torch
from peft import PeftModel

from .peft import (
    AdapterRecipe,
    NoAdapter,
    san_gamma_stats,
    san_regularization,
    set_gamma_logging,
    set_projector_trainable,
)
from .models.llama import check_same_tokenizer, is_causal_lm
from .peft.adapter_io import _fingerprint
from .training.lockstep import placeholder_loss, zero_image_in_forward
from .training.loss import causal_lm_loss
from .training.processors import check_same_processor
from .training.optim import OptimConfig, build_optimizer, cosine_with_warmup, optimizer_offloaded

#: Collator keys that go into the model's forward (others, e.g. ids for evaluation, are ignored).
MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values", "image_sizes", "position_ids")
CKPT_KEY = "llava_san"


class LlavaSanModule(L.LightningModule):
    """LLaVA-1.5 with an adapter recipe (peft LoRA/DoRA + SAN, none, or full fine-tuning), built lazily.

    The same module trains a LLaMA-family causal LM (``conf/model/llama*.yaml``: a factory returning
    ``(LlamaForCausalLM, tokenizer)``, ``train_projector=false``): :meth:`configure_model` finds that the
    model has no vision tower (``text_only``), checks the data tokenizer instead of a LLaVA processor and
    never runs the zero-image branch; everything else (loss, SAN, checkpoints, resume) is shared.

    Args:
        model_factory: a callable returning ``(LlavaForConditionalGeneration, processor)`` or a model
            (``conf/model/*.yaml: build``, a Hydra ``_partial_``).
        adapter: the :class:`~llava_san.peft.recipes.AdapterRecipe` (``instantiate(cfg.peft)``);
            ``None`` = :class:`~llava_san.peft.recipes.NoAdapter` (only the projector trains).
        optim: :class:`llava_san.training.OptimConfig` (learning rates, AdamW, cosine warm-up).
        train_projector: train LLaVA's multimodal projector (LLaVA recipe: yes).
        gradient_checkpointing: non-reentrant activation checkpointing of the language model.
        log_gamma_every_n_steps: log SAN γ statistics every this many optimiser steps (0: never).
        data_processor: the processor the datamodule prepares batches with (built before the model);
            :meth:`configure_model` checks it fits the built model's processor before any step.
    """

    def __init__(
        self,
        model_factory: Callable[[], Any],
        adapter: Optional[AdapterRecipe] = None,
        optim: Optional[OptimConfig] = None,
        train_projector: bool = True,
        gradient_checkpointing: bool = False,
        log_gamma_every_n_steps: int = 50,
        data_processor: Any = None,
    ) -> None:
        super().__init__()
        if adapter is not None and not isinstance(adapter, AdapterRecipe):
            raise TypeError(f"adapter must be an AdapterRecipe (instantiate(cfg.peft)), got {type(adapter).__name__}")
        self.model_factory = model_factory
        self.adapter: AdapterRecipe = adapter if adapter is not None else NoAdapter()
        self.optim = optim or OptimConfig()
        self.train_projector = train_projector
        self.gradient_checkpointing = gradient_checkpointing
        self.log_gamma_every_n_steps = int(log_gamma_every_n_steps)
        self.data_processor = data_processor
        self.model: Optional[torch.nn.Module] = None
        self.processor = None
        self.text_only = False  # set in configure_model: the model is a causal LM without vision
        # checkpoints hold the trained tensors only; checked in on_load_checkpoint
        self.strict_loading = False
        self._batches_in_epoch = 0
        self._skipped_batches = 0  # batches whose samples were all skipped as bad

    # ------------------------------------------------------------------------------------------
    # model
    # ------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Build the model (once): the adapter recipe sets what trains (e.g. frozen base + LoRA/DoRA + SAN),
        then the projector is unfrozen."""
        if self.model is not None:
            return
        built = self.model_factory()
        model, processor = built if isinstance(built, tuple) else (built, None)
        self.text_only = is_causal_lm(model)  # a LLaMA-family causal LM: no vision tower, no projector
        if self.text_only and self.train_projector:
            raise ValueError(f"{type(model).__name__} has no multimodal projector to train: set "
                             "model.train_projector=false (conf/model/llama*.yaml do)")
        if self.data_processor is not None and processor is not None:
            check = check_same_tokenizer if self.text_only else check_same_processor
            check(self.data_processor, processor)
        model = self.adapter.apply(model)
        if self.train_projector:
            set_projector_trainable(model, True)
        if self.gradient_checkpointing:
            base = model.get_base_model() if isinstance(model, PeftModel) else model
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("nothing to train: no adapter (peft=none) and model.train_projector=false")
        model.train()
        self.model = model
        self.processor = processor

    def forward(self, **batch: Any) -> Any:
        """The wrapped model's forward on the model inputs of ``batch`` (other collator keys dropped)."""
        return self.model(**{k: v for k, v in batch.items() if k in MODEL_INPUTS})

    def trained_keys(self) -> list[str]:
        """State-dict keys a checkpoint holds: trainable parameters and SAN buffers (γ̄)."""
        keys = [n for n, p in self.named_parameters() if p.requires_grad]
        keys += [n for n, _ in self.named_buffers() if n.rsplit(".", 1)[-1].startswith("san_")]
        return keys

    def fingerprint(self) -> dict:
        """Plain-data identity of the model (checked when a checkpoint is loaded)."""
        return {**_fingerprint(self.model), **self.adapter.describe()}

    # ------------------------------------------------------------------------------------------
    # training
    # ------------------------------------------------------------------------------------------
    def _gamma_step(self) -> bool:
        n = self.log_gamma_every_n_steps
        return n > 0 and self.adapter.san is not None and self.trainer.global_step % n == 0

    @property
    def lockstep(self) -> bool:
        """Whether every step must run the same graph on every rank (more than one process, or DeepSpeed):
        see :mod:`llava_san.training.lockstep`."""
        trainer = self._trainer
        return trainer is not None and (trainer.world_size > 1 or isinstance(trainer.strategy, DeepSpeedStrategy))

    def training_step(self, batch: dict, batch_idx: int) -> Optional[torch.Tensor]:
        """LM loss over the answer tokens (:func:`~llava_san.training.loss.causal_lm_loss`) + SAN's
        regulariser.

        A batch whose samples were all skipped as bad: ``None`` (no optimiser step) on one process; under
        DDP/DeepSpeed a zero loss through every trained tensor (:func:`placeholder_loss`), since every
        rank must step. A text-only batch under DDP/DeepSpeed also runs the vision branch on a zero image
        (:func:`~llava_san.training.lockstep.zero_image_in_forward`, LLaVA's way) so the projector is in every rank's graph.
        """
        bs = batch["input_ids"].shape[0]
        if batch["input_ids"].numel() == 0:
            self._skipped_batches += 1
            self.log("train/skipped_batches", float(self._skipped_batches), batch_size=1)
            return placeholder_loss(self.model) if self.lockstep else None
        log_gamma = self._gamma_step()
        if log_gamma:
            set_gamma_logging(self.model, True)
        text_only_in_lockstep = self.lockstep and batch.get("pixel_values") is None and not self.text_only
        with zero_image_in_forward(self.model) if text_only_in_lockstep else contextlib.nullcontext():
            lm_loss = causal_lm_loss(self.model, batch)
        loss = lm_loss
        reg = san_regularization(self.model)
        if reg.requires_grad or float(reg) != 0.0:
            loss = loss + reg.to(loss.device, loss.dtype)
            self.log("train/san_reg", reg.detach(), batch_size=bs)
        self.log("train/loss", lm_loss.detach(), prog_bar=True, batch_size=bs)
        if log_gamma:
            set_gamma_logging(self.model, False)
            stats = san_gamma_stats(self.model)
            if stats:
                self.log_dict(stats, batch_size=bs)
        self._batches_in_epoch += 1
        return loss

    def on_train_batch_end(self, outputs: Any, batch: dict, batch_idx: int) -> None:
        if batch["input_ids"].numel() == 0:
            return
        bs = batch["input_ids"].shape[0]
        opt = self.trainer.optimizers[0] if self.trainer.optimizers else None
        if opt is not None:
            lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(opt.param_groups)}
            self.log("train/lr", lrs.get("adapter", opt.param_groups[0]["lr"]), prog_bar=True, batch_size=bs)
            if "projector" in lrs:
                self.log("train/lr_projector", lrs["projector"], batch_size=bs)

    def on_train_epoch_end(self) -> None:
        self._batches_in_epoch = 0  # a checkpoint taken at the epoch's end resumes at the next epoch's start

    def configure_callbacks(self) -> list:
        """A :class:`~llava_san.training.throughput.Throughput` when the trainer has none (e.g.
        ``callbacks=none``), so the throughput counters are always logged, once. This one never resets
        CUDA's process-wide peak-memory counter (``peak_memory="run"``): code around an unconfigured
        ``Trainer`` may read it (``benchmarks/gpu_check.py`` does)."""
        from .training.throughput import Throughput

        trainer = self._trainer
        if trainer is not None and any(isinstance(c, Throughput) for c in trainer.callbacks):
            return []
        return [Throughput(peak_memory="run")]

    def configure_optimizers(self) -> dict:
        # DeepSpeed with the optimizer offloaded to the host: DeepSpeedCPUAdam (as LLaVA's zero3_offload)
        optimizer = build_optimizer(self.named_parameters(), self.optim,
                                    cpu_offload=optimizer_offloaded(self.trainer.strategy))
        total = self.trainer.estimated_stepping_batches
        if not isinstance(total, int) or total <= 0:
            total = self.trainer.max_steps if self.trainer.max_steps > 0 else 1
        scheduler = cosine_with_warmup(optimizer, int(total), self.optim.warmup_ratio,
                                       self.optim.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = set(self.trained_keys())
        if "state_dict" in checkpoint:  # absent under DeepSpeed (the engine saves the module itself)
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint[CKPT_KEY] = {
            "fingerprint": self.fingerprint(),
            "trained_keys": sorted(keep),
            "batches_in_epoch": int(self._batches_in_epoch),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        from .checkpoint import CheckpointMismatchError

        meta = checkpoint.get(CKPT_KEY)
        if meta is None:
            raise CheckpointMismatchError(
                "this checkpoint was not written by LlavaSanModule (no 'llava_san' entry); "
                "pass ckpt_path=<a .ckpt from a llava-san run> or ckpt_path=last")
        mine = self.fingerprint()
        if meta["fingerprint"] != mine:
            raise CheckpointMismatchError(
                f"checkpoint is from another model/adapter: it has {meta['fingerprint']}, "
                f"this run builds {mine}")
        expected = set(self.trained_keys())
        theirs = set(meta["trained_keys"])
        if theirs != expected:
            missing, extra = sorted(expected - theirs), sorted(theirs - expected)
            raise CheckpointMismatchError(
                f"checkpoint trains other tensors than this run: missing {missing[:3]} ({len(missing)}), "
                f"unexpected {extra[:3]} ({len(extra)})")
        sd = checkpoint.get("state_dict")
        if sd is not None:
            own = dict(self.named_parameters())
            own.update(self.named_buffers())
            for k, v in sd.items():
                if k in own and tuple(own[k].shape) != tuple(v.shape) and own[k].numel() > 0:
                    raise CheckpointMismatchError(
                        f"checkpoint tensor {k} has shape {tuple(v.shape)}, "
                        f"this model has {tuple(own[k].shape)}")
        # the data position is restored by the datamodule's own state_dict (Lightning saves and restores it)
        self._batches_in_epoch = int(meta.get("batches_in_epoch", 0))

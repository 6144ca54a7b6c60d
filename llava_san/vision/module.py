"""``ImageClassifierModule``: a timm ViT + a vision recipe (linear probe, SSF, SAN-SSF, MoPPA, LoRA) as
a Lightning module, for ``python -m train experiment=<vision experiment>``.

It takes the same constructor arguments as :class:`llava_san.module.LlavaSanModule` (``run()`` builds
either from ``cfg.module``). Loss: cross-entropy (``label_smoothing``) + the recipe's regulariser
(SAN-SSF's eq. 13 when ``reg_lambda > 0``; MoPPA's route balance, scheduled by training progress).
Optimiser: AdamW at ``optim.lr`` with ``optim.weight_decay`` on matrices only (no decay on scales,
shifts, biases and the recipe's other exemptions, as SSF's optimiser), cosine with linear warm-up.
Logged: ``train/loss``, ``train/acc``, ``train/reg``, ``train/lr`` and the recipe's statistics every
``log_stats_every_n_steps`` steps. Checkpoints keep only the trained tensors (resume checks them).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import lightning as L
import torch
import torch.nn.functional as F

from ..peft.recipes.vision import VisionRecipe
from ..training.optim import OptimConfig, cosine_with_warmup

CKPT_KEY = "llava_san_vision"


class ImageClassifierModule(L.LightningModule):
    """Image classification with a vision recipe; see the module doc.

    Args:
        model_factory: a callable returning the timm classifier (``conf/model/<vit>.yaml: build``).
        adapter: the :class:`~llava_san.peft.recipes.vision.VisionRecipe` (``instantiate(cfg.peft)``).
        optim: learning rate, weight decay, warm-up (``optim.projector_lr`` is not used).
        data_processor: the image transform (accepted for ``run()``'s common signature).
        label_smoothing: cross-entropy label smoothing.
        log_stats_every_n_steps: the recipe's statistics every this many steps (0: never).
    """

    text_only = False
    task = "classification"

    def __init__(self, model_factory: Callable[[], Any], adapter: Optional[VisionRecipe] = None,
                 optim: Optional[OptimConfig] = None, data_processor: Any = None, label_smoothing: float = 0.0,
                 log_stats_every_n_steps: int = 50, **unused: Any) -> None:
        super().__init__()
        if not isinstance(adapter, VisionRecipe):
            raise TypeError(f"image classification needs a vision recipe (peft=linear_probe|ssf|san_ssf|moppa|"
                            f"vit_lora), got {type(adapter).__name__}")
        self.model_factory, self.adapter = model_factory, adapter
        self.optim = optim or OptimConfig()
        self.data_processor, self.processor = data_processor, data_processor
        self.label_smoothing = float(label_smoothing)
        self.log_stats_every_n_steps = int(log_stats_every_n_steps)
        self.model: Optional[torch.nn.Module] = None
        self.strict_loading = False

    def configure_model(self) -> None:
        if self.model is not None:
            return
        model = self.adapter.apply(self.model_factory())
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(f"{self.adapter!r} left nothing to train")
        self.model = model.train()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values)

    def _progress(self) -> float:
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else \
            self.trainer.estimated_stepping_batches
        return min(1.0, self.trainer.global_step / max(int(total), 1))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.model(batch["pixel_values"])
        labels = batch["labels"]
        task_loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        loss = task_loss
        reg = self.adapter.regulariser(self.model, self._progress())
        bs = labels.shape[0]
        if reg is not None:
            loss = loss + reg.to(loss.dtype)
            self.log("train/reg", reg.detach(), batch_size=bs)
        self.log("train/loss", task_loss.detach(), prog_bar=True, batch_size=bs)
        self.log("train/acc", (logits.argmax(-1) == labels).float().mean(), prog_bar=True, batch_size=bs)
        n = self.log_stats_every_n_steps
        if n > 0 and self.trainer.global_step % n == 0:
            stats = self.adapter.statistics(self.model)
            if stats:
                self.log_dict({k: float(v) for k, v in stats.items()}, batch_size=bs)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: dict, batch_idx: int) -> None:
        opt = self.trainer.optimizers[0] if self.trainer.optimizers else None
        if opt is not None:
            self.log("train/lr", opt.param_groups[0]["lr"], prog_bar=True, batch_size=batch["labels"].shape[0])

    def configure_optimizers(self) -> dict:
        no_decay = self.adapter.no_decay(self.model)
        decay, plain = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (plain if name in no_decay else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.optim.weight_decay, "name": "adapter"},
                  {"params": plain, "weight_decay": 0.0, "name": "adapter_no_decay"}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.optim.lr,
                                      betas=tuple(self.optim.betas), eps=self.optim.eps)
        total = self.trainer.estimated_stepping_batches
        if not isinstance(total, int) or total <= 0:
            total = self.trainer.max_steps if self.trainer.max_steps > 0 else 1
        scheduler = cosine_with_warmup(optimizer, int(total), self.optim.warmup_ratio, self.optim.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def held_out(self, trainer: Any) -> dict[str, float]:
        """``val/loss`` and ``val/accuracy`` on the datamodule's validation split (tuning runs,
        ``data.train_split=train``); empty without one. Called by ``run()`` once after training."""
        from .datamodule import top1

        dm = trainer.datamodule
        loader = dm.val_dataloader() if dm is not None else []
        if not loader:
            return {}
        accuracy, n, _ = top1(self.model, loader)
        return {"val/accuracy": accuracy, "val/n": float(n)}

    # checkpoints: trained tensors only, checked on load
    def trained_keys(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = set(self.trained_keys())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint[CKPT_KEY] = {"recipe": self.adapter.describe(), "trained_keys": sorted(keep)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        from ..checkpoint import CheckpointMismatchError

        meta = checkpoint.get(CKPT_KEY)
        if meta is None:
            raise CheckpointMismatchError("this checkpoint was not written by ImageClassifierModule; pass "
                                          "ckpt_path=<a .ckpt of a vision run> or ckpt_path=last")
        if meta["recipe"] != self.adapter.describe() or set(meta["trained_keys"]) != set(self.trained_keys()):
            raise CheckpointMismatchError(f"checkpoint is from another recipe or model: it has {meta['recipe']}, "
                                          f"this run builds {self.adapter.describe()}")


__all__ = ["ImageClassifierModule"]

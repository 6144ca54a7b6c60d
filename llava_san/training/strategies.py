"""DeepSpeed under Lightning for llava-san: LLaVA's ZeRO configs, their ``"auto"`` values, and a CPU mode.

:class:`DeepSpeedStrategy` is Lightning's ``DeepSpeedStrategy`` with three additions:

* **LLaVA's JSON configs as they are.** ``conf/strategy/deepspeed_*.yaml`` hold LLaVA's
  ``scripts/zero2.json``, ``zero3.json`` and ``zero3_offload.json`` (``"auto"`` values included). Left
  to DeepSpeed, ``"auto"`` would silently mean *DeepSpeed's* default (its config parser drops the key);
  LLaVA meant the HF Trainer's values. :func:`resolve_auto` fills them as the HF Trainer does:
  precision from the Trainer (``bf16``/``fp16`` ``"auto"``), batch size / accumulation / clipping from
  the Trainer (Lightning writes those itself), and the hidden-size-based ZeRO sizes from the model::

      reduce_bucket_size                  = hidden²
      stage3_prefetch_bucket_size         = int(0.9 · hidden²)
      stage3_param_persistence_threshold  = 10 · hidden

  An ``"optimizer"``/``"scheduler"`` block is dropped: the LightningModule's ``configure_optimizers``
  (AdamW with two learning rates + cosine) is the one schedule of every strategy.

* **A CPU mode for tests and CI.** Lightning refuses any accelerator but CUDA
  (``setup_environment``), checks that device indices equal local ranks (CPU devices have index
  ``None``), and hands DeepSpeed ``device_rank=None`` (which it compares with 0). DeepSpeed itself runs
  on CPU: its CPU accelerator (``DS_ACCELERATOR=cpu``; picked automatically when no GPU is visible)
  with the ``gloo`` backend. With ``Trainer(accelerator="cpu")`` this strategy skips the two Lightning
  checks, passes the local rank as ``device_rank`` and verifies that DeepSpeed's accelerator is the CPU
  one. On GPUs it behaves exactly like Lightning's.

* **Where ZeRO-3 partitions the model** (``zero_init``, ZeRO-3 only).

  ``zero_init=False``: the model is built whole on each rank's CPU, exactly as without DeepSpeed, and
  ``deepspeed.initialize`` moves it to the device and partitions it. Cost: the whole model once per rank
  in host memory (bf16 7B: 14 GB, 13B: 26 GB) and, transiently, on each GPU before partitioning.

  ``zero_init=True``: partitioned at construction, the way the HF Trainer does it. While
  ``configure_model`` runs, a transformers ``HfDeepSpeedConfig`` of this config is alive, so
  ``from_pretrained``/``from_config`` build inside ``deepspeed.zero.Init`` and load rank 0 → all,
  ``resize_token_embeddings`` gathers, and peft gathers the frozen weight it reads (DoRA's ``‖W‖``). The
  builders of :mod:`llava_san.models` gather around their own writes (mean-initialised rows) or make
  small pieces whole and partition them at once (projector, resized embeddings, the random tiny model),
  and return the model partitioned, equal once gathered to the ``zero_init=False`` model (same seed,
  same checkpoint, same RNG state afterwards). ``zero3_offload`` (GPUs smaller than the model) defaults
  to it; ``zero3`` and ``zero3_cpu`` keep ``False``.

  Lightning's own version wraps all of ``configure_model`` in ``deepspeed.zero.Init`` instead. That
  partitions each parameter as soon as its module's ``__init__`` returns, so every later in-place write
  fails or is silently lost: transformers' ``_init_weights`` (``IndexError`` on the empty embedding),
  ``load_state_dict``, the meta-device assembly of ``build_llava_from_parts``, and the adapters made after
  the builder (peft's ``zeros_`` of LoRA ``B`` hits the placeholder: ``B`` keeps ``nn.Linear``'s random
  init). As in the HF Trainer, the adapters are built whole here (they are small) and
  ``deepspeed.initialize`` partitions them with the rest; a model factory that knows nothing of ZeRO-3
  still works, built whole and partitioned by ``initialize``. Lightning's ``remote_device`` is not used:
  where partitions live comes from the config's ``offload_param``, as in transformers.
"""
from __future__ import annotations

import argparse
import copy
from contextlib import contextmanager
from typing import Any, Generator, Mapping, Optional

from lightning.pytorch.accelerators import CPUAccelerator
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DeepSpeedStrategy as _LightningDeepSpeedStrategy
from lightning.pytorch.strategies.ddp import DDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from ..distributed.zero3 import hf_deepspeed_config

AUTO = "auto"
#: ZeRO sizes whose ``"auto"`` the HF Trainer derives from the model's hidden size (``hidden -> value``).
HIDDEN_SIZE_AUTO = {
    "reduce_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}
#: Top-level keys Lightning fills from the Trainer (``accumulate_grad_batches``, the loader's batch size,
#: ``gradient_clip_val``); an ``"auto"`` there is removed so Lightning's value is used.
TRAINER_AUTO = ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
                "gradient_clipping")


def model_hidden_size(model: Any) -> Optional[int]:
    """The language model's hidden size, read from the first module with a transformers config.

    Same lookup order as the HF Trainer: ``hidden_size``, ``max(hidden_sizes)``, then the same under
    ``text_config`` (LLaVA keeps the language model's size there).
    """
    modules = model.modules() if hasattr(model, "modules") else [model]
    for module in modules:
        cfg = getattr(module, "config", None)
        if cfg is None or not hasattr(cfg, "to_dict"):
            continue
        for c in (cfg, getattr(cfg, "text_config", None)):
            if c is None:
                continue
            if getattr(c, "hidden_size", None):
                return int(c.hidden_size)
            if getattr(c, "hidden_sizes", None):
                return int(max(c.hidden_sizes))
    return None


def resolve_auto(config: Mapping[str, Any], *, precision: str = "32-true",
                 hidden_size: Optional[int] = None) -> dict:
    """A copy of a DeepSpeed config with LLaVA's/HF's ``"auto"`` values resolved (see the module doc).

    Args:
        config: a DeepSpeed config dict (e.g. LLaVA's ``scripts/zero3.json``).
        precision: the Lightning Trainer's precision; ``bf16``/``fp16`` ``enabled: "auto"`` follow it.
        hidden_size: the model's hidden size for the ZeRO bucket/persistence sizes; ``None`` leaves
            those ``"auto"`` (resolved later, once the model exists).

    Raises:
        ValueError: an ``"auto"`` this function does not know (it would silently become DeepSpeed's
            default otherwise).
    """
    cfg = copy.deepcopy(dict(config))
    for key in TRAINER_AUTO:
        if cfg.get(key) == AUTO:
            del cfg[key]
    for key in ("optimizer", "scheduler"):
        if key in cfg:  # the LightningModule's optimizer and schedule are used on every strategy
            del cfg[key]
    half = {"bf16": precision.startswith("bf16"), "fp16": precision.startswith("16")}
    for key, on in half.items():
        block = cfg.get(key)
        if isinstance(block, dict) and block.get("enabled") == AUTO:
            if on:
                block["enabled"] = True
            else:  # Lightning adds nothing for 32-bit; drop the block so DeepSpeed runs in fp32
                del cfg[key]
    zero = cfg.get("zero_optimization")
    if isinstance(zero, dict):
        zero = cfg["zero_optimization"] = dict(zero)
        for key, fn in HIDDEN_SIZE_AUTO.items():
            if zero.get(key) == AUTO and hidden_size is not None:
                zero[key] = fn(int(hidden_size))
    unknown = [k for k, v in _walk(cfg) if v == AUTO and k.rsplit(".", 1)[-1] not in HIDDEN_SIZE_AUTO]
    if unknown:
        raise ValueError(f"DeepSpeed config: no rule to resolve 'auto' for {unknown}; give a value")
    return cfg


def _walk(d: Mapping[str, Any], prefix: str = "") -> Generator[tuple[str, Any], None, None]:
    for k, v in d.items():
        if isinstance(v, Mapping):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


class DeepSpeedStrategy(_LightningDeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` + LLaVA ``"auto"`` values, CPU accelerator support, ``zero_init``.

    Args:
        zero_init: ZeRO-3 only: partition the model while ``configure_model`` builds it (a transformers
            ``HfDeepSpeedConfig`` alive; see the module doc). ``False`` (default): built whole,
            partitioned by ``deepspeed.initialize``.
        *args, **kwargs: Lightning's ``DeepSpeedStrategy`` arguments (``config=`` a dict or JSON path
            with LLaVA's ``"auto"`` values, ``exclude_frozen_parameters``, ...).
    """

    def __init__(self, *args: Any, zero_init: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.zero_init = bool(zero_init)

    # ------------------------------------------------------------------------------------------
    # CPU mode
    # ------------------------------------------------------------------------------------------
    @property
    def on_cpu(self) -> bool:
        return isinstance(self.accelerator, CPUAccelerator)

    def setup_environment(self) -> None:
        if not self.on_cpu:
            return super().setup_environment()  # Lightning's CUDA check and set-up, unchanged
        from deepspeed.accelerator import get_accelerator

        name = get_accelerator().device_name()
        if name != "cpu":
            raise RuntimeError(
                f"Trainer(accelerator='cpu') with DeepSpeed, but DeepSpeed's accelerator is {name!r}: set "
                "DS_ACCELERATOR=cpu in the environment before deepspeed is imported")
        # DDPStrategy.setup_environment: the accelerator's device set-up, then setup_distributed (below)
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        if not self.on_cpu:
            return super().setup_distributed()
        # Lightning's version first checks that device indices equal the local ranks; CPU devices have
        # index None. The rest is the same: seed, ranks, deepspeed.init_distributed (gloo on CPU).
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    # ------------------------------------------------------------------------------------------
    # "auto" values and where ZeRO-3 partitions
    # ------------------------------------------------------------------------------------------
    def _format_config(self) -> None:
        # precision- and Trainer-based "auto"s first; Lightning then fills batch size, accumulation,
        # clipping and (for a missing bf16/fp16 block) precision from the Trainer
        self.config = resolve_auto(self.config, precision=str(self.precision_plugin.precision))
        super()._format_config()

    @contextmanager
    def model_sharded_context(self) -> Generator[None, None, None]:
        # not Lightning's deepspeed.zero.Init around all of configure_model: see the module doc
        self._init_config_if_needed()
        if not (self.zero_init and self.zero_stage_3):
            yield
            return
        with hf_deepspeed_config(self.config):
            yield

    def _setup_model_and_optimizer(self, model: Any, optimizer: Any, lr_scheduler: Any = None) -> Any:
        # the model exists now: resolve the hidden-size "auto"s as the HF Trainer does before initialize
        hidden = model_hidden_size(model)
        precision = str(self.precision_plugin.precision)
        self.config = resolve_auto(self.config, precision=precision, hidden_size=hidden)
        zero = self.config.get("zero_optimization", {})
        left = [k for k in HIDDEN_SIZE_AUTO if zero.get(k) == AUTO]
        if left:  # no transformers config found: DeepSpeed's own defaults, said out loud
            for k in left:
                del zero[k]
            rank_zero_info(f"DeepSpeed: no model hidden size found; {left} use DeepSpeed's defaults")
        if not self.on_cpu:
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        # Lightning passes args.device_rank = root_device.index, None for a CPU device, which DeepSpeed
        # compares with 0 (TypeError); and a negative rank would make it assume world size 1. The CPU
        # accelerator's device for a rank is "cpu" whatever the index, so pass the local rank.
        import deepspeed  # costly import: only when this strategy sets up

        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer


__all__ = ["DeepSpeedStrategy", "hf_deepspeed_config", "model_hidden_size", "resolve_auto"]

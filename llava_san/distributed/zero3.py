"""Everything llava-san knows about DeepSpeed ZeRO-3 partitioning, in one place.

Under ZeRO-3 each rank keeps a slice of every partitioned parameter; the parameter object itself is an
empty placeholder (``numel() == 0``) carrying DeepSpeed's attributes: ``ds_id`` (it is partitioned),
``ds_shape`` / ``ds_numel`` (the full tensor's shape and size) and ``ds_status`` (whether its full data
is present right now). Library code asks the functions below instead of reading those attributes, so the
probes and their reasons are written once (``tests/test_layout.py`` keeps it so).

Why a parameter must be gathered, and how (:func:`gathered`):

* **read** (``for_write=False``): the full value is materialised on every rank and re-partitioned on
  exit, changes discarded. Saving trained tensors, or a frozen weight a computation reads outside its
  module's forward (DoRA's ``‖W‖``).
* **write** (``for_write=True``): rank 0's value after the block is scattered back to every rank's
  partition. Every rank computes the same write (same inputs), so keeping rank 0's loses nothing.
* **only what is not already present** (``only_unavailable=True``): inside a DeepSpeed forward, ZeRO-3
  gathers a parameter itself, and one read outside its owner's forward is registered as an "external
  parameter" of the running module, whose pre-forward hook fetches it from the next step on. Wrapping
  an already-present parameter in ``GatheredParameters`` would re-partition it on exit while the hook
  still holds it ("Cannot free a ZeRO-3 parameter while it is still active", SAN-DoRA's 2nd step).

Gathering is a collective: every rank must enter the same block with the same parameters.

Building under ZeRO-3 (``DeepSpeedStrategy(zero_init=True)``): while a transformers
``HfDeepSpeedConfig`` is alive (:func:`hf_deepspeed_config`), ``from_pretrained``/``from_config`` build
inside ``deepspeed.zero.Init`` and ``resize_token_embeddings`` gathers; :func:`hf_zero3_config` tells a
builder whether that is so, :func:`without_hf_zero3` builds something whole regardless, and
:func:`partition` partitions a whole module afterwards.

``deepspeed`` is imported inside the functions that need it: importing it costs seconds and sets up its
accelerator, which runs without DeepSpeed (and the CPU tests that pick ``DS_ACCELERATOR``) must not pay.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterable, Iterator, Mapping, Optional

import torch
from torch import nn

_AUTO = "auto"


# ----------------------------------------------------------------------------------------------
# Probes
# ----------------------------------------------------------------------------------------------
def is_partitioned(p: torch.Tensor) -> bool:
    """Whether ZeRO-3 partitions ``p`` (each rank holds a slice; ``p`` itself may be a placeholder)."""
    return hasattr(p, "ds_id")


def full_shape(p: torch.Tensor) -> torch.Size:
    """The shape of the whole tensor, also when ``p`` is a partitioned placeholder of shape ``[0]``."""
    return getattr(p, "ds_shape", p.shape)


def is_placeholder(t: torch.Tensor) -> bool:
    """Whether ``t`` lacks the full data: an ungathered ZeRO-3 placeholder (empty; a ``state_dict()``
    copy of one also loses ``ds_numel``, hence the empty check) or a tensor smaller than its full size."""
    return t.numel() == 0 or (hasattr(t, "ds_numel") and t.numel() != t.ds_numel)


def _is_available(p: torch.Tensor) -> bool:
    """Whether a partitioned parameter's full data is present right now (gathered by a hook or a block)."""
    return p.ds_status.name != "NOT_AVAILABLE"


def any_partitioned(model: nn.Module) -> bool:
    """Whether ZeRO-3 partitions any parameter of ``model`` (each rank then holds slices only)."""
    return any(is_partitioned(p) for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# Gathering
# ----------------------------------------------------------------------------------------------
def gathered(params: Iterable[torch.Tensor], *, for_write: bool = False,
             only_unavailable: bool = False) -> contextlib.AbstractContextManager:
    """Make the partitioned ``params`` whole inside the block (a no-op for ordinary tensors).

    Args:
        params: tensors, any mix of partitioned and ordinary ones (only the partitioned are gathered).
        for_write: keep rank 0's values on exit (scattered to every partition); otherwise changes are
            discarded (see the module doc).
        only_unavailable: leave out parameters whose data is already present (a parameter gathered by
            a running ZeRO-3 forward; see the module doc).
    """
    zero = [p for p in params if is_partitioned(p) and not (only_unavailable and _is_available(p))]
    if not zero:
        return contextlib.nullcontext()
    import deepspeed  # costly import, see the module doc

    return deepspeed.zero.GatheredParameters(zero, modifier_rank=0 if for_write else None)


# ----------------------------------------------------------------------------------------------
# Building under ZeRO-3
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def hf_deepspeed_config(config: Mapping[str, Any]) -> Iterator[Any]:
    """Keep a transformers ``HfDeepSpeedConfig`` of ``config`` alive inside the block (ZeRO-3 aware
    ``from_pretrained``, ``from_config``, ``resize_token_embeddings``, peft's gathers).

    transformers finds it through a module-level weakref; on exit the previous one (normally none) is
    restored. The ZeRO ``"auto"`` values (hidden-size based, known only once the model exists) are left
    out: DeepSpeed's defaults for construction, which they do not affect.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    cfg = copy.deepcopy(dict(config))
    zero = cfg.get("zero_optimization")
    if isinstance(zero, dict):
        cfg["zero_optimization"] = {k: v for k, v in zero.items() if v != _AUTO}
    previous = hf_deepspeed._hf_deepspeed_config_weak_ref  # no public getter in transformers
    live = hf_deepspeed.HfDeepSpeedConfig(cfg)
    try:
        yield live
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = previous
        del live


def hf_zero3_config() -> Optional[dict]:
    """The DeepSpeed config of the live transformers ``HfDeepSpeedConfig`` if it is ZeRO-3, else ``None``.

    While one is alive, transformers' ``from_pretrained``/``from_config`` build inside
    ``deepspeed.zero.Init`` (parameters partitioned as each module is created) and its
    ``resize_token_embeddings`` gathers.
    """
    from transformers.integrations import deepspeed_config, is_deepspeed_zero3_enabled

    return deepspeed_config() if is_deepspeed_zero3_enabled() else None


@contextlib.contextmanager
def without_hf_zero3() -> Iterator[None]:
    """Hide the live ``HfDeepSpeedConfig`` from transformers: modules built inside are whole, unpartitioned.

    For what must be built as without DeepSpeed: a random model (its values depend on the order of the
    RNG draws, which transformers' ZeRO-3 construction changes) or a ``meta``-device shell (zero.Init
    cannot partition meta tensors).
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref  # no public getter in transformers
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = ref


def partition(module: nn.Module, config: dict) -> nn.Module:
    """Partition (ZeRO-3) every parameter of ``module`` that is not partitioned yet; values unchanged.

    Each rank keeps its own slice of its own copy, so every rank must hold the same values (same seed,
    same checkpoint). With partitioned parameters already in ``module`` (from ``from_pretrained`` under
    ZeRO-3) the rest joins them (DeepSpeed's ``convert_to_zero_parameters``, as ``deepspeed.initialize``
    does); otherwise ``deepspeed.zero.Init(module=...)`` partitions the whole module.
    """
    params = list(module.parameters())
    whole = [p for p in params if not is_partitioned(p)]
    if not whole:
        return module
    anchor = next((p for p in params if is_partitioned(p)), None)
    if anchor is not None:
        anchor.convert_to_zero_parameters(param_list=whole)
    else:
        import deepspeed  # costly import, see the module doc

        deepspeed.zero.Init(module=module, config_dict_or_path=config)
    return module


__all__ = [
    "any_partitioned",
    "full_shape",
    "gathered",
    "hf_deepspeed_config",
    "hf_zero3_config",
    "is_partitioned",
    "is_placeholder",
    "partition",
    "without_hf_zero3",
]

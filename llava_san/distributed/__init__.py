"""Multi-process training support: DeepSpeed ZeRO-3 knowledge lives in :mod:`.zero3` only."""
from .zero3 import (
    any_partitioned,
    full_shape,
    gathered,
    hf_deepspeed_config,
    hf_zero3_config,
    is_partitioned,
    is_placeholder,
    partition,
    without_hf_zero3,
)

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

"""Offline stand-ins for tests, demos and benchmarks -- not used by a real run.

* :mod:`.checkpoints` -- tiny random checkpoints in the real on-disk formats (Vicuna ``.bin`` shards,
  CLIP, LLaVA's ``mm_projector.bin``, llava-hf in both layouts), so the real loaders run unchanged;
* :mod:`.synthetic` -- a fixed-shape random LLaVA datamodule (``data=synthetic``);
* :mod:`.callbacks` -- ``KillAtStep``, the SIGKILL used by the resume tests.
"""
from .checkpoints import write_tiny_checkpoints

__all__ = ["write_tiny_checkpoints"]

"""Fault injection for the resume tests: a training process killed at a chosen step."""
from __future__ import annotations

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    """SIGKILL this process right after optimiser step ``step`` (after checkpoint callbacks ran).

    Used to test that ``ckpt_path=last`` continues a run killed mid-training exactly.
    """

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)

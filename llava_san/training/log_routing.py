"""Lightning's log messages printed once, and kept in the run's log file.

Importing the ``lightning`` package adds its own stderr handler to the ``lightning`` logger and leaves
it propagating to the root logger. Under Hydra the root logger already has a console handler (stdout)
and the run's log file (``<run folder>/<job>.log``), so every Lightning message -- ``Seed set to 0``,
``GPU available``, ``Trainer.fit stopped`` -- was printed twice, once by each handler.
:func:`route_lightning_to_root` removes Lightning's own console handler when the root logger has
handlers: each message then goes through the root's handlers once (the console and the log file).
"""
from __future__ import annotations

import logging

__all__ = ["route_lightning_to_root"]


def route_lightning_to_root() -> bool:
    """Drop the console handler the ``lightning`` package installed when the root logger has handlers
    of its own (Hydra's); Lightning's loggers then propagate to them. Returns whether one was dropped.

    Without root handlers (a plain script without logging setup) Lightning's handler stays: it is then
    the only thing that prints Lightning's messages.
    """
    if not logging.getLogger().handlers:
        return False
    import lightning

    console = getattr(lightning, "_console", None)
    dropped = False
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            # the package's own console handlers only (lightning._console, and the plain stderr handler
            # lightning.pytorch / lightning.fabric add when imported before any logging setup)
            if handler is console or (type(handler) is logging.StreamHandler and name != "lightning"):
                logger.removeHandler(handler)
                dropped = True
        logger.propagate = True
    return dropped

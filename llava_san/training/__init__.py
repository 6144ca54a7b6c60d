"""Training-system pieces used by :class:`llava_san.module.LlavaSanModule` and ``python -m train``.

Nothing here reads Hydra: ``conf/`` YAMLs instantiate these objects (``_target_``). The names below are
imported on first use, so a module of this package that needs no Lightning (``progress``, which
``python -m evaluation`` uses) loads without it.
"""
import importlib

_NAMES = {
    "OptimConfig": "optim", "build_optimizer": "optim", "cosine_with_warmup": "optim",
    "BadSampleReport": "callbacks", "ConfigAtTrainStart": "callbacks",
    "MetricsRecorder": "metrics", "write_metrics": "metrics",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_NAMES))

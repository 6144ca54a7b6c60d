"""Training-system pieces used by :class:`llava_san.module.LlavaSanModule` and ``python -m train``.

Nothing here reads Hydra: ``conf/`` YAMLs instantiate these objects (``_target_``).
"""
from .optim import OptimConfig, build_optimizer, cosine_with_warmup
from .callbacks import BadSampleReport, ConfigAtTrainStart
from .metrics import MetricsRecorder, write_metrics

__all__ = ["BadSampleReport", "ConfigAtTrainStart", "OptimConfig", "MetricsRecorder", "build_optimizer", "cosine_with_warmup", "write_metrics"]

"""The evaluation's configuration as one typed value.

``conf/eval.yaml`` is where every option and its default live (with its comment); :class:`EvalConfig`
declares the same keys with their types and no defaults, so nothing here can drift from the file.
:meth:`EvalConfig.from_cfg` checks the Hydra config against the dataclass (OmegaConf structured
config: a wrong type or a missing key fails before anything runs) and returns the typed value the
rest of :mod:`evaluation` reads.

The dataclass is not registered as a Hydra schema in ``conf/eval.yaml``'s defaults list on purpose:
the file then composes without importing :mod:`evaluation` first (tests, notebooks, the chunk
workers' saved ``eval_config.yaml``), and the saved config stays the file's own keys in its order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from omegaconf import DictConfig, OmegaConf

__all__ = ["EvalConfig"]


@dataclass(frozen=True)
class EvalConfig:
    """What ``python -m evaluation`` does; the meaning and default of each field are in
    ``conf/eval.yaml``.

    ``model`` is the ``conf/model`` node (kept as a ``DictConfig``: its ``build`` is instantiated by
    Hydra when the model is loaded); ``data`` maps a benchmark name to its file overrides;
    ``benchmarks`` is a list of names (a single name is accepted as well).
    """

    # what to evaluate
    model: Any
    path: Optional[str]
    adapter: Optional[str]
    use_merged: bool
    merge: bool
    dtype: Optional[str]
    attn_implementation: Optional[str]
    device: Optional[str]
    model_id: Optional[str]
    # which questions
    benchmarks: Any
    eval_root: Optional[str]
    limit: Optional[int]
    data: Any
    # how
    template: str
    tokenization: str
    image_aspect_ratio: str
    max_new_tokens: Optional[int]
    num_beams: Optional[int]
    batch_size: int
    num_workers: int
    # sharding
    num_chunks: int
    chunk_idx: Optional[int]
    devices: Any
    # steps and outputs
    generate: bool
    score: bool
    output_dir: str
    run_name: Optional[str]
    title: Optional[str]

    @classmethod
    def from_cfg(cls, cfg: DictConfig | Mapping[str, Any]) -> "EvalConfig":
        """The typed view of a composed ``conf/eval.yaml`` (interpolations resolved). Keys the
        evaluation does not read (``paths``, ``seed``...) are ignored; a missing key or a value of
        the wrong type raises ``ValueError``."""
        values = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in values]
        if missing:
            raise ValueError(f"the evaluation config has no {', '.join(missing)} (see conf/eval.yaml)")
        try:
            typed = OmegaConf.merge(OmegaConf.structured(cls), {n: values[n] for n in names})
        except Exception as e:  # omegaconf's ValidationError names the key and the expected type
            raise ValueError(f"evaluation config: {e}") from None
        return cls(**{n: typed[n] for n in names})

    @property
    def data_overrides(self) -> dict[str, Any]:
        """``{benchmark: its data.<name> node}`` (empty when ``data`` is not set)."""
        return dict(self.data or {})

"""The Lightning ``LightningDataModule`` of the LLaVA-1.5 data pipeline (configured by ``conf/data``).

Typical use (the training code)::

    processor = ...  # transformers LlavaProcessor of the model
    dm = hydra.utils.instantiate(cfg.data, processor=processor)
    trainer = L.Trainer(..., use_distributed_sampler=False)  # the sampler shards itself
    trainer.fit(model, datamodule=dm)

Resuming mid-epoch is automatic under Lightning (the train loader is stateful and the datamodule's
``state_dict`` is saved in checkpoints); outside Lightning use ``dm.state_dict()`` /
``dm.load_state_dict()`` before ``train_dataloader()``.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

import lightning as L
import numpy as np

from .collator import LlavaCollator
from .dataset import BadSampleCounter, LlavaDataset
from .errors import TooManyBadSamplesError
from .index import RecordIndex
from .loader import LlavaDataLoader
from .preprocess import LlavaPreprocessor
from .records import check_record
from .sampler import ModalityLengthGroupedBatchSampler

log = logging.getLogger(__name__)


class LlavaDataModule(L.LightningDataModule):
    """LLaVA-format records (mix665k / easy-vqa) -> LLaVA-1.5 training batches.

    Args:
        train_file: records JSON (array) or JSON lines.
        image_folder: root of the records' relative ``image`` paths.
        val_file: optional validation records; if ``None``, ``val_fraction`` of ``train_file`` is
            held out (deterministically from ``seed``). ``val_file`` wins when both are given.
        val_fraction: fraction held out for validation (0 = no validation loader).
        template: conversation template (``vicuna_v1`` for LLaVA-1.5 stage 2, ``plain`` for stage 1).
        model_max_length: maximum tokens per sample including the image tokens (2048).
        batch_size: per-device training batch (16 in LLaVA's LoRA script).
        val_batch_size: per-device validation batch (default ``batch_size``).
        num_workers: dataloader worker processes.
        seed: base seed of the data order and the validation split.
        on_bad_sample: ``"skip"`` (count per reason, log, drop) or ``"raise"``.
        max_bad_fraction: hard failure when more than this fraction of an epoch (or of the file's
            records, for structurally invalid ones) is bad.
        group_by_modality_length: LLaVA's modality-length grouped sampler; otherwise random batches.
        world_size, rank, grad_accum: overrides; by default read from the attached ``Trainer``
            (``world_size``, ``global_rank``, ``accumulate_grad_batches``), else 1, 0, 1.
        tokenization: ``"llava"`` (LLaVA ``tokenizer_image_token`` semantics) or ``"processor"``.
        image_aspect_ratio: ``"pad"`` (LLaVA-1.5) or ``"crop"``.
        max_image_pixels: images with more pixels are skipped as ``image_too_large`` (before decoding).
        image_symlinks_outside: allow image paths that resolve through a symlink outside ``image_folder``.
        image_cache_mb: per-process cache of preprocessed images (MB; 0: off), for data that asks several
            questions per image (easy-vqa); samples are bit-identical with or without it.
        max_train_samples, max_val_samples: optional seeded subsets (quick runs).
        pin_memory, persistent_workers, prefetch_factor, pad_to_multiple_of: loader options.
        processor: the model's ``LlavaProcessor`` (tokenizer + CLIP image processor); image size,
            patch size and extra tokens are read from it. Required before ``setup``.
    """

    def __init__(self, train_file: Optional[str] = None, image_folder: Optional[str] = None,
                 val_file: Optional[str] = None, val_fraction: float = 0.0, template: str = "vicuna_v1",
                 model_max_length: int = 2048, batch_size: int = 16, val_batch_size: Optional[int] = None,
                 num_workers: int = 4, seed: int = 42, on_bad_sample: str = "skip",
                 max_bad_fraction: float = 0.01, group_by_modality_length: bool = True,
                 world_size: Optional[int] = None, rank: Optional[int] = None,
                 grad_accum: Optional[int] = None,
                 tokenization: str = "llava", image_aspect_ratio: str = "pad",
                 max_image_pixels: Optional[int] = 40_000_000, image_symlinks_outside: bool = False,
                 image_cache_mb: float = 0,
                 max_train_samples: Optional[int] = None, max_val_samples: Optional[int] = None,
                 pin_memory: bool = False, persistent_workers: bool = False,
                 prefetch_factor: Optional[int] = None, pad_to_multiple_of: Optional[int] = None,
                 processor: Any = None):
        super().__init__()
        if on_bad_sample not in ("skip", "raise"):
            raise ValueError(f"on_bad_sample must be 'skip' or 'raise', got {on_bad_sample!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.train_file = train_file
        self.image_folder = image_folder
        self.val_file = val_file
        self.val_fraction = float(val_fraction)
        self.template = template
        self.model_max_length = int(model_max_length)
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.on_bad_sample = on_bad_sample
        self.max_bad_fraction = float(max_bad_fraction)
        self.group_by_modality_length = bool(group_by_modality_length)
        self.world_size, self.rank, self.grad_accum = world_size, rank, grad_accum
        self.tokenization = tokenization
        self.image_aspect_ratio = image_aspect_ratio
        self.max_image_pixels = None if max_image_pixels is None else int(max_image_pixels)
        self.image_symlinks_outside = bool(image_symlinks_outside)
        self.image_cache_mb = float(image_cache_mb)
        self.max_train_samples, self.max_val_samples = max_train_samples, max_val_samples
        self.pin_memory, self.persistent_workers = bool(pin_memory), bool(persistent_workers)
        self.prefetch_factor, self.pad_to_multiple_of = prefetch_factor, pad_to_multiple_of
        self.processor = processor
        self.train_dataset: Optional[LlavaDataset] = None
        self.val_dataset: Optional[LlavaDataset] = None
        self.index_stats: dict[str, Any] = {}
        self._train_loader: Optional[LlavaDataLoader] = None
        self._pending_state: Optional[dict] = None

    # ------------------------------------------------------------------ setup
    def setup(self, stage: Optional[str] = None) -> None:
        """Build the record indices, the train/val split and the datasets (idempotent)."""
        if self.train_dataset is not None:
            return
        if self.processor is None:
            raise ValueError("LlavaDataModule needs the model's processor: "
                             "hydra.utils.instantiate(cfg.data, processor=processor)")
        if not self.train_file:
            raise ValueError("LlavaDataModule: train_file is not set")
        preprocessor = self._make_preprocessor()
        train_index = self._build_index(self.train_file)
        if self.image_folder is not None and not os.path.isdir(self.image_folder) and train_index.has_image.any():
            raise FileNotFoundError(
                f"image_folder {self.image_folder} does not exist (or is not a folder), and "
                f"{int(train_index.has_image.sum())} records of {self.train_file} have images relative to it; "
                "set data.image_folder to the folder holding LLaVA's image layout (coco/, gqa/, ...)")
        val_index = None
        if self.val_file:
            val_index = self._build_index(self.val_file)
        else:
            train_index, val_index = self._split(train_index)
        train_index = self._limit(train_index, self.max_train_samples, 1)
        self.train_dataset = LlavaDataset(train_index, preprocessor, self.on_bad_sample,
                                          BadSampleCounter(self.num_workers))
        if val_index is not None and len(val_index):
            val_index = self._limit(val_index, self.max_val_samples, 2)
            self.val_dataset = LlavaDataset(val_index, preprocessor, self.on_bad_sample,
                                            BadSampleCounter(self.num_workers))
        log.info("data: %d train / %d val samples from %s (template %s, max length %d)",
                 len(self.train_dataset), len(self.val_dataset) if self.val_dataset else 0, self.train_file,
                 self.template, self.model_max_length)

    def _make_preprocessor(self):
        """record -> sample (``__call__(rec, position, path)``), built from ``self.processor``."""
        return LlavaPreprocessor.from_processor(
            self.processor, template=self.template, model_max_length=self.model_max_length,
            tokenization=self.tokenization, image_folder=self.image_folder,
            image_aspect_ratio=self.image_aspect_ratio, max_image_pixels=self.max_image_pixels,
            symlinks_outside=self.image_symlinks_outside, image_cache_mb=self.image_cache_mb)

    def _split(self, index: RecordIndex) -> tuple[RecordIndex, Optional[RecordIndex]]:
        """``(train, val)``: ``val_fraction`` of ``index`` held out, deterministically from ``seed``."""
        if not (self.val_fraction > 0 and len(index) > 1):
            return index, None
        n_val = min(max(1, round(self.val_fraction * len(index))), len(index) - 1)
        return self._split_n(index, n_val)

    def _split_n(self, index: RecordIndex, n_val: int) -> tuple[RecordIndex, RecordIndex]:
        rng = np.random.default_rng([self.seed, 0x7A1])
        perm = rng.permutation(len(index))
        return index.subset(np.sort(perm[n_val:])), index.subset(np.sort(perm[:n_val]))

    #: ``check(record, position, path) -> length`` of the records format (raises ``BadSample``)
    record_check = staticmethod(check_record)

    def _build_index(self, path: str) -> RecordIndex:
        index = RecordIndex.build(path, on_bad_sample=self.on_bad_sample, check=self.record_check)
        st = index.stats
        self.index_stats[str(path)] = {"total": st.total, "kept": st.kept,
                                       "bad_by_reason": dict(st.bad_counts),
                                       "build_seconds": round(st.build_seconds, 3)}
        if st.bad:
            log.warning("%s: %d of %d records left out %s; e.g. %s", path, st.bad, st.total, st.bad_counts,
                        [m for ms in st.bad_examples.values() for m in ms[:1]])
        if st.bad > self.max_bad_fraction * max(st.total, 1):
            raise TooManyBadSamplesError(
                f"{path}: {st.bad} of {st.total} records are invalid ({st.bad / max(st.total, 1):.2%} > "
                f"max_bad_fraction={self.max_bad_fraction:.2%}): {st.bad_counts}; "
                f"examples: {st.bad_examples}")
        if st.kept == 0:
            raise ValueError(f"{path}: no usable records")
        return index

    def _limit(self, index: RecordIndex, n: Optional[int], salt: int) -> RecordIndex:
        if n is None or n >= len(index):
            return index
        rng = np.random.default_rng([self.seed, salt])
        return index.subset(np.sort(rng.permutation(len(index))[: int(n)]))

    # ------------------------------------------------------------------ loaders
    def _parallel(self) -> tuple[int, int, int]:
        trainer = getattr(self, "trainer", None)
        world = self.world_size if self.world_size is not None else (trainer.world_size if trainer else 1)
        rank = self.rank if self.rank is not None else (trainer.global_rank if trainer else 0)
        accum = self.grad_accum if self.grad_accum is not None else (
            int(trainer.accumulate_grad_batches) if trainer else 1)
        if trainer is not None and world > 1:
            conn = getattr(trainer, "_accelerator_connector", None)
            if conn is not None and getattr(conn, "use_distributed_sampler", False):
                raise ValueError("LlavaDataModule shards its own batches (LLaVA's grouped sampler): "
                                 "create the Trainer with use_distributed_sampler=False")
        return int(world), int(rank), int(accum)

    def _loader_kwargs(self) -> dict:
        tokenizer = getattr(self.processor, "tokenizer", self.processor)  # a causal LM's processor is its tokenizer
        kw: dict[str, Any] = {"collate_fn": LlavaCollator(tokenizer.pad_token_id,
                                                          self.pad_to_multiple_of),
                              "num_workers": self.num_workers, "pin_memory": self.pin_memory}
        if self.num_workers > 0:
            kw["persistent_workers"] = self.persistent_workers
            if self.prefetch_factor is not None:
                kw["prefetch_factor"] = self.prefetch_factor
        return kw

    def train_dataloader(self) -> LlavaDataLoader:
        """The training loader: LLaVA's grouped batches for this rank, stateful, bad-sample checked."""
        self.setup("fit")
        world, rank, accum = self._parallel()
        sampler = ModalityLengthGroupedBatchSampler(
            self.train_dataset.modality_lengths, self.batch_size, world_size=world, rank=rank,
            grad_accum=accum, seed=self.seed, mode="modality" if self.group_by_modality_length else "random")
        loader = LlavaDataLoader(self.train_dataset, sampler, counter=self.train_dataset.counter,
                                 max_bad_fraction=self.max_bad_fraction, name="train",
                                 **self._loader_kwargs())
        if self._pending_state is not None:
            loader.load_state_dict(self._pending_state)
            self._pending_state = None
        self._train_loader = loader
        return loader

    def val_dataloader(self):
        """The validation loader (file order, sharded across ranks), or ``[]`` without validation data."""
        self.setup("validate")
        if self.val_dataset is None:
            return []
        world, rank, _ = self._parallel()
        sampler = ModalityLengthGroupedBatchSampler(self.val_dataset.modality_lengths, self.val_batch_size,
                                                    world_size=world, rank=rank, seed=self.seed,
                                                    mode="sequential")
        return LlavaDataLoader(self.val_dataset, sampler, counter=self.val_dataset.counter,
                               max_bad_fraction=self.max_bad_fraction, name="val", **self._loader_kwargs())

    # ------------------------------------------------------------------ reports / resume
    def bad_sample_reports(self) -> list[dict]:
        """Per-epoch reports of the training loader (``seen``, ``bad``, ``bad_by_reason``, ...)."""
        return list(self._train_loader.reports) if self._train_loader is not None else []

    def state_dict(self) -> dict:
        """``{"train": {"epoch", "batches_consumed", ...}}`` -- the training position (Lightning saves it)."""
        if self._train_loader is not None:
            return {"train": self._train_loader.state_dict()}
        return {"train": self._pending_state} if self._pending_state else {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the training position; applied to the current or the next train loader."""
        train = (state_dict or {}).get("train")
        if not train:
            return
        if self._train_loader is not None:
            self._train_loader.load_state_dict(train)
        else:
            self._pending_state = dict(train)

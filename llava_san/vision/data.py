"""Image classification data: the VTAB-1k folder layout (and FGVC lists in the same layout), and two
sets that ship inside packages for offline runs (scikit-learn's digits, easy-vqa's shapes/colours).

Every source yields :class:`LabelledImages`: image references, integer labels and class names. The
datamodule (:class:`ClassificationDataModule`) turns them into normalised tensors with one transform
(resize the shorter side, bicubic, then centre crop: SSF's ``--direct-resize`` VTAB preprocessing; no
augmentation, as SSF's VTAB recipe).

**VTAB-1k** (the layout of the VPT/NOAH/SSF code): ``<root>/<task>/`` holds the image files and four
list files, ``train800.txt``, ``val200.txt``, ``train800val200.txt`` and ``test.txt``, one
``<relative image path> <integer label>`` per line. Tune on ``train800``/``val200``, train the final
model on ``train800val200``, report top-1 on ``test``. A missing list or image, a malformed line or a
label outside ``[0, num_classes)`` raises an error naming the file and line before any training.

**digits** (``sklearn.datasets.load_digits``, 1,797 grey 8 × 8 images, 10 classes) as a mini VTAB-1k:
a fixed permutation (seed 0, independent of the run's seed) gives 800 train / 200 val / 797 test.
**easyvqa_shape** / **easyvqa_colour**: one label per easy-vqa image (3 shapes / 8 colours), read off its
questions (a shape or colour answer, or a yes/no answer to a question naming one shape or colour, e.g.
"does the image not contain a circle?");
the train images whose label the questions do not determine are left out of the set (counted in
``LabelledImages.excluded``), the wheel's 4,000 train images split 3,200 / 800 into train / val, its
1,000 test images are the test split.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image

SPLITS = ("train", "val", "trainval", "test")
#: VTAB-1k list file per split (``train``: the 800 for tuning; ``trainval``: all 1,000 for the final run)
VTAB_LISTS = {"train": "train800.txt", "val": "val200.txt", "trainval": "train800val200.txt", "test": "test.txt"}
_SHAPES = ("circle", "rectangle", "triangle")
_COLOURS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
#: VTAB-1k task folders (the VPT/NOAH release's names) -> class count
VTAB_CLASSES = {
    "cifar": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37, "svhn": 10,
    "sun397": 397, "patch_camelyon": 2, "eurosat": 10, "resisc45": 45, "diabetic_retinopathy": 5,
    "clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4, "dsprites_loc": 16, "dsprites_ori": 16,
    "smallnorb_azi": 18, "smallnorb_ele": 9,
}
#: VTAB-1k groups (the paper's Table 1 "Mean Acc." is the mean of the three group means)
VTAB_GROUPS = {
    "natural": ("cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"),
    "specialized": ("patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"),
    "structured": ("clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori", "smallnorb_azi",
                   "smallnorb_ele"),
}
_NEGATION = re.compile(r"\b(?:not|no)\b")


@dataclass
class LabelledImages:
    """Images with labels: ``images[i]`` is a file path or a ``(H, W)``/``(H, W, 3)`` uint8 array."""

    images: list[Any]
    labels: list[int]
    classes: list[str]
    source: str
    excluded: int = 0
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)


# ------------------------------------------------------------------------------------------------
# sources
# ------------------------------------------------------------------------------------------------
def vtab_split(root: str | Path, task: str, split: str, num_classes: Optional[int] = None) -> LabelledImages:
    """One split of a VTAB-1k task folder ``<root>/<task>`` (module doc), every line checked."""
    if split not in VTAB_LISTS:
        raise ValueError(f"split must be one of {list(VTAB_LISTS)}, got {split!r}")
    folder = Path(root) / task
    if num_classes is None:
        num_classes = VTAB_CLASSES.get(task)
    listing = folder / VTAB_LISTS[split]
    if not listing.is_file():
        present = sorted(p.name for p in folder.glob("*.txt")) if folder.is_dir() else []
        raise FileNotFoundError(
            f"{listing} is missing (list files in {folder}: {present or 'none'}); data.root must be the "
            f"VTAB-1k folder holding one folder per task with train800.txt, val200.txt, train800val200.txt "
            f"and test.txt")
    images, labels = [], []
    for lineno, line in enumerate(listing.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
            raise ValueError(f"{listing}:{lineno}: expected '<image path> <integer label>', got {line!r}")
        path, label = folder / parts[0].strip(), int(parts[1])
        if label < 0 or (num_classes is not None and label >= num_classes):
            raise ValueError(f"{listing}:{lineno}: label {label} is outside [0, {num_classes}) "
                             f"(data.num_classes); fix the list or the class count")
        if not path.is_file():
            raise FileNotFoundError(f"{listing}:{lineno}: image {path} does not exist")
        images.append(str(path))
        labels.append(label)
    if not labels:
        raise ValueError(f"{listing} lists no images")
    n = num_classes if num_classes is not None else max(labels) + 1
    return LabelledImages(images, labels, [str(i) for i in range(n)], f"vtab:{task}/{split}")


def digits_split(split: str) -> LabelledImages:
    """scikit-learn's bundled digits as a mini VTAB-1k (800 / 200 / 797; module doc)."""
    from sklearn.datasets import load_digits

    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    parts = {"train": order[:800], "val": order[800:1000], "trainval": order[:1000], "test": order[1000:]}
    idx = parts[split]
    # values 0..16 -> 0..255 grey levels
    pixels = np.clip(np.rint(digits.images[idx] * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return LabelledImages(list(pixels), [int(t) for t in digits.target[idx]], [str(c) for c in range(10)],
                          f"digits/{split}")


def _easyvqa_labels(kind: str, train: bool) -> tuple[dict[int, int], int]:
    """easy-vqa image id -> label (``kind``: shape or colour) from its questions, and how many images
    the questions leave undetermined."""
    import easy_vqa

    questions, answers, ids = (easy_vqa.get_train_questions() if train else easy_vqa.get_test_questions())
    classes, others = (_SHAPES, _COLOURS) if kind == "shape" else (_COLOURS, _SHAPES)
    known: dict[int, set[str]] = {}
    ruled_out: dict[int, set[str]] = {}
    for q, a, i in zip(questions, answers, ids):
        q, a = q.strip().lower().rstrip("?"), a.strip().lower()
        if a in classes:  # "what is the blue shape?" -> "circle"
            known.setdefault(i, set()).add(a)
        elif a in ("yes", "no"):
            # "does the image (not) contain a circle?", "is the shape (not) blue?": exactly one word of
            # this kind and none of the other kind (a "no" to "is there a red circle?" says nothing)
            words = set(re.findall(r"[a-z]+", q))
            named = [c for c in classes if c in words]
            if len(named) == 1 and not words & set(others):
                present = (a == "yes") != bool(_NEGATION.search(q))
                (known if present else ruled_out).setdefault(i, set()).add(named[0])
    labels, undetermined = {}, 0
    for i in sorted(set(ids)):
        if len(known.get(i, set())) > 1 or known.get(i, set()) & ruled_out.get(i, set()):
            raise ValueError(f"easy-vqa image {i}: its questions contradict each other about its {kind} "
                             f"({sorted(known.get(i, set()))} present, {sorted(ruled_out.get(i, set()))} absent)")
        candidates = known.get(i, set()) or (set(classes) - ruled_out.get(i, set()) if i in ruled_out else set())
        if len(candidates) == 1:
            labels[i] = classes.index(next(iter(candidates)))
        else:
            undetermined += 1
    return labels, undetermined


def easyvqa_split(kind: str, split: str) -> LabelledImages:
    """easy-vqa images labelled by shape or colour (module doc): train / val from the wheel's train
    images (first 3,200 ids / the rest), test from its test images."""
    import easy_vqa

    if kind not in ("shape", "colour"):
        raise ValueError(f"easy-vqa classification kind must be 'shape' or 'colour', got {kind!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    train = split != "test"
    labels, undetermined = _easyvqa_labels(kind, train)
    paths = easy_vqa.get_train_image_paths() if train else easy_vqa.get_test_image_paths()
    ids = sorted(labels)
    if split == "train":
        ids = [i for i in ids if i < 3200]
    elif split == "val":
        ids = [i for i in ids if i >= 3200]
    classes = list(_SHAPES if kind == "shape" else _COLOURS)
    note = f"{undetermined} images whose {kind} the questions do not determine are not in the set"
    return LabelledImages([paths[i] for i in ids], [labels[i] for i in ids], classes,
                          f"easyvqa_{kind}/{split}", excluded=undetermined, notes=[note])


def load_split(source: str, split: str, root: Optional[str] = None, task: Optional[str] = None,
               num_classes: Optional[int] = None) -> LabelledImages:
    """``source``: ``vtab`` (needs ``root`` and ``task``), ``digits``, ``easyvqa_shape`` or ``easyvqa_colour``."""
    if source == "vtab":
        if not root or not task:
            raise ValueError("data.source=vtab needs data.root=<VTAB-1k folder> and data.task=<task folder name>")
        return vtab_split(root, task, split, num_classes)
    if source == "digits":
        return digits_split(split)
    if source in ("easyvqa_shape", "easyvqa_colour"):
        return easyvqa_split(source.split("_", 1)[1], split)
    raise ValueError(f"unknown data.source {source!r}: vtab, digits, easyvqa_shape or easyvqa_colour")


# ------------------------------------------------------------------------------------------------
# pixels
# ------------------------------------------------------------------------------------------------
class ImageTransform:
    """PIL/array image -> normalised ``(3, size, size)`` float tensor: shorter side to ``size`` (bicubic),
    centre crop, scale to [0, 1], ``(x - mean) / std`` per channel. IN-21k ViTs: mean = std = 0.5; MAE
    and CLIP use their own (``conf/model/*.yaml``). (A plain class, not a dataclass: Hydra would turn a
    dataclass argument into a config node.)"""

    def __init__(self, size: int = 224, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5)) -> None:
        self.size, self.mean, self.std = int(size), tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def __repr__(self) -> str:
        return f"ImageTransform(size={self.size}, mean={self.mean}, std={self.std})"

    def __call__(self, image: Any) -> torch.Tensor:
        if isinstance(image, (str, Path)):
            try:
                with Image.open(image) as f:
                    image = f.convert("RGB")
            except (OSError, ValueError) as e:
                raise ValueError(f"image {image} cannot be read ({e}); replace or remove it from its list") from None
        elif isinstance(image, np.ndarray):
            image = Image.fromarray(image).convert("RGB")
        else:
            image = image.convert("RGB")
        w, h = image.size
        scale = self.size / min(w, h)
        image = image.resize((max(self.size, round(w * scale)), max(self.size, round(h * scale))),
                             Image.Resampling.BICUBIC)
        w, h = image.size
        left, top = (w - self.size) // 2, (h - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return (x - mean) / std


class ClassificationDataset(torch.utils.data.Dataset):
    """``(pixels, label)`` pairs of a :class:`LabelledImages` through an :class:`ImageTransform`."""

    def __init__(self, data: LabelledImages, transform: ImageTransform) -> None:
        self.data, self.transform = data, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"pixel_values": self.transform(self.data.images[i]), "labels": self.data.labels[i], "index": i}


__all__ = ["ClassificationDataset", "ImageTransform", "LabelledImages", "SPLITS", "VTAB_CLASSES", "VTAB_GROUPS",
           "VTAB_LISTS", "digits_split",
           "easyvqa_split", "load_split", "vtab_split"]

"""The recipe interface and the registry from a folder manifest's ``kind`` to its recipe class."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Optional

from torch import nn

from ..adapter_io import MANIFEST, check_compatible, read_manifest
from ..san_config import SanConfig

_REGISTRY: dict[str, type["AdapterRecipe"]] = {}


class AdapterRecipe:
    """What a run trains beside the frozen base, and how it is saved and loaded (see the package doc).

    Subclasses set ``kinds`` (the manifest kinds their folders carry, each owned by one recipe) and are
    registered when defined.
    """

    #: manifest kinds of the folders this recipe writes and reads
    kinds: ClassVar[tuple[str, ...]] = ()
    #: SAN options, when the recipe adds SAN (γ statistics are logged then)
    san: Optional[SanConfig] = None
    #: how the base was built (a run's ``model.build`` config, set by ``train/run.py``): recorded in the
    #: saved folder's manifest and model card, so the folder says which base it belongs to
    base_model: Optional[dict] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for kind in cls.kinds:
            owner = _REGISTRY.get(kind)
            if owner is not None and owner.__qualname__ != cls.__qualname__:
                raise ValueError(f"adapter folder kind {kind!r} belongs to {owner.__name__} already")
            _REGISTRY[kind] = cls

    def apply(self, model: nn.Module) -> nn.Module:
        """Set what trains on a freshly built base ``model`` (frozen or not, adapters added); returns the
        model to train (``model`` itself or a wrapper of it)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Plain data that identifies the recipe in a checkpoint (a resume with another recipe is refused)."""
        raise NotImplementedError

    def save(self, model: nn.Module, folder: str | os.PathLike) -> Path:
        """Write what ``model`` (from :meth:`apply`, trained) trained to ``folder``, atomically; with a
        manifest whose ``kind`` is one of :attr:`kinds`. Call on one rank, with the tensors gathered."""
        raise NotImplementedError

    @classmethod
    def load(cls, model: nn.Module, folder: str | os.PathLike, is_trainable: bool = False) -> nn.Module:
        """Rebuild the trained model from a fresh base ``model`` and a folder of one of :attr:`kinds`."""
        raise NotImplementedError

    @classmethod
    def check(cls, model: nn.Module, folder: str | os.PathLike) -> None:
        """Raise ``ValueError`` when ``folder`` was trained on another base than ``model`` (the default:
        the LLaVA/LLaMA fingerprint of :func:`~llava_san.peft.adapter_io.check_compatible`)."""
        check_compatible(model, folder)

    @classmethod
    def merge(cls, model: nn.Module) -> nn.Module:
        """The plain transformers model computing ``model``'s eval output (``model`` may be consumed).
        The default: ``model`` itself (nothing to fold)."""
        return model


def registered_kinds() -> dict[str, type[AdapterRecipe]]:
    """Manifest kind → recipe class, for every recipe defined so far."""
    return dict(_REGISTRY)


def recipe_for_folder(folder: str | os.PathLike) -> type[AdapterRecipe]:
    """The recipe class that loads ``folder``, from its manifest's ``kind`` (folders written before kinds
    existed are LoRA/DoRA adapters)."""
    folder = Path(folder)
    kind = read_manifest(folder).get("kind", "adapter")
    try:
        return _REGISTRY[kind]
    except KeyError:
        raise ValueError(f"{folder / MANIFEST}: unknown kind {kind!r} (known: {sorted(_REGISTRY)})") from None


def apply_adapter_folder(model: nn.Module, directory: str | os.PathLike, merge: bool = True) -> nn.Module:
    """A training run's ``adapter/`` folder onto a fresh base ``model``, for inference or export.

    The folder's recipe (its manifest's ``kind``) loads it; with ``merge`` its result is folded into a
    plain transformers model (:meth:`AdapterRecipe.merge`: LoRA/DoRA and SAN folded into the weights).
    """
    directory = Path(directory)
    if not (directory / MANIFEST).is_file():
        raise FileNotFoundError(
            f"adapter folder {directory} has no {MANIFEST}: it is incomplete or was not written by llava-san "
            f"(its files: {sorted(p.name for p in directory.iterdir()) if directory.is_dir() else 'none'}); "
            "nothing is loaded from it")
    recipe = recipe_for_folder(directory)
    recipe.check(model, directory)
    loaded = recipe.load(model, directory)
    return recipe.merge(loaded) if merge else loaded


__all__ = ["AdapterRecipe", "apply_adapter_folder", "read_manifest", "recipe_for_folder", "registered_kinds"]

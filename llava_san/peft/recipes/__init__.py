"""Adapter recipes: what a run trains beside the frozen base, one object chosen by the ``peft`` config group.

A recipe is the one seam between "which adapter" and the rest of llava-san. ``conf/peft/<name>.yaml``
names it with ``_target_``; ``train/run.py`` instantiates it and hands it to
:class:`~llava_san.module.LlavaSanModule`, which calls :meth:`AdapterRecipe.apply` on the freshly built
base and :meth:`AdapterRecipe.describe` for its checkpoints; :mod:`llava_san.checkpoint` saves and exports
through :meth:`AdapterRecipe.save` and :meth:`AdapterRecipe.merge`; and a saved folder is loaded by the
recipe its manifest's ``kind`` names (:func:`recipe_for_folder`, :func:`apply_adapter_folder`, which
evaluation uses).

Recipes here: :class:`NoAdapter` (``peft=none``: the projector only), :class:`FullFinetune`
(``peft=full``), :class:`LoraRecipe` (``peft=lora|dora|san_lora|san_dora``: peft LoRA/DoRA, optionally
with SAN).

Adding a host method (e.g. SAN on SSF) takes one new file and one YAML, nothing else:

1. ``llava_san/peft/recipes/ssf.py``: ``class SsfRecipe(AdapterRecipe)`` with ``kinds = ("ssf",)`` (the
   manifest kind its folders carry; subclassing registers it) and ``apply``, ``describe``, ``save``,
   ``load`` (a classmethod) and, if it changes the weights' arithmetic, ``merge``. Every module in this
   package is imported with the package, so the class is registered wherever a folder is loaded.
2. ``conf/peft/san_ssf.yaml``: ``_target_: llava_san.peft.recipes.ssf.SsfRecipe`` and its fields
   (e.g. ``san:`` a :class:`~llava_san.peft.SanConfig` node, as ``san_lora.yaml`` has).
"""
import importlib
import pkgutil

from .base import AdapterRecipe, apply_adapter_folder, read_manifest, recipe_for_folder, registered_kinds
from .lora import LoraRecipe
from .weights import FullFinetune, NoAdapter

# import every recipe module of this package, so each recipe class is registered (see the doc above)
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "AdapterRecipe",
    "FullFinetune",
    "LoraRecipe",
    "NoAdapter",
    "apply_adapter_folder",
    "read_manifest",
    "recipe_for_folder",
    "registered_kinds",
]

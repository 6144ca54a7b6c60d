"""Make ``import torchvision`` work on a CPU-only torch build whose torchvision wheel was built for CUDA.

PyPI serves one torchvision wheel per release for Linux, linked against the CUDA build of torch
(``libtorch_cuda.so``). Beside a CPU-only torch (``torch==2.13.0+cpu``, as on this project's CPU
machines) its compiled operators (``torchvision/_C.so``) cannot load. torchvision's Python code copes
with that, except one step: ``torchvision._meta_registrations`` registers fake kernels for
``torchvision::nms`` and ``torchvision::qnms`` without checking that the operators exist, so the import
raises ``RuntimeError: operator torchvision::nms does not exist``. transformers then fails on
``CLIPImageProcessor`` (it picks the torchvision processor whenever torchvision is installed) and timm
cannot import at all (it needs ``torchvision.ops.misc`` and ``torchvision.transforms``).

:func:`ensure_torchvision_importable` declares the schemas of those two operators when, and only when,
the compiled library cannot load. Nothing is implemented: calling ``torchvision.ops.nms`` then raises
torch's "no kernel" error, as it should on such a build. llava-san uses torchvision only through
timm's layers and transforms (pure Python). On a machine whose torchvision loads (any CUDA machine, or
a matching CPU build) this does nothing.

It must run before the first ``import torchvision`` of the process, and lightning (through torchmetrics)
imports torchvision as soon as it is imported. So it runs from an import hook
(:class:`_BeforeTorchvision`, on ``sys.meta_path``) at the first ``import torchvision``; installing the
hook costs nothing (torch is not imported until then). ``llava_san/__init__`` installs it, and on a
machine that needs it ``scripts/bootstrap.sh`` also copies this file (it imports only the standard
library until the hook fires) into the environment's ``site-packages`` as a top-level module, with a
one-line ``.pth`` file that installs the hook at interpreter start, so a process that imports lightning
or transformers before llava_san works too::

    python -c "from llava_san.torchvision_compat import main; main(['--install'])"    # or --uninstall
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

#: the operators torchvision's import registers fake kernels for without checking they exist
_UNGUARDED_OPS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # the torch.library.Library holding the declared schemas (kept alive for the process)


def compiled_ops_load() -> bool | None:
    """Whether torchvision's compiled operators load in this process: ``None`` if torchvision is not
    installed (or imported already, when nothing can be changed any more)."""
    if "torchvision" in sys.modules:
        return None
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    import torch

    folder = Path(next(iter(spec.submodule_search_locations)))
    libraries = sorted(folder.glob("_C*.so")) + sorted(folder.glob("_C*.pyd"))
    if not libraries:
        return False
    try:
        torch.ops.load_library(str(libraries[0]))
    except (OSError, RuntimeError):
        return False
    return True


def ensure_torchvision_importable() -> bool:
    """Declare ``torchvision::nms``/``qnms`` when torchvision is installed but its compiled operators
    cannot load (see the module doc). Returns True when the schemas were declared by this call."""
    global _library
    if _library is not None or compiled_ops_load() is not False:
        return False
    import torch

    try:  # declared already (by the start-up copy of this module, or by another library)
        torch.ops.torchvision.nms
        return False
    except (AttributeError, RuntimeError):
        pass
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _UNGUARDED_OPS:
        _library.define(schema)
    return True


class _BeforeTorchvision:
    """A ``sys.meta_path`` finder that runs :func:`ensure_torchvision_importable` on the first
    ``import torchvision`` and then steps aside (it never finds a module itself)."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path[:] = [f for f in sys.meta_path if f is not cls]
            ensure_torchvision_importable()
        return None


def install_import_hook() -> None:
    """Put :class:`_BeforeTorchvision` first on ``sys.meta_path`` (what the ``.pth`` file calls)."""
    if "torchvision" not in sys.modules and _BeforeTorchvision not in sys.meta_path:
        sys.meta_path.insert(0, _BeforeTorchvision)


PTH_NAME = "llava_san_torchvision_compat.pth"
#: the start-up copy of this file (a top-level module: importing it must not import the llava_san package)
STARTUP_MODULE = "_llava_san_torchvision_compat"


def _site_packages() -> Path:
    import sysconfig

    return Path(sysconfig.get_paths()["purelib"])


def main(argv: list[str] | None = None) -> int:
    """``main([--install|--uninstall])``: report, or add/remove the
    ``.pth`` hook (added only where torchvision is installed and its compiled operators cannot load)."""
    import argparse

    parser = argparse.ArgumentParser(prog="llava_san.torchvision_compat", description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--install", action="store_true", help="add the .pth hook if this environment needs it")
    group.add_argument("--uninstall", action="store_true", help="remove the .pth hook")
    args = parser.parse_args(argv)
    pth = _site_packages() / PTH_NAME
    module = _site_packages() / f"{STARTUP_MODULE}.py"
    state = compiled_ops_load()
    if args.uninstall:
        pth.unlink(missing_ok=True)
        module.unlink(missing_ok=True)
        print(f"removed {pth} and {module.name}")
    elif args.install and state is False:
        module.write_text(Path(__file__).read_text())
        pth.write_text(f"import {STARTUP_MODULE}; {STARTUP_MODULE}.install_import_hook()\n")
        print(f"wrote {pth} and {module.name}: torchvision's compiled operators cannot load beside torch here")
    else:
        status = {None: "torchvision is not installed", True: "torchvision's compiled operators load",
                  False: "torchvision's compiled operators cannot load"}[state]
        print(f"{status}; hook {'present' if pth.is_file() else 'absent'} ({pth})")
    return 0


__all__ = ["compiled_ops_load", "ensure_torchvision_importable", "install_import_hook", "main"]

"""llava-san: SAN parameter-efficient fine-tuning for LLaVA-1.5, LLaMA and vision transformers."""
from .torchvision_compat import install_import_hook

# a CUDA-built torchvision beside a CPU-only torch: see llava_san/torchvision_compat.py
# (installing the hook costs nothing; it acts only on the first import of torchvision)
install_import_hook()

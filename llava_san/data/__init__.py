"""The LLaVA-1.5 data pipeline: mix665k-format records -> training batches, exactly as LLaVA prepares them.

Modules (one job each):

* :mod:`.records` -- record validation and LLaVA's turn normalisation;
* :mod:`.index` -- numpy-packed index of a records file (no per-record Python objects);
* :mod:`.images` -- :func:`load_image`, :func:`expand2square`, CLIP preprocessing;
* :mod:`.tokenize` -- template pieces -> ``input_ids``/``labels`` that cannot drift;
* :mod:`.preprocess` -- one record -> one sample (truncation, image);
* :mod:`.dataset`, :mod:`.collator`, :mod:`.sampler`, :mod:`.loader` -- torch plumbing;
* :mod:`.datamodule` -- the Lightning ``LlavaDataModule``; :mod:`.easyvqa` -- the embedded default data.
"""
from .collator import LlavaCollator
from .dataset import BadSampleCounter, LlavaDataset
from .errors import REASONS, BadSample, BadSampleError, TooManyBadSamplesError
from .images import ImageLoadError, background_color, expand2square, load_image, process_image
from .index import RecordIndex
from .loader import LlavaDataLoader
from .preprocess import LlavaPreprocessor
from .sampler import ModalityLengthGroupedBatchSampler, split_to_even_chunks
from .tokenize import IGNORE_INDEX, PieceEncoder, image_token_count, tokenize_prompt



def __getattr__(name):
    # Lazy: importing Lightning is only needed for the datamodule (evaluation code imports the rest).
    if name == "LlavaDataModule":
        from .datamodule import LlavaDataModule

        return LlavaDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "IGNORE_INDEX",
    "REASONS",
    "BadSample",
    "BadSampleCounter",
    "BadSampleError",
    "ImageLoadError",
    "LlavaCollator",
    "LlavaDataLoader",
    "LlavaDataModule",
    "LlavaDataset",
    "LlavaPreprocessor",
    "ModalityLengthGroupedBatchSampler",
    "PieceEncoder",
    "RecordIndex",
    "TooManyBadSamplesError",
    "background_color",
    "expand2square",
    "image_token_count",
    "load_image",
    "process_image",
    "split_to_even_chunks",
    "tokenize_prompt",
]

"""Fixtures of the inference tests: the shared trained run (tests/conftest.py), loaded once per module."""
import numpy as np
import pytest
from PIL import Image

from llava_san.inference import Assistant


@pytest.fixture(scope="module")
def assistant(trained_run):
    """The `trained_run` folder loaded as chat, predict and serve load it (adapter merged, CPU)."""
    return Assistant.load(trained_run, device="cpu")


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    """A non-square RGB image (padding to a square matters) saved as PNG."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("picture") / "picture.png"
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(path)
    return path

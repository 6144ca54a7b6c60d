"""Fixtures of the inference tests: the shared trained run (tests/conftest.py), loaded once per module."""
import pytest

from llava_san.inference import Assistant


@pytest.fixture(scope="module")
def assistant(trained_run):
    """The `trained_run` folder loaded as chat, predict and serve load it (adapter merged, CPU)."""
    return Assistant.load(trained_run, device="cpu")

"""Shared test setup: offline hub, small thread counts, deterministic seeds."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_llava():
    """A factory for fresh tiny LLaVA models (random, offline) and their processor."""
    from llava_san.models import build_tiny_llava

    def make(seed: int = 0, **spec_kwargs):
        from llava_san.models import TinyLlavaSpec

        return build_tiny_llava(TinyLlavaSpec(**spec_kwargs), seed=seed)

    return make

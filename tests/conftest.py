"""Shared test setup: offline hub, small thread counts, deterministic seeds; one short trained run."""
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402
import torch  # noqa: E402

import llava_san  # noqa: E402,F401  (first: makes a CUDA-built torchvision importable beside a CPU torch)

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


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A real short `python -m train` run folder (tiny SAN-DoRA on synthetic data, 2 steps, at a
    learning rate where the adapter changes the answers without collapsing them to one token) with
    `adapter/` and the `export=true` folder `merged/`. Shared read-only: copy it before changing it."""
    from hydra import compose, initialize_config_dir

    from train.run import run as train_run

    out = tmp_path_factory.mktemp("train") / "run"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            f"paths.output_dir={out}", "data=synthetic", "trainer.accelerator=cpu", "evaluate=null",
            "callbacks.progress_bar.refresh_rate=0", "peft=san_dora", "trainer.max_steps=2", "optim.lr=0.01",
            "optim.projector_lr=0.01", "optim.warmup_ratio=0.0", "export=true"])
    train_run(cfg)
    return out

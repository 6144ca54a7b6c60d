"""DeepSpeed ZeRO-3 with ``zero_init=True``: the model is partitioned while ``configure_model`` builds it.

* Each builder (tiny, Vicuna + CLIP + projector, llava-hf in both on-disk layouts) run by two ranks with
  a live ``HfDeepSpeedConfig`` (what ``DeepSpeedStrategy(zero_init=True)`` provides) returns every
  parameter partitioned (each rank holds half), equal once gathered to the same build without DeepSpeed
  (same seed / checkpoint), the new token rows the mean of the old ones, and the RNG where the plain
  build leaves it (so the adapters initialised next are the same too).
* ``run(cfg)`` with ``strategy=deepspeed_zero3_cpu strategy.zero_init=true`` builds the frozen model
  partitioned and trains the same SAN-DoRA adapter as ``zero_init=false``.

The two ranks run this file as a script (``--worker``): a gloo group of two needs two processes.
"""
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported: a GPU machine would pick CUDA

import json  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

pytest.importorskip("deepspeed")

from deepspeed_helpers import ROOT, compose_train as _cfg  # noqa: E402
BUILDERS = ["tiny", "parts", "parts_random_projector", "llava_hf", "llava_hf_hub"]
DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "PL_GLOBAL_SEED")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------
# the builders, on two ranks
# ----------------------------------------------------------------------------------------------
def _builders(ckpts: dict) -> dict:
    from llava_san.models import build_llava_from_parts, build_tiny, load_llava_hf

    return {
        "tiny": lambda: build_tiny(seed=5),
        "parts": lambda: build_llava_from_parts(ckpts["vicuna"], ckpts["clip"], ckpts["mm_projector"],
                                                dtype="float32"),
        # the projector from torch's RNG: equal only if loading left the RNG as the plain build does
        "parts_random_projector": lambda: build_llava_from_parts(ckpts["vicuna"], ckpts["clip"], None,
                                                                 dtype="float32"),
        "llava_hf": lambda: load_llava_hf(ckpts["llava_hf"], dtype="float32"),
        "llava_hf_hub": lambda: load_llava_hf(ckpts["llava_hf_hub"], dtype="float32"),
    }


def _worker(root: Path) -> None:
    """One rank: build each model whole, then under ZeRO-3 construction; write what it found."""
    import deepspeed

    from llava_san.training.strategies import hf_deepspeed_config

    setup = json.loads((root / "setup.json").read_text())
    deepspeed.init_distributed(dist_backend="gloo")
    rank = deepspeed.comm.get_rank()
    result = {}
    for name, build in _builders(setup["ckpts"]).items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(1)
            whole = build()[0]
            rng_whole = torch.get_rng_state()
            torch.manual_seed(1)
            with hf_deepspeed_config(setup["config"]):
                zero = build()[0]
            rng_zero = torch.get_rng_state()
        ref = dict(whole.named_parameters())
        params = {}
        for n, p in zero.named_parameters():
            rec = {"ds": hasattr(p, "ds_id"), "local": p.numel(), "full": ref[n].numel(),
                   "partition": p.ds_tensor.numel() if hasattr(p, "ds_tensor") else None}
            with deepspeed.zero.GatheredParameters([p]):  # a collective: same order on every rank
                rec["equal"] = p.dtype == ref[n].dtype and torch.equal(p.data, ref[n].data)
            params[n] = rec
        buffers = dict(whole.named_buffers())
        mean_rows = None
        if name.startswith("parts"):  # <image> and <pad> rows of the embedding and lm_head: the mean
            old = setup["vicuna_vocab"]
            weights = [zero.get_input_embeddings().weight, zero.get_output_embeddings().weight]
            with deepspeed.zero.GatheredParameters(weights):
                mean_rows = all(torch.equal(w[old:], w[:old].float().mean(0, keepdim=True).expand_as(w[old:]))
                                for w in weights) and all(w.shape[0] == old + 2 for w in weights)
        result[name] = {
            "params": params,
            "buffers_equal": all(torch.equal(b, buffers[n]) for n, b in zero.named_buffers()),
            "same_rng": torch.equal(rng_zero, rng_whole),
            "mean_rows": mean_rows,
        }
    (root / f"rank{rank}.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run :func:`_worker` on two gloo ranks; their results, rank 0 first."""
    from llava_san.testing import write_tiny_checkpoints
    from llava_san.training.strategies import resolve_auto

    root = tmp_path_factory.mktemp("zero_init")
    ckpts = write_tiny_checkpoints(root / "ckpts", seed=0)
    config = resolve_auto(instantiate(_cfg(root, "strategy=deepspeed_zero3_cpu").strategy).config)
    config["train_micro_batch_size_per_gpu"] = 1  # Lightning adds it from the loader
    vocab = json.loads((ckpts["vicuna"] / "config.json").read_text())["vocab_size"]
    setup = {"ckpts": {k: str(v) for k, v in ckpts.items()}, "config": config, "vicuna_vocab": vocab}
    (root / "setup.json").write_text(json.dumps(setup))
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(root)], cwd=ROOT,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return [json.loads((root / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("builder", BUILDERS)
def test_builder_is_partitioned_at_construction_and_equals_the_whole_build(builder, two_ranks):
    for rank, result in enumerate(two_ranks):
        r = result[builder]
        assert r["params"], builder
        for name, p in r["params"].items():
            assert p["ds"] and p["local"] == 0, f"rank {rank}: {name} was not partitioned at construction"
            assert p["partition"] < p["full"] or p["full"] == 1, f"rank {rank}: {name} holds {p}"
            assert p["equal"], f"rank {rank}: {name} differs, gathered, from the build without DeepSpeed"
        assert r["buffers_equal"], builder
        assert r["same_rng"], f"rank {rank}: the build left the RNG elsewhere than without DeepSpeed"
        if builder.startswith("parts"):
            assert r["mean_rows"], "the new <image>/<pad> rows are not the mean of the old rows"


# ----------------------------------------------------------------------------------------------
# the strategy
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option", ["deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_cpu",
                                    "deepspeed_zero3_offload"])
def test_zero_init_defaults(option):
    """Offload (GPUs smaller than the model) builds partitioned, as LLaVA/HF's ZeRO-3 runs do."""
    strategy = instantiate(_cfg("/tmp/unused", f"strategy={option}").strategy)
    assert strategy.zero_init is option.endswith("offload")


def test_sharded_context_keeps_an_hf_deepspeed_config_alive_only_inside():
    from lightning.pytorch.accelerators import CPUAccelerator
    from transformers.integrations import deepspeed_config, is_deepspeed_zero3_enabled

    from llava_san.training.strategies import DeepSpeedStrategy

    config = instantiate(_cfg("/tmp/unused", "strategy=deepspeed_zero3").strategy).config
    for zero_init, stage, alive in [(True, 3, True), (False, 3, False), (True, 2, False)]:
        cfg = {**config, "zero_optimization": {**config["zero_optimization"], "stage": stage}}
        strategy = DeepSpeedStrategy(accelerator=CPUAccelerator(), zero_init=zero_init, config=cfg)
        strategy._config_initialized = True  # Lightning would fill batch size etc. from a Trainer here
        with strategy.model_sharded_context():
            assert is_deepspeed_zero3_enabled() is alive
            if alive:  # hidden-size "auto"s are unknown before the model exists: left out
                assert "auto" not in deepspeed_config()["zero_optimization"].values()
        assert not is_deepspeed_zero3_enabled()


def test_zero_init_run_trains_the_same_adapter(tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from transformers.integrations import is_deepspeed_zero3_enabled

    import train.run as run_module
    from llava_san.module import LlavaSanModule

    for key in DIST_ENV:  # Lightning writes them for DeepSpeed; the gloo group itself stays up
        monkeypatch.delenv(key, raising=False)
    seen = {}
    configure_model = LlavaSanModule.configure_model

    def spy(self):
        configure_model(self)
        params = list(self.model.named_parameters())
        seen[self.trainer.strategy.zero_init] = {
            "frozen_partitioned": all(hasattr(p, "ds_id") and p.numel() == 0
                                      for _, p in params if not p.requires_grad),
            # adapters are built whole (peft initialises them in place), partitioned by initialize
            "adapters_whole": all(not hasattr(p, "ds_id") for n, p in params if "lora_" in n),
            "hf_zero3": is_deepspeed_zero3_enabled(),
        }

    monkeypatch.setattr(LlavaSanModule, "configure_model", spy)
    adapters = {}
    for zero_init in (False, True):
        out = tmp_path / f"zero_init_{zero_init}"
        cfg = _cfg(out, "strategy=deepspeed_zero3_cpu", f"strategy.zero_init={str(zero_init).lower()}",
                   "peft=san_dora", "trainer.max_steps=3")
        assert run_module.run(cfg)["train/global_step"] == 3
        adapters[zero_init] = {f.name: load_file(f) for f in sorted((out / "adapter").glob("*.safetensors"))}
    assert not is_deepspeed_zero3_enabled()  # nothing left alive after configure_model
    assert seen[True] == {"frozen_partitioned": True, "adapters_whole": True, "hf_zero3": True}
    assert seen[False] == {"frozen_partitioned": False, "adapters_whole": True, "hf_zero3": False}

    plain, zero = adapters[False], adapters[True]
    # adapter_model (LoRA/DoRA and the projector as a modules_to_save module) and san_state
    assert plain.keys() == zero.keys() and len(plain) == 2
    for file in plain:
        assert plain[file].keys() == zero[file].keys()
        for key, value in plain[file].items():
            # tolerance as zero2-vs-zero3 in test_deepspeed_cpu.py (bit-equal today: same init, same steps)
            torch.testing.assert_close(zero[file][key], value, rtol=1e-4, atol=1e-5, msg=f"{file}: {key}")
    assert any(v.abs().max() > 0 for k, v in zero["adapter_model.safetensors"].items() if "lora_B" in k)


if __name__ == "__main__":  # one rank of the ``two_ranks`` fixture
    if sys.argv[1:2] == ["--worker"]:
        _worker(Path(sys.argv[2]))
        # the result is on disk: end the process group, then leave without C++ static destructors,
        # which on a loaded machine can abort ("terminate called without an active exception", exit -6)
        # while the communication threads wind down
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

"""One prepared GPU check of llava-san on a LLaVA-1.5-7B-shaped model (random weights, nothing downloaded).

Prints one JSON object (and writes it to ``--out`` after every section, so a run cut short still leaves
what it measured; every other output goes to stderr); exit status 1 if a section failed. Sections, in
the order they run, each guarded (a failure is recorded as ``{"error": ...}`` and the others still run),
chosen with ``--sections``; ``summary`` holds the headline numbers:

* ``env``: GPU name and memory, torch / CUDA / cuDNN / transformers / peft / Lightning / DeepSpeed
  versions, bf16 support, the attention implementation the model was built with (``--attn``, default
  ``sdpa``; ``flash_attention_2`` needs the flash-attn package), whether flash-attn is installed.
* ``train``: training steps through :class:`llava_san.module.LlavaSanModule` (``training_step`` +
  ``backward`` + AdamW ``step`` over the module's parameter groups, as ``benchmarks/train_step.py``),
  arms ``lora``, ``dora``, ``san_lora``, ``san_dora`` at the paper's r=128, alpha=256, dropout 0.05 on
  the seven LLM projections, projector trained, gradient checkpointing on, bf16 weights with the
  adapters cast to bf16 too, as DeepSpeed's bf16 mode runs them (``--train-precision autocast``: fp32
  adapters under bf16 autocast, Lightning's ``bf16-mixed``). The arms share one frozen base (the same
  weight tensors; only the adapters, the projector copy and the optimiser state are per arm: nothing
  writes a frozen weight, SAN scales activations or transient copies), are stepped interleaved (order
  alternating) and give per arm: tokens/s, samples/s, MFU and HFU, peak memory
  (``torch.cuda.max_memory_allocated``, all arms resident) and the step's own peak above the resident
  memory; ratios ``san_lora/lora``,
  ``san_dora/dora``, ``dora/lora``: ``speed`` (of the medians), ``speed_paired`` (median over repeats of
  the two arms' time ratio within a repeat; > 1 = faster) and ``step_memory`` (> 1 = more).
  Batch: ``--batch`` sequences of ``--seq-len`` tokens (7B: 8 x 2048 = <s> + 576 image tokens + 1471
  text tokens), loss on the last ``--answer-frac`` of the text. A CUDA out-of-memory error in the
  warm-up step halves the batch (recorded as ``batch_reduced_from``).
* ``bf16``: SAN-LoRA and SAN-DoRA (random non-zero LoRA ``B``, ‖s·BA‖ = 0.2·‖W‖ per layer, dropout 0)
  on fp32 weights: one ``training_step`` + backward under ``torch.autocast(bfloat16)`` against the same
  in fp32 (TF32 off): relative error of the loss, of a few gradients (‖g16 − g32‖ / ‖g32‖), |Δγ| of the
  batch γ of every SAN layer (worst layer's mean and max), and the dtype of every γ̄ buffer (must stay
  fp32). Bounds are stated in the JSON (``bounds``) and checked (``within_bounds``).
* ``generation``: :func:`llava_san.generation.generate_batch` on the bf16 model (eval mode; a merged
  adapter leaves a plain model of the same shape): ``--gen-questions`` prompts (<s> + image + text of
  varying length) answered 16 at a time against one at a time, ``eos_token_id=None`` so every answer
  has exactly ``--gen-new-tokens`` tokens; questions/s, paired speed-up, and whether the answers of
  both arms are identical (exact in fp32; bf16 near-ties may flip a token).
* ``zero3``, ``zero2``: ``--ds-steps`` steps of the ``--ds-arm`` arm (default ``san_dora``) through
  Lightning's ``Trainer(strategy=...)`` with the project's strategy config, composed by Hydra from
  ``conf/strategy/deepspeed_zero3.yaml`` / ``deepspeed_zero2.yaml`` (``--tiny``: ``deepspeed_zero3_cpu``,
  every parameter partitioned), precision ``bf16-mixed`` (CPU: ``32-true``), on the one device:
  success, time of each step (the first includes DeepSpeed's lazy set-up), losses, peak memory.

FLOPs (``train.flops.formula`` repeats this). Per step, with ``P`` = frozen weights of the seven
projections of all decoder layers (``L·(2·d² + 2·d·d_kv + 3·d·f)``), ``P_lora`` = LoRA weights
(``L·r·Σ(in+out)``), ``N = B·T`` tokens, ``k = 2`` for DoRA with dropout > 0 (DoRA multiplies ``W`` by
both ``x`` and ``drop(x)``) else 1, ``N_ans`` answer tokens, vocabulary ``V``::

    forward  = 2·k·P·N + 2·P_lora·N + 4·L·B·T²·d (attention, QKᵀ and AV, full square)
               + 2·d·V·N_ans (lm_head on the answer rows, as causal_lm_loss does)
               + vision tower: B_img·(2·P_vis·T_v + 4·L_v·T_v²·d_v)     (T_v = 577, all 24 layers, no grad)
               + projector 2·P_proj·B_img·576
               + DoRA norm ‖W + s·BA‖: 2·r·P (the BA product, once per forward; DoRA arms)
    backward = 2·k·P·N (frozen weights: input gradient only) + 4·P_lora·N (LoRA: input and weight
               gradients) + 2 x attention forward + 2·d·V·N_ans (input gradient) + projector weight
               gradients 2·P_proj·B_img·576 + its inner input gradient 2·d²·B_img·576
    model FLOPs    = forward + backward                                  -> MFU = model / step_s / peak
    hardware FLOPs = model + the decoder's recomputed forward (gradient checkpointing)  -> HFU

Element-wise work (norms, activations, SAN's γ sums and scalings, softmax) is not counted. ``peak``: the
card's dense bf16 FLOP/s from a small table by GPU name (H100 SXM / H200: 989.4 TFLOP/s), else null
(MFU null).

The whole run stays under ``--time-budget-s`` (default 400 s; the command's 8 minutes include the
interpreter's start and the imports): each section gets a share of the time left and takes fewer repeats
when steps are slow; a watchdog prints what was measured and exits 124 if a section hangs past the budget.

    python benchmarks/gpu_check.py --out $OUT/gpu_check.json          # a GPU machine, 7B shape
    python benchmarks/gpu_check.py --tiny                             # CPU, small shapes, same code
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # libgomp's active wait adds ~4 ms per parallel op here
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from llava_san.training.flops import peak_flops  # noqa: E402  (the dense bf16 peak by GPU name)

SECTIONS = ("env", "train", "generation", "bf16", "zero3", "zero2")  # the order they run in
ARMS = ("lora", "dora", "san_lora", "san_dora")
RATIOS = (("san_lora", "lora"), ("san_dora", "dora"), ("dora", "lora"))
#: share of the time left that each section may use (fixed costs such as builds are not adaptable)
SHARES = {"env": 0.01, "train": 0.35, "bf16": 0.1, "generation": 0.2, "zero3": 0.2, "zero2": 0.14}

#: Model shapes. ``spec``: :class:`llava_san.models.tiny.TinyLlavaSpec` fields; ``vocab_rows``: the language
#: model's embedding rows (Vicuna 32000 + ``<image>`` + ``<pad>``; None: the tokenizer's size).
SHAPES = {
    "7b": {
        "spec": {"image_size": 336, "patch_size": 14, "vision_hidden": 1024, "vision_layers": 24,
                 "vision_heads": 16, "text_hidden": 4096, "text_layers": 32, "text_heads": 32,
                 "text_kv_heads": 32, "text_intermediate": 11008, "vocab_size": 1024,
                 "max_position_embeddings": 4096},
        "vocab_rows": 32002, "dtype": "bfloat16", "seq_len": 2048, "batch": 8, "rank": 128, "alpha": 256,
        "dropout": 0.05, "repeats": 6, "bf16_batch": 1, "bf16_seq_len": 2048, "ds_batch": 4,
        "gen_questions": 16, "gen_new_tokens": 32, "gen_text": (24, 72), "gen_repeats": 3,
        "budget_s": 400.0, "zero3": "deepspeed_zero3",
    },
    "tiny": {
        "spec": {"image_size": 28, "patch_size": 14, "vision_hidden": 32, "vision_layers": 2,
                 "vision_heads": 2, "text_hidden": 64, "text_layers": 2, "text_heads": 4,
                 "text_kv_heads": 4, "text_intermediate": 128, "vocab_size": 1024},
        "vocab_rows": None, "dtype": "float32", "seq_len": 100, "batch": 2, "rank": 8, "alpha": 16,
        "dropout": 0.05, "repeats": 3, "bf16_batch": 2, "bf16_seq_len": 100, "ds_batch": 2,
        "gen_questions": 16, "gen_new_tokens": 8, "gen_text": (8, 40), "gen_repeats": 2,
        "budget_s": 150.0, "zero3": "deepspeed_zero3_cpu",
    },
}
#: bf16 autocast against fp32 (as tests/peft/test_san_bf16.py): relative error of the loss and of each
#: gradient, |Δγ| averaged over a layer's channels and at most (a channel with a small Σh² is ill-conditioned)
BF16_BOUNDS = {"loss_rel": 1e-2, "grad_rel": 0.1, "gamma_mean_abs": 5e-3, "gamma_max_abs": 0.1}

_quiet_done = False


# ==============================================================================================
# plumbing: output, time budget, device helpers
# ==============================================================================================
class Run:
    """What every section reads: the options, the device, the budget, the shared base model."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.shape = SHAPES["tiny" if args.tiny else "7b"]
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
        self.cuda = self.device.type == "cuda"
        self.dtype = getattr(torch, args.dtype or self.shape["dtype"])
        self.t0 = time.perf_counter()
        self.budget = float(args.time_budget_s or self.shape["budget_s"])
        self.deadline = self.t0 + self.budget
        self.section_deadline = self.deadline
        self.result: dict = {}
        self._base = None
        self.attn_implementation: Optional[dict] = None

    def left(self) -> float:
        return self.section_deadline - time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def base(self):
        """The bf16 (CPU: fp32) base model, built once and shared by ``train`` and ``generation``."""
        if self._base is None:
            t = time.perf_counter()
            self._base = build_random_llava(self, dtype=self.dtype)
            self.base_build_s = time.perf_counter() - t
        return self._base

    def drop_base(self) -> None:
        self._base = None
        self.free()


def write_out(run: Run, final: bool = False) -> None:
    """The JSON so far into ``--out`` (atomic), and on ``final`` to the real stdout."""
    run.result["seconds"] = time.perf_counter() - run.t0
    text = json.dumps(run.result, indent=1, default=str)
    if run.args.out:
        out = Path(run.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{out.name}.{threading.get_ident()}.tmp")  # the watchdog thread writes too
        tmp.write_text(text)
        os.replace(tmp, out)
    if final:
        os.write(_REAL_STDOUT, (text + "\n").encode())


_REAL_STDOUT = 1


def _stdout_to_stderr() -> None:
    """Send everything written to fd 1 (DeepSpeed's and Lightning's log lines, C-level prints) to stderr,
    so stdout holds the JSON only."""
    global _REAL_STDOUT
    sys.stdout.flush()
    _REAL_STDOUT = os.dup(1)
    os.dup2(2, 1)


def _watchdog(run: Run, grace_s: float) -> threading.Timer:
    """Past the budget + ``grace_s``: print what was measured (the running section marked) and exit 124."""

    def fire() -> None:
        running = run.result.get("running")
        if running:
            run.result["sections"][running] = {"error": f"did not finish within the time budget "
                                                        f"({run.budget:.0f} s + {grace_s:.0f} s)"}
        run.result["timed_out"] = True
        try:
            write_out(run, final=True)
        finally:
            os._exit(124)

    timer = threading.Timer(max(run.deadline - time.perf_counter(), 0) + grace_s, fire)
    timer.daemon = True
    timer.start()
    return timer


def _quiet() -> None:
    global _quiet_done
    if _quiet_done:
        return
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "DeepSpeed", "deepspeed",
                 "transformers", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    _quiet_done = True


# ==============================================================================================
# the model and the batches
# ==============================================================================================
def build_random_llava(run: Run, *, dtype: torch.dtype, seed: int = 0):
    """A randomly initialised LLaVA-1.5 of ``run.shape`` built on ``run.device`` in ``dtype``, and its
    processor: the tiny model's own spec -> processor -> ``LlavaConfig`` functions
    (:mod:`llava_san.models.tiny`), constructed in place on the device (transformers' init, no CPU copy
    of 7B weights). Eval mode, like every builder of :mod:`llava_san.models`."""
    from transformers import LlavaForConditionalGeneration

    from llava_san.models.tiny import TinyLlavaSpec, build_tiny_processor, tiny_llava_config

    spec = TinyLlavaSpec(**run.shape["spec"])
    processor = build_tiny_processor(spec)
    config = tiny_llava_config(spec, processor)
    if run.shape["vocab_rows"]:
        config.text_config.vocab_size = run.shape["vocab_rows"]
    config.image_seq_length = spec.image_tokens
    torch.manual_seed(seed)
    with torch.device(run.device):
        model = LlavaForConditionalGeneration._from_config(
            config, dtype=dtype, attn_implementation=run.args.attn)
    model.eval()
    run.attn_implementation = {
        "text": model.config.text_config._attn_implementation,
        "vision": model.config.vision_config._attn_implementation,
    }
    return model, processor


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose parameters are the *same tensors* except the projector's (trained by
    every arm): module objects, buffers and the projector are copied. Several arms can then be built on
    one frozen base, as nothing writes a frozen weight."""
    from llava_san.peft import is_projector_param

    memo = {id(p): p for n, p in model.named_parameters() if not is_projector_param(n)}
    return copy.deepcopy(model, memo)


def recipe(run: Run, arm: str, dropout: Optional[float] = None):
    """The ``LoraRecipe`` of an arm, as ``conf/peft/<arm>.yaml`` builds it (with ``conf/model/llava7b``'s
    r / alpha / dropout, or the tiny shape's)."""
    from peft import LoraConfig

    from llava_san.peft import LLAMA_MODULE_TYPES, LoraRecipe, SanConfig

    s = run.shape
    lora = LoraConfig(r=s["rank"], lora_alpha=s["alpha"], bias="none", use_dora=arm.endswith("dora"),
                      lora_dropout=s["dropout"] if dropout is None else dropout,
                      target_modules=list(LLAMA_MODULE_TYPES))
    return LoraRecipe(lora, SanConfig() if arm.startswith("san_") else None)


def optim_config(arm: str):
    from llava_san.training import OptimConfig

    # the paper: LoRA 2e-4, DoRA 1e-4, projector 2e-5
    return OptimConfig(lr=1e-4 if arm.endswith("dora") else 2e-4, projector_lr=2e-5)


def make_batch(model_or_config, batch: int, seq_len: int, answer_frac: float, seed: int) -> dict:
    """A LLaVA batch on the CPU: ``<s>``, the image's tokens, random ordinary text; labels on the last
    ``answer_frac`` of the text. ``(B, T)``, ``pixel_values`` ``(B, 3, H, W)``."""
    cfg = getattr(model_or_config, "config", model_or_config)
    n_img = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    n_text = seq_len - 1 - n_img
    if n_text < 2:
        raise ValueError(f"seq_len {seq_len} leaves no text after 1 + {n_img} image tokens")
    g = torch.Generator().manual_seed(seed)
    high = min(cfg.image_token_id, cfg.pad_token_id if cfg.pad_token_id is not None else cfg.image_token_id)
    text = torch.randint(3, high, (batch, n_text), generator=g)  # no <image>, no <pad>
    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), torch.full((batch, n_img), cfg.image_token_id),
                     text], 1)
    labels = torch.full_like(ids, -100)
    n_ans = max(1, int(round(answer_frac * n_text)))
    labels[:, -n_ans:] = ids[:, -n_ans:]
    size = cfg.vision_config.image_size
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "pixel_values": torch.randn(batch, 3, size, size, generator=g)}


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ==============================================================================================
# FLOPs
# ==============================================================================================
FLOP_FORMULA = (
    "model = forward + backward; hardware = model + recomputed decoder forward (gradient checkpointing). "
    "forward = 2*k*P*N + 2*P_lora*N + 4*L*B*T^2*d + 2*d*V*N_ans + B_img*(2*P_vis*T_v + 4*L_v*T_v^2*d_v) "
    "+ 2*P_proj*B_img*n_img + [DoRA] 2*r*P; backward = 2*k*P*N (frozen: input grad only) + 4*P_lora*N "
    "+ 2*(4*L*B*T^2*d) + 2*d*V*N_ans + 2*P_proj*B_img*n_img + 2*d^2*B_img*n_img; "
    "P = L*(2*d^2 + 2*d*d_kv + 3*d*f) frozen projection weights, P_lora = L*r*sum(in+out), N = B*T tokens, "
    "k = 2 for DoRA with dropout > 0 (W x and W drop(x)) else 1, N_ans = answer tokens, V = vocab rows, "
    "T_v = image tokens + CLS, all vision layers, no vision gradient; element-wise ops not counted; "
    "MFU = model / step_s / peak_bf16, HFU = hardware / step_s / peak_bf16")


def step_flops(config, *, arm: str, rank: int, dropout: float, batch: int, seq_len: int,
               n_answer: int) -> dict:
    """Model and hardware FLOPs of one training step (see :data:`FLOP_FORMULA` and the module doc)."""
    t, v = config.text_config, config.vision_config
    d, f, L = t.hidden_size, t.intermediate_size, t.num_hidden_layers
    d_kv = d * t.num_key_value_heads // t.num_attention_heads
    # (in, out) of q, k, v, o, gate, up, down
    shapes = [(d, d), (d, d_kv), (d, d_kv), (d, d), (d, f), (d, f), (f, d)]
    P = L * sum(i * o for i, o in shapes)
    P_lora = L * rank * sum(i + o for i, o in shapes)
    dora = arm.endswith("dora")
    k = 2 if dora and dropout > 0 else 1
    N = batch * seq_len
    attn = 4 * L * batch * seq_len ** 2 * d
    head = 2 * d * t.vocab_size * n_answer
    n_img = (v.image_size // v.patch_size) ** 2
    T_v = n_img + 1
    P_vis = v.num_hidden_layers * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size)
    vision = batch * (2 * P_vis * T_v + 4 * v.num_hidden_layers * T_v ** 2 * v.hidden_size)
    P_proj = v.hidden_size * d + d * d
    proj = 2 * P_proj * batch * n_img
    norm = 2 * rank * P if dora else 0
    decoder_fwd = 2 * k * P * N + 2 * P_lora * N + attn + norm
    forward = decoder_fwd + head + vision + proj
    backward = 2 * k * P * N + 4 * P_lora * N + 2 * attn + head + proj + 2 * d * d * batch * n_img
    model = forward + backward
    return {"forward": float(forward), "backward": float(backward), "model": float(model),
            "hardware": float(model + decoder_fwd), "frozen_projection_params": P, "lora_params": P_lora}


def gpu_name(run: Run) -> Optional[str]:
    return torch.cuda.get_device_name() if run.cuda else None


# ==============================================================================================
# sections
# ==============================================================================================
def section_env(run: Run) -> dict:
    import lightning
    import peft
    import transformers

    out = {"device": str(run.device), "gpu": gpu_name(run), "torch": torch.__version__,
           "cuda": torch.version.cuda, "transformers": transformers.__version__, "peft": peft.__version__,
           "lightning": lightning.__version__, "cpus": os.cpu_count(), "dtype": str(run.dtype),
           "attn_requested": run.args.attn,
           "ds_accelerator_env": os.environ.get("DS_ACCELERATOR")}
    try:
        import deepspeed

        out["deepspeed"] = deepspeed.__version__
    except Exception as err:  # noqa: BLE001 - recorded
        out["deepspeed"] = f"unavailable: {err}"
    try:
        import flash_attn  # noqa: F401

        out["flash_attn"] = getattr(flash_attn, "__version__", "installed")
    except Exception:  # noqa: BLE001
        out["flash_attn"] = None
    if run.cuda:
        props = torch.cuda.get_device_properties(0)
        out.update({"gpu_count": torch.cuda.device_count(),
                    "capability": list(torch.cuda.get_device_capability()),
                    "gpu_memory_gb": props.total_memory / 2**30, "cudnn": torch.backends.cudnn.version(),
                    "bf16_supported": torch.cuda.is_bf16_supported(),
                    "sdpa_flash_enabled": torch.backends.cuda.flash_sdp_enabled(),
                    "sdpa_mem_efficient_enabled": torch.backends.cuda.mem_efficient_sdp_enabled(),
                    "peak_bf16_flops": peak_flops(gpu_name(run))})
    else:
        out.update({"bf16_supported": None, "peak_bf16_flops": None})
    return out


def _train_arm(run: Run, arm: str, base) -> tuple:
    """An arm's ``LlavaSanModule`` on a shared copy of ``base`` (barebones trainer), and its optimiser."""
    import lightning as L

    from llava_san.module import LlavaSanModule
    from llava_san.training.optim import build_optimizer

    model, processor = base
    module = LlavaSanModule(lambda: (shared_copy(model), processor), adapter=recipe(run, arm),
                            optim=optim_config(arm), train_projector=True, gradient_checkpointing=True)
    with torch.device(run.device):  # peft creates the adapters on the device (as Lightning's init context)
        module.configure_model()
    if train_precision(run) == "params":  # as DeepSpeed's bf16 mode: every parameter in bf16, buffers kept
        for p in module.model.parameters():
            p.data = p.data.to(run.dtype)
    # barebones: self.log() is a no-op, the step code is the training code
    module.trainer = L.Trainer(barebones=True, accelerator="gpu" if run.cuda else "cpu", devices=1,
                               logger=False)
    return module, build_optimizer(module.named_parameters(), module.optim)


def train_precision(run: Run) -> str:
    """``fp32`` (fp32 weights), ``params`` (16-bit parameters, adapters included, as DeepSpeed's bf16 mode
    runs them; no autocast) or ``autocast`` (16-bit base, fp32 adapters, forward under autocast: Lightning's
    ``bf16-mixed`` without DeepSpeed)."""
    if run.dtype == torch.float32:
        return "fp32"
    return run.args.train_precision


def _autocast(run: Run):
    if train_precision(run) != "autocast":
        return contextlib.nullcontext()
    return torch.autocast(run.device.type, dtype=run.dtype)  # Lightning's bf16-mixed: forward only


def _train_step(run: Run, module, opt, batch: dict, i: int) -> tuple[float, Optional[float], float]:
    """One step; (wall s, the step's peak allocation above what was resident before, GB; loss)."""
    if run.cuda:
        run.sync()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
    t = time.perf_counter()
    with _autocast(run):
        loss = module.training_step(batch, i)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    run.sync()
    dt = time.perf_counter() - t
    extra = (torch.cuda.max_memory_allocated() - resident) / 2**30 if run.cuda else None
    # what fit() counts after an optimizer step: trainer.global_step (which paces SAN's γ logging) advances
    progress = module.trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress
    progress.optimizer.step.increment_completed()
    return dt, extra, float(loss.detach())


def section_train(run: Run) -> dict:
    args, s = run.args, run.shape
    base = run.base()
    batch_size = args.batch or s["batch"]
    seq_len = args.seq_len or s["seq_len"]
    out: dict = {"model_build_s": run.base_build_s, "precision": train_precision(run),
                 "dtype": str(run.dtype),
                 "tokens_counted": "every position of the batch (<s>, image tokens, text; no padding)",
                 "arms": {}, "ratios": {}, "flops": {"formula": FLOP_FORMULA}}
    modules = {}
    for arm in args.arms:
        t = time.perf_counter()
        modules[arm] = _train_arm(run, arm, base)
        out["arms"][arm] = {"adapter_build_s": time.perf_counter() - t,
                            "trainable_params": sum(p.numel() for p in modules[arm][0].parameters()
                                                    if p.requires_grad)}
    reduced_from = None
    while True:  # warm-up (also the OOM probe): one step per arm
        batches = [to_device(make_batch(base[0], batch_size, seq_len, args.answer_frac, seed), run.device)
                   for seed in range(2)]
        warm: dict = {}
        try:
            for arm in args.arms:
                warm[arm] = _train_step(run, *modules[arm], batches[0], 0)
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise
        if len(warm) == len(args.arms):
            break
        # out of memory: free what the failed step held (outside the except block, whose traceback
        # keeps the step's frames alive) and halve the batch
        reduced_from = reduced_from or batch_size
        batch_size //= 2
        for _, o in modules.values():
            o.zero_grad(set_to_none=True)
        del batches
        run.free()
    out.update({"batch": batch_size, "seq_len": seq_len, "batch_reduced_from": reduced_from,
                "tokens_per_step": batch_size * seq_len,
                "image_tokens": (base[0].config.vision_config.image_size
                                 // base[0].config.vision_config.patch_size) ** 2})
    round_s = sum(w[0] for w in warm.values())
    repeats = max(1, min(args.repeats or s["repeats"], int(run.left() / max(round_s, 1e-9))))
    wall = {a: [] for a in args.arms}
    extra = {a: [] for a in args.arms}
    losses = {a: [warm[a][2]] for a in args.arms}
    peak_total = {a: 0.0 for a in args.arms}
    for r in range(repeats):
        order = list(args.arms) if r % 2 == 0 else list(reversed(args.arms))
        for arm in order:
            dt, ex, loss = _train_step(run, *modules[arm], batches[r % 2], r + 1)
            wall[arm].append(dt)
            extra[arm].append(ex)
            losses[arm].append(loss)
            if run.cuda:
                peak_total[arm] = max(peak_total[arm], torch.cuda.max_memory_allocated() / 2**30)
        if r + 1 < repeats and run.left() < round_s:
            break
    n_done = len(wall[args.arms[0]])
    out["repeats"] = n_done
    n_answer = int((batches[0]["labels"][:, 1:] != -100).sum())  # what causal_lm_loss projects
    peak = peak_flops(gpu_name(run))
    out["flops"]["peak_bf16_flops"] = peak
    for arm in args.arms:
        w = statistics.median(wall[arm])
        fl = step_flops(base[0].config, arm=arm, rank=s["rank"], dropout=s["dropout"], batch=batch_size,
                        seq_len=seq_len, n_answer=n_answer)
        row = out["arms"][arm]
        row.update({
            "warmup_step_s": warm[arm][0], "step_s": w, "step_s_all": wall[arm],
            "tokens_per_s": batch_size * seq_len / w, "samples_per_s": batch_size / w,
            "model_tflops_per_step": fl["model"] / 1e12, "hardware_tflops_per_step": fl["hardware"] / 1e12,
            "achieved_tflops": fl["model"] / w / 1e12,
            "mfu": None if peak is None else fl["model"] / w / peak,
            "hfu": None if peak is None else fl["hardware"] / w / peak,
            "losses": losses[arm],
            "peak_allocated_gb": peak_total[arm] if run.cuda else None,
            "step_peak_over_resident_gb": statistics.median(extra[arm]) if run.cuda else None,
        })
        out["flops"].setdefault("frozen_projection_params", fl["frozen_projection_params"])
        out["flops"].setdefault(f"lora_params_r{s['rank']}", fl["lora_params"])
    for a, b in RATIOS:
        if a in wall and b in wall:
            ra, rb = out["arms"][a], out["arms"][b]
            out["ratios"][f"{a}/{b}"] = {
                "speed": ra["tokens_per_s"] / rb["tokens_per_s"],
                "speed_paired": statistics.median(x / y for x, y in zip(wall[b], wall[a])),
                "step_memory": (statistics.median(extra[a]) / statistics.median(extra[b])
                                if run.cuda else None),
                # the warm-up step starts from LoRA B = 0: SAN computes exactly what LoRA/DoRA does (γ = 1)
                # (None after an out-of-memory retry: some arms had stepped already)
                "init_loss_rel_diff": None if reduced_from else (abs(ra["losses"][0] - rb["losses"][0])
                                                                 / max(abs(rb["losses"][0]), 1e-30)),
            }
    out["finite_losses"] = all(math.isfinite(v) for ls in losses.values() for v in ls)
    if run.cuda:
        out["max_allocated_gb"] = max(peak_total.values())
    del modules, batches
    run.free()
    return out


def _fp32_matmul_ieee() -> tuple[str, Callable[[], None]]:
    """fp32 matmuls without TF32 for the fp32 reference; returns (what is set, a function restoring the
    previous setting)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9
        old = matmul.fp32_precision
        matmul.fp32_precision = "ieee"

        def restore() -> None:
            matmul.fp32_precision = old
        return f"fp32_precision={matmul.fp32_precision}", restore
    old_tf32 = matmul.allow_tf32
    matmul.allow_tf32 = False

    def restore_legacy() -> None:
        matmul.allow_tf32 = old_tf32
    return "allow_tf32=False", restore_legacy


@torch.no_grad()
def randomize_lora_b(model: torch.nn.Module, rel: float = 0.2, seed: int = 0) -> None:
    """Random LoRA ``B`` with ‖s·B A‖_F = ``rel``·‖W‖_F in every layer: adapters (and SAN's γ) not trivial."""
    from peft.tuners.lora import LoraLayer

    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name in module.lora_B:
            A, B = module.lora_A[name].weight, module.lora_B[name].weight
            B.copy_(torch.randn(B.shape, generator=g).to(B))
            delta = module.scaling[name] * (B.float() @ A.float())
            W = module.get_base_layer().weight.float()
            B.mul_(rel * W.norm() / delta.norm().clamp(min=1e-12))


def _bf16_grads(module, names: list[str]) -> dict:
    params = dict(module.model.named_parameters())
    return {n: params[n].grad.detach().float().clone() for n in names if params[n].grad is not None}


def section_bf16(run: Run) -> dict:
    """SAN under bf16 autocast against fp32 (see the module doc)."""
    import lightning as L

    from llava_san.module import LlavaSanModule
    from llava_san.peft import get_san_state, san_layers

    s = run.shape
    device_type = run.device.type
    t = time.perf_counter()
    model, processor = build_random_llava(run, dtype=torch.float32, seed=1)
    out: dict = {"autocast": f"{device_type}/bfloat16", "weights": "float32", "lora_dropout": 0.0,
                 "model_build_s": time.perf_counter() - t, "bounds": dict(BF16_BOUNDS), "arms": {}}
    batch = make_batch(model, s["bf16_batch"], s["bf16_seq_len"], run.args.answer_frac, 7)
    batch = to_device(batch, run.device)
    out.update({"batch": s["bf16_batch"], "seq_len": s["bf16_seq_len"]})
    fp32_mode, restore = _fp32_matmul_ieee() if run.cuda else ("cpu", lambda: None)
    out["fp32_matmul"] = fp32_mode
    try:
        for arm in ("san_lora", "san_dora"):
            module = LlavaSanModule(lambda: (shared_copy(model), processor),
                                    adapter=recipe(run, arm, dropout=0.0), optim=optim_config(arm),
                                    train_projector=True, gradient_checkpointing=True)
            with torch.device(run.device):
                module.configure_model()
            module.trainer = L.Trainer(barebones=True, accelerator="gpu" if run.cuda else "cpu", devices=1,
                                       logger=False)
            randomize_lora_b(module.model, seed=3)
            layers = san_layers(module.model)
            names = [n for n, p in module.model.named_parameters() if p.requires_grad]
            L_ = run.shape["spec"]["text_layers"]
            wanted = ((0, "self_attn.q_proj.lora_A"), (L_ // 2, "mlp.up_proj.lora_B"),
                      (L_ - 1, "mlp.down_proj.lora_B"), (L_ - 1, "mlp.down_proj.lora_magnitude"),
                      (0, "self_attn.v_proj.lora_magnitude"))
            picks = [n for n in names if any(f"layers.{b}.{part}" in n for b, part in wanted)]
            picks += [n for n in names if "multi_modal_projector.linear_1.weight" in n]
            ema0 = [layer.san_gamma_ema.clone() for layer in layers]
            res = {}
            for mode in ("fp32", "bf16"):
                for layer, e in zip(layers, ema0):
                    layer.san_gamma_ema.copy_(e)
                bf16 = torch.autocast(device_type, dtype=torch.bfloat16)
                with bf16 if mode == "bf16" else contextlib.nullcontext():
                    loss = module.training_step(batch, 0)
                loss.backward()
                state = get_san_state(module.model)
                res[mode] = {
                    "loss": float(loss.detach()),
                    "loss_dtype": str(loss.dtype),
                    "grads": _bf16_grads(module, picks),
                    "gamma": [layer._san.batch_gamma.detach().float().clone() for layer in layers
                              if layer._san.batch_fid == state.forward_id],
                    "gamma_dtype": sorted({str(layer._san.batch_gamma.dtype) for layer in layers
                                           if layer._san.batch_gamma is not None}),
                    "ema_dtypes": sorted({str(layer.san_gamma_ema.dtype) for layer in layers}),
                    "ema_step": torch.cat([layer.san_gamma_ema - e for layer, e in zip(layers, ema0)]),
                }
                module.model.zero_grad(set_to_none=True)
            a, b = res["bf16"], res["fp32"]
            grad_rel = {n: float((a["grads"][n] - g).norm() / g.norm().clamp(min=1e-30))
                        for n, g in b["grads"].items() if n in a["grads"]}
            gamma_abs = max(float((x - y).abs().max()) for x, y in zip(a["gamma"], b["gamma"]))
            gamma_mean = max(float((x - y).abs().mean()) for x, y in zip(a["gamma"], b["gamma"]))
            gamma_dev = max(float((y - 1).abs().max()) for y in b["gamma"])
            row = {
                "loss_fp32": b["loss"], "loss_bf16": a["loss"], "loss_dtype_bf16": a["loss_dtype"],
                "loss_rel_err": abs(a["loss"] - b["loss"]) / max(abs(b["loss"]), 1e-30),
                "grad_rel_err": {n.replace("base_model.model.", ""): v for n, v in grad_rel.items()},
                "grad_rel_err_max": max(grad_rel.values()) if grad_rel else None,
                "gamma_layers_compared": min(len(a["gamma"]), len(b["gamma"])),
                "gamma_max_abs_diff": gamma_abs, "gamma_mean_abs_diff_worst_layer": gamma_mean,
                "gamma_max_abs_dev_from_1_fp32": gamma_dev,
                "gamma_dtype_bf16": a["gamma_dtype"], "ema_dtypes_after_bf16": a["ema_dtypes"],
                "ema_step_max_abs_diff": float((a["ema_step"] - b["ema_step"]).abs().max()),
                "finite": all(math.isfinite(v) for v in (a["loss"], b["loss"]))
                and all(bool(torch.isfinite(g).all()) for g in a["grads"].values()),
            }
            row["within_bounds"] = bool(
                row["finite"] and row["loss_rel_err"] < BF16_BOUNDS["loss_rel"]
                and (row["grad_rel_err_max"] or 0.0) < BF16_BOUNDS["grad_rel"]
                and gamma_abs < BF16_BOUNDS["gamma_max_abs"] and gamma_mean < BF16_BOUNDS["gamma_mean_abs"]
                and a["ema_dtypes"] == ["torch.float32"])
            out["arms"][arm] = row
            del module, layers, res
            run.free()
    finally:
        restore()
    out["within_bounds"] = all(r["within_bounds"] for r in out["arms"].values())
    del model
    run.free()
    return out


def section_generation(run: Run) -> dict:
    from llava_san.generation import GenerationInput, generate_batch

    s, args = run.shape, run.args
    model, processor = run.base()
    model.eval()
    cfg = model.config
    n_q = args.gen_questions or s["gen_questions"]
    new = args.gen_new_tokens or s["gen_new_tokens"]
    lo, hi = s["gen_text"]
    n_img = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    g = torch.Generator().manual_seed(11)
    high = min(cfg.image_token_id, cfg.pad_token_id)
    inputs = []
    for i in range(n_q):
        n_text = lo + (i * (hi - lo)) // max(n_q - 1, 1)  # prompts of different lengths: left padding in use
        ids = [1] + [cfg.image_token_id] * n_img + torch.randint(3, high, (n_text,), generator=g).tolist()
        pv = torch.randn(3, cfg.vision_config.image_size, cfg.vision_config.image_size, generator=g)
        inputs.append(GenerationInput(ids, pv, new))
    pad = cfg.pad_token_id
    bs = args.gen_batch

    def batched():
        out = []
        for i in range(0, n_q, bs):
            out += generate_batch(model, inputs[i:i + bs], pad_token_id=pad, eos_token_id=None)
        return out

    def one_at_a_time():
        return [generate_batch(model, [x], pad_token_id=pad, eos_token_id=None)[0] for x in inputs]

    arms = {f"batch_{bs}": batched, "batch_1": one_at_a_time}
    times = {a: [] for a in arms}
    answers = {}
    stable = True

    def timed(fn):
        run.sync()
        t = time.perf_counter()
        res = fn()
        run.sync()
        return res, time.perf_counter() - t

    # warm-up: one pass of each arm (cuBLAS/SDPA heuristics, allocator); its answers are kept
    for a, fn in arms.items():
        answers[a], warm = timed(fn)
        times[a + "_warmup"] = warm
    round_s = sum(times[a + "_warmup"] for a in arms)
    repeats = max(1, min(args.gen_repeats or s["gen_repeats"], int(run.left() / max(round_s, 1e-9))))
    for r in range(repeats):
        for a in (arms if r % 2 == 0 else list(reversed(list(arms)))):
            res, dt = timed(arms[a])
            times[a].append(dt)
            stable = stable and res == answers[a]
        if r + 1 < repeats and run.left() < round_s:
            break
    b16, b1 = answers[f"batch_{bs}"], answers["batch_1"]
    out = {"questions": n_q, "batch_size": bs, "max_new_tokens": new, "eos_token_id": None,
           "prompt_tokens": [len(inputs[0].input_ids), len(inputs[-1].input_ids)], "dtype": str(model.dtype),
           "repeats": len(times["batch_1"]),
           "identical_answers": b16 == b1,
           "identical_fraction": sum(x == y for x, y in zip(b16, b1)) / n_q,
           "identical_tokens_fraction": (sum(u == v for x, y in zip(b16, b1) for u, v in zip(x, y))
                                         / (n_q * new)),
           "answers_stable_across_repeats": stable,
           "answer_lengths": sorted({len(x) for x in b16 + b1}),
           "distinct_answers": len({tuple(x) for x in b16})}
    for a in arms:
        med = statistics.median(times[a])
        out[a] = {"questions_per_s": n_q / med, "new_tokens_per_s": n_q * new / med, "s": times[a],
                  "warmup_s": times[a + "_warmup"]}
    out["speedup"] = out[f"batch_{bs}"]["questions_per_s"] / out["batch_1"]["questions_per_s"]
    out["speedup_paired"] = statistics.median(y / x for x, y in zip(times[f"batch_{bs}"], times["batch_1"]))
    if run.cuda:
        out["max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


class _StepTimer:
    """Lightning callback: wall time (device-synchronised) and loss of every training batch."""

    def __new__(cls, run: Run):
        import lightning as L

        class StepTimer(L.Callback):
            def __init__(self) -> None:
                self.steps: list[float] = []
                self.losses: list[float] = []
                self._t = 0.0

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                run.sync()
                self._t = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                run.sync()
                self.steps.append(time.perf_counter() - self._t)
                loss = outputs["loss"] if isinstance(outputs, dict) else outputs
                self.losses.append(float(loss.detach()) if loss is not None else float("nan"))

        return StepTimer()


def _strategy_node(name: str):
    """``cfg.strategy`` of ``conf/train.yaml`` composed with ``strategy=<name>`` (the project's config)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=[f"strategy={name}"]).strategy


def section_deepspeed(run: Run, stage: int) -> dict:
    """``--ds-steps`` steps of ``--ds-arm`` through ``Trainer(strategy=DeepSpeedStrategy(...))``."""
    import lightning as L
    from hydra.utils import instantiate
    from torch.utils.data import DataLoader, Dataset

    from llava_san.distributed.zero3 import is_partitioned
    from llava_san.module import LlavaSanModule

    s, args = run.shape, run.args
    name = s["zero3"] if stage == 3 else "deepspeed_zero2"
    node = _strategy_node(name)
    strategy = instantiate(node)
    batch_size = args.ds_batch or s["ds_batch"]
    seq_len = args.seq_len or s["seq_len"]
    # the batches come from the model's config only (the model itself is built inside fit)
    from llava_san.models.tiny import TinyLlavaSpec, build_tiny_processor, tiny_llava_config

    spec = TinyLlavaSpec(**s["spec"])
    config = tiny_llava_config(spec, build_tiny_processor(spec))
    batches = [make_batch(config, batch_size, seq_len, args.answer_frac, 20 + i)
               for i in range(args.ds_steps)]

    class Samples(Dataset):
        def __len__(self) -> int:
            return batch_size * len(batches)

        def __getitem__(self, i: int) -> dict:
            b = batches[i // batch_size]
            return {k: v[i % batch_size] for k, v in b.items()}

    build = {}

    def factory():
        t = time.perf_counter()
        built = build_random_llava(run, dtype=run.dtype, seed=2)
        run.sync()
        build["s"] = time.perf_counter() - t
        return built

    module = LlavaSanModule(factory, adapter=recipe(run, args.ds_arm), optim=optim_config(args.ds_arm),
                            train_projector=True, gradient_checkpointing=True)
    timer = _StepTimer(run)
    precision = args.ds_precision or ("bf16-mixed" if run.cuda and run.dtype == torch.bfloat16 else "32-true")
    trainer = L.Trainer(accelerator="gpu" if run.cuda else "cpu", devices=1, strategy=strategy,
                        precision=precision, max_steps=args.ds_steps, logger=False,
                        enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, use_distributed_sampler=False, callbacks=[timer])
    loader = DataLoader(Samples(), batch_size=batch_size, shuffle=False, num_workers=0)
    if run.cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    fit_s = time.perf_counter() - t
    zero = strategy.config.get("zero_optimization", {})
    out = {
        "strategy_config": f"conf/strategy/{name}.yaml", "arm": args.ds_arm, "precision": precision,
        "zero_stage": zero.get("stage"), "batch": batch_size, "seq_len": seq_len,
        "bf16": strategy.config.get("bf16"),
        "resolved": {k: zero.get(k) for k in ("reduce_bucket_size", "stage3_prefetch_bucket_size",
                                              "stage3_param_persistence_threshold") if k in zero},
        "global_step": trainer.global_step, "steps_s": timer.steps, "losses": timer.losses,
        "model_build_s": build.get("s"), "fit_s": fit_s,
        # fit outside the steps: model build, adapters, deepspeed.initialize, teardown (model to the CPU)
        "fit_outside_steps_s": fit_s - sum(timer.steps),
        "engine": type(trainer.strategy.model).__name__,
        "partitioned_params": sum(1 for p in module.model.parameters() if is_partitioned(p)),
        "success": trainer.global_step == args.ds_steps and len(timer.losses) == args.ds_steps
        and all(math.isfinite(v) for v in timer.losses),
    }
    if run.cuda:
        out["max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
    if timer.steps:
        out["tokens_per_s_last_step"] = batch_size * seq_len / timer.steps[-1]
    # release the engine, its optimizer and the model before the next section (fit has torn down)
    del trainer, module, strategy, loader
    run.free()
    return out


def summary(sections: dict) -> dict:
    """The headline numbers of every section that ran (None where a section failed or was not run)."""
    def get(section: str, *keys: str) -> Any:
        node = sections.get(section)
        for k in keys:
            if not isinstance(node, dict) or "error" in node and k != "error":
                return None
            node = node.get(k)
        return node

    arms = get("train", "arms") or {}
    return {
        "tokens_per_s": {a: r.get("tokens_per_s") for a, r in arms.items()},
        "mfu": {a: r.get("mfu") for a, r in arms.items()},
        "peak_allocated_gb": get("train", "max_allocated_gb"),
        "san_lora/lora_speed_paired": get("train", "ratios", "san_lora/lora", "speed_paired"),
        "san_dora/dora_speed_paired": get("train", "ratios", "san_dora/dora", "speed_paired"),
        "san_lora/lora_step_memory": get("train", "ratios", "san_lora/lora", "step_memory"),
        "san_dora/dora_step_memory": get("train", "ratios", "san_dora/dora", "step_memory"),
        "bf16_within_bounds": get("bf16", "within_bounds"),
        "generation_speedup": get("generation", "speedup_paired"),
        "generation_identical_answers": get("generation", "identical_answers"),
        "zero3_success": get("zero3", "success"),
        "zero2_success": get("zero2", "success"),
    }


RUNNERS: dict[str, Callable[[Run], dict]] = {
    "env": section_env,
    "train": section_train,
    "bf16": section_bf16,
    "generation": section_generation,
    "zero3": lambda run: section_deepspeed(run, 3),
    "zero2": lambda run: section_deepspeed(run, 2),
}


# ==============================================================================================
# main
# ==============================================================================================
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="small shapes on the CPU (the test suite's run)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is visible")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS),
                   help=f"any of {', '.join(SECTIONS)} (space or comma separated)")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="the whole run's wall budget (default: 400 s on the 7B shape, 150 s with --tiny)")
    p.add_argument("--out", default=None, help="also write the JSON here (after every section)")
    p.add_argument("--watchdog-grace-s", type=float, default=30.0,
                   help="past the budget + this, print the JSON so far and exit 124 (a hung section)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--batch", type=int, default=None, help="train section batch (7B: 8)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence, image tokens included (7B: 2048)")
    p.add_argument("--answer-frac", type=float, default=0.25, help="share of the text tokens with a label")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds of the train section at most")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32", "float16"],
                   help="weights of the train / generation / DeepSpeed model (7B: bfloat16; --tiny: float32)")
    p.add_argument("--train-precision", default="params", choices=["params", "autocast"],
                   help="16-bit weights in the train section: 'params' casts the adapters too (DeepSpeed's "
                        "bf16 mode, the real runs), 'autocast' keeps them fp32 under autocast (bf16-mixed)")
    p.add_argument("--attn", default="sdpa", help="attn_implementation: sdpa, flash_attention_2, eager")
    p.add_argument("--gen-questions", type=int, default=None)
    p.add_argument("--gen-batch", type=int, default=16)
    p.add_argument("--gen-new-tokens", type=int, default=None)
    p.add_argument("--gen-repeats", type=int, default=None)
    p.add_argument("--ds-arm", default="san_dora", choices=list(ARMS))
    p.add_argument("--ds-steps", type=int, default=2)
    p.add_argument("--ds-batch", type=int, default=None, help="DeepSpeed sections' batch (7B: 4)")
    p.add_argument("--ds-precision", default=None, choices=["bf16-mixed", "32-true"],
                   help="Trainer precision of the DeepSpeed sections (default: bf16-mixed on a GPU with "
                        "bf16 weights (conf/trainer/gpu.yaml), else 32-true)")
    args = p.parse_args(argv)
    args.sections = [x for v in args.sections for x in v.split(",") if x]
    bad = [x for x in args.sections if x not in SECTIONS]
    if bad:
        p.error(f"unknown sections {bad}; choose from {list(SECTIONS)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.tiny or args.cpu or not torch.cuda.is_available():
        args.cpu = True
        # DeepSpeed's CPU accelerator (gloo), before deepspeed is imported, as the CPU tests do
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _stdout_to_stderr()
    _quiet()
    run = Run(args)
    run.result = {"benchmark": "gpu_check", "shape": "tiny" if args.tiny else "llava-1.5-7b",
                  "device": str(run.device), "gpu": gpu_name(run), "time_budget_s": run.budget,
                  "config": {k: v for k, v in vars(args).items()}, "model": dict(run.shape["spec"],
                  vocab_rows=run.shape["vocab_rows"], lora_r=run.shape["rank"], lora_alpha=run.shape["alpha"],
                  lora_dropout=run.shape["dropout"]), "sections": {}}
    watchdog = _watchdog(run, grace_s=args.watchdog_grace_s)
    order = [x for x in SECTIONS if x in args.sections]
    for i, name in enumerate(order):
        left = run.deadline - time.perf_counter()
        weights = sum(SHARES[x] for x in order[i:])
        run.section_deadline = time.perf_counter() + max(left, 0.0) * SHARES[name] / weights
        run.result["running"] = name
        t = time.perf_counter()
        try:
            res = RUNNERS[name](run)
        except Exception as err:  # noqa: BLE001 - one section's failure is recorded, the others run
            res = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}
            run.free()
        res["section_s"] = time.perf_counter() - t
        run.result["sections"][name] = res
        if name == "generation" or ("generation" not in order[i + 1:] and run._base is not None):
            run.drop_base()  # the shared base is used by train and generation only
        run.result.pop("running", None)
        write_out(run)
    env = run.result["sections"].get("env")
    if isinstance(env, dict) and "error" not in env:
        env["attn_implementation"] = run.attn_implementation
    run.result["errors"] = [n for n, r in run.result["sections"].items() if "error" in r]
    run.result["summary"] = summary(run.result["sections"])
    watchdog.cancel()
    write_out(run, final=True)
    return run.result


if __name__ == "__main__":
    sys.exit(1 if main()["errors"] else 0)  # the JSON is printed either way

"""SAN in bf16 on the CPU, against the same computation in fp32 (the GPU recipe: bf16-mixed / DeepSpeed bf16).

Two ways a real run meets bf16, each on SAN-LoRA and SAN-DoRA (random non-zero LoRA ``B``, so γ is far
from 1 and both frozen-path implementations, weight side and activation side, are used):

* **autocast** (Lightning's ``bf16-mixed`` without DeepSpeed): fp32 weights, forward under
  ``torch.autocast("cpu", bfloat16)``, backward outside it;
* **bf16 parameters** (DeepSpeed's ``bf16`` mode: every parameter cast to bf16, fp32 buffers kept).

Invariants: no dtype error; the loss (fp32, as ``causal_lm_loss`` returns it) within 1 % of fp32's; the
batch γ of every SAN layer within 0.005 of fp32's on average over its channels, 0.1 at most (γ is pooled
in fp32 from bf16 activations; a channel with a small Σh² is ill-conditioned); γ̄ stays an fp32 buffer and
its EMA step matches fp32's; gradients within 10 % (relative L2) of fp32's. A bf16 cast of the whole model
(``model.to(torch.bfloat16)``, Lightning's ``bf16-true``) keeps γ̄ in fp32: in bf16 the EMA's 1 % updates
would round away (γ̄ would stay at 1).
"""
import pytest
import torch
from peft import LoraConfig

from llava_san.models import TinyLlavaSpec, build_tiny_llava
from llava_san.peft import (
    LLAMA_MODULE_TYPES,
    SanConfig,
    get_san_model,
    get_san_state,
    san_layers,
    set_gamma_logging,
)
from llava_san.training.loss import causal_lm_loss

SPEC = TinyLlavaSpec(image_size=32, patch_size=8)  # 16 image tokens
#: bf16 has 8 significant bits (unit roundoff 2^-8 = 0.4 %). γ of a channel whose Σh² is small (o_proj of the
#: random model) is ill-conditioned: its max error is ~10x the mean's.
BOUNDS = {"loss_rel": 1e-2, "gamma_mean_abs": 5e-3, "gamma_max_abs": 0.1, "ema_step_abs": 1e-3,
          "grad_rel": 0.1}


def make(dora: bool, weight_side, propagation: str = "blockwise"):
    model, processor = build_tiny_llava(SPEC, seed=0)  # fp32
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, use_dora=dora,
                      target_modules=list(LLAMA_MODULE_TYPES))
    torch.manual_seed(0)  # LoRA A's init
    model = get_san_model(model, lora, SanConfig(propagation=propagation, weight_side_scaling=weight_side))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # ‖s·B A‖ = 0.3·‖W‖ in every layer: adapters (and γ) far from trivial
        for layer in san_layers(model):
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            B.copy_(torch.randn(B.shape, generator=g))
            delta = layer.scaling["default"] * (B @ A)
            B.mul_(0.3 * layer.get_base_layer().weight.norm() / delta.norm())
    model.train()
    set_gamma_logging(model, True)  # every SAN layer computes γ (not only the sources)
    return model, processor


def make_batch(model):
    cfg = model.base_model.model.config
    g = torch.Generator().manual_seed(2)
    n_img, n_text = SPEC.image_tokens, 40
    text = torch.randint(3, min(cfg.image_token_id, cfg.pad_token_id), (2, n_text), generator=g)
    ids = torch.cat([torch.ones(2, 1, dtype=torch.long), torch.full((2, n_img), cfg.image_token_id), text], 1)
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0  # padding: γ pools over the real tokens only
    ids[1, -5:] = cfg.pad_token_id
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, : 1 + n_img + n_text // 2] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "pixel_values": torch.randn(2, 3, SPEC.image_size, SPEC.image_size, generator=g)}


def step(model, batch, autocast: bool) -> dict:
    """One train-mode forward + backward from γ̄ = 1: loss, batch γ, γ̄ and the gradients (as fp32)."""
    layers = san_layers(model)
    for layer in layers:
        layer.san_gamma_ema.fill_(1.0)
    model.zero_grad(set_to_none=True)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        loss = causal_lm_loss(model, batch)
    loss.backward()
    state = get_san_state(model)
    assert all(layer._san.batch_fid == state.forward_id for layer in layers)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for n, p in trained:  # every trained tensor has a finite gradient in its own dtype
        assert p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all(), n
    return {"loss": loss, "gamma": [layer._san.batch_gamma.detach() for layer in layers],
            "ema": [layer.san_gamma_ema.detach().clone() for layer in layers],
            "grads": {n: p.grad.float() for n, p in trained}}


def assert_close_to(ref: dict, out: dict, loss_rel=BOUNDS["loss_rel"]) -> None:
    assert out["loss"].dtype == torch.float32
    assert abs(out["loss"].item() - ref["loss"].item()) / abs(ref["loss"].item()) < loss_rel
    assert max(float((g - 1).abs().max()) for g in ref["gamma"]) > 0.05  # γ is not trivially 1
    for g16, g32 in zip(out["gamma"], ref["gamma"]):
        assert g16.dtype == torch.float32  # pooled in fp32 (docs/san.md §1)
        assert float((g16 - g32).abs().mean()) < BOUNDS["gamma_mean_abs"]
        assert float((g16 - g32).abs().max()) < BOUNDS["gamma_max_abs"]
    for e16, e32 in zip(out["ema"], ref["ema"]):
        assert e16.dtype == torch.float32  # γ̄ stays an fp32 buffer
        assert float((e16 - e32).abs().max()) < BOUNDS["ema_step_abs"]
    num = sum(float((out["grads"][n] - g).norm() ** 2) for n, g in ref["grads"].items()) ** 0.5
    den = sum(float(g.norm() ** 2) for g in ref["grads"].values()) ** 0.5
    assert num / den < BOUNDS["grad_rel"]
    for n, g in ref["grads"].items():  # and parameter by parameter (LoRA A/B, DoRA m, projector)
        if float(g.norm()) > 0:
            assert float((out["grads"][n] - g).norm() / g.norm()) < 2 * BOUNDS["grad_rel"], n


@pytest.mark.parametrize("weight_side", [True, False])
@pytest.mark.parametrize("dora", [False, True], ids=["san_lora", "san_dora"])
def test_autocast_bf16_matches_fp32(dora, weight_side):
    model, _ = make(dora, weight_side)
    batch = make_batch(model)
    ref = step(model, batch, autocast=False)
    out = step(model, batch, autocast=True)
    assert_close_to(ref, out)


@pytest.mark.parametrize("dora", [False, True], ids=["san_lora", "san_dora"])
def test_autocast_bf16_layerwise_keeps_gamma_gradient(dora):
    """Layerwise propagation keeps γ's graph within a block (its gradient flows through _raw_gamma,
    which runs outside autocast in fp32)."""
    model, _ = make(dora, "auto", propagation="layerwise")
    batch = make_batch(model)
    assert_close_to(step(model, batch, autocast=False), step(model, batch, autocast=True))


@pytest.mark.parametrize("weight_side", [True, False])
@pytest.mark.parametrize("dora", [False, True], ids=["san_lora", "san_dora"])
def test_bf16_parameters_fp32_buffers_like_deepspeed(dora, weight_side):
    """DeepSpeed's bf16 mode casts the parameters (adapters included) and keeps fp32 buffers."""
    model, _ = make(dora, weight_side)
    batch = make_batch(model)
    ref = step(model, batch, autocast=False)
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    batch16 = dict(batch, pixel_values=batch["pixel_values"].to(torch.bfloat16))
    out = step(model, batch16, autocast=False)
    # bf16 parameters round the adapters and the base themselves: a looser loss bound than autocast's
    assert_close_to(ref, out, loss_rel=2 * BOUNDS["loss_rel"])


@pytest.mark.parametrize("dora", [False, True], ids=["san_lora", "san_dora"])
def test_model_to_bf16_keeps_gamma_ema_fp32(dora):
    model, _ = make(dora, "auto")
    batch = make_batch(model)
    for layer in san_layers(model):
        layer.san_gamma_ema.fill_(1.0 + 1e-3)  # not representable in bf16
    model.to(torch.bfloat16)
    layers = san_layers(model)
    assert {layer.san_gamma_ema.dtype for layer in layers} == {torch.float32}
    assert all(torch.equal(layer.san_gamma_ema, torch.full_like(layer.san_gamma_ema, 1.0 + 1e-3))
               for layer in layers)  # the values were kept, not rounded through bf16
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    batch16 = dict(batch, pixel_values=batch["pixel_values"].to(torch.bfloat16))
    out = step(model, batch16, autocast=False)
    assert all(e.dtype == torch.float32 for e in out["ema"])
    for e, g in zip(out["ema"], out["gamma"]):  # γ̄ = 0.99·1 + 0.01·γ in fp32, nothing rounded away
        torch.testing.assert_close(e, 0.99 + 0.01 * g, rtol=0, atol=1e-6)
    # steps that a bf16 buffer would lose (1 ± δ rounds to 1 for δ < 2^-9) are kept
    small = sum(int(((e - 1).abs() < 2 ** -9).logical_and((e - 1).abs() > 1e-5).sum()) for e in out["ema"])
    assert small > 0
    # eval mode reads γ̄ (cast to the activations' dtype): the model runs end to end in bf16
    model.eval()
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch16.items() if k != "labels"}).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_eval_under_autocast_reads_gamma_ema():
    """Eval mode: targets read their sources' fp32 γ̄, cast to the activations' dtype; bf16 autocast
    logits stay close to fp32's."""
    model, _ = make(True, "auto")
    batch = make_batch(model)
    with torch.no_grad():
        for i, layer in enumerate(san_layers(model)):
            layer.san_gamma_ema.copy_(torch.linspace(0.8, 1.2, layer.san_gamma_ema.numel()).roll(i))
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        ref = model(**inputs).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**inputs).logits
    assert {layer.san_gamma_ema.dtype for layer in san_layers(model)} == {torch.float32}
    keep = batch["attention_mask"].bool()
    err = (out.float() - ref)[keep].norm() / ref[keep].norm()
    assert err < 2e-2

"""SAN's faster CPU paths equal the computations they replace (kept here as references).

* the lsq sums over row blocks (:func:`llava_san.peft.san._lsq_sums_blocked`, no ``(N, out)`` temporary)
  against the plain products-then-sums of the previous ``_raw_gamma``;
* one :class:`_ScaledFrozenLinear` for DoRA's ``x`` and ``drop(x)`` against one call per input and
  against the explicit ``F.linear`` on the scaled weight (values and gradients);
* a whole SAN-DoRA model with dropout: the weight side (one scaled weight for both inputs) against the
  activation side, and both pools against the reference pooling;
* ``SanConfig.fused_gamma``: the ``torch.compile``'d sums against the reference, and a whole model's γ.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig

from llava_san.models import TinyLlavaSpec, build_tiny_llama
from llava_san.peft import SanConfig, get_san_model, san_layers
from llava_san.peft import san as san_mod
from llava_san.peft.san import (
    _lsq_sums_blocked,
    _raw_gamma,
    _ScaledFrozenLinear,
    scaled_weight,
)


def reference_lsq_sums(hp, hh, weights):
    """The previous no-grad lsq sums: widen to fp32 (at least), mask, two products, two sums."""
    acc = torch.promote_types(hh.dtype, torch.float32)
    hp, hh = hp.to(acc), hh.to(acc)
    hk = hh if weights is None else hh * weights
    prod = hp * hk
    num = prod.sum(0)
    den = torch.mul(hk, hh, out=prod).sum(0)
    return num, den


def reference_raw_gamma(hp, hh, weights, cfg):
    num, den = reference_lsq_sums(hp.reshape(-1, hp.shape[-1]), hh.reshape(-1, hh.shape[-1]), weights)
    return torch.where(den >= cfg.eps, num / den.clamp(min=cfg.eps), 1.0)


def activations(n, out, dtype, seed=0, mask_every=0):
    g = torch.Generator().manual_seed(seed)
    hh = torch.randn(n, out, generator=g, dtype=torch.float64)
    hp = hh * (1 + 0.3 * torch.randn(out, generator=g, dtype=torch.float64)) + 0.2 * torch.randn(
        n, out, generator=g, dtype=torch.float64)
    weights = None
    if mask_every:
        acc = torch.promote_types(dtype, torch.float32)
        weights = (torch.arange(n) % mask_every != 0).to(acc).reshape(-1, 1)
    return hp.to(dtype), hh.to(dtype), weights


# (N, out): one block shorter than a block, several blocks with a remainder, exact multiple, wide layer
SHAPES = [(7, 16), (300, 64), (256, 512), (97, 1408), (0, 8)]


@pytest.mark.parametrize("n,out", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mask_every", [0, 3])
def test_blocked_lsq_sums_equal_reference(n, out, dtype, mask_every):
    hp, hh, weights = activations(n, out, dtype, mask_every=mask_every)
    acc = torch.promote_types(dtype, torch.float32)
    num, den = _lsq_sums_blocked(hp, hh, weights, acc)
    ref_num, ref_den = reference_lsq_sums(hp, hh, weights)
    assert num.dtype == den.dtype == acc and num.shape == den.shape == (out,)
    # the same products; only the order of the additions differs: fp32 (fp64) round-off of the sums
    tol = {torch.float64: 1e-12}.get(acc, 2e-6)
    scale = ref_den.abs() + 1e-30  # Σh² bounds |Σh'h| up to the factor γ
    assert ((num - ref_num).abs() / scale).max() <= tol
    assert ((den - ref_den).abs() / scale).max() <= tol


def test_blocked_lsq_sums_small_blocks_and_reused_scratch(monkeypatch):
    """Many tiny blocks (the loop itself) and a scratch buffer reused across calls of other sizes."""
    monkeypatch.setattr(san_mod, "_LSQ_MIN_ROWS", 1)
    monkeypatch.setattr(san_mod, "_LSQ_BLOCK_BYTES", 64)
    for n, out, mask in ((50, 8, 4), (13, 40, 0), (50, 8, 0)):
        hp, hh, w = activations(n, out, torch.float64, seed=n + out, mask_every=mask)
        num, den = _lsq_sums_blocked(hp, hh, w, torch.float64)
        ref = reference_lsq_sums(hp, hh, w)
        torch.testing.assert_close(num, ref[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(den, ref[1], rtol=1e-12, atol=1e-12)


def zero_filled_block_sums(hp, hh, weights, rows):
    """The same row-block fold with zero-filled accumulators and ``addcmul_`` for every block."""
    acc = torch.promote_types(hh.dtype, torch.float32)
    num_acc, den_acc = torch.zeros(rows, hh.shape[1], dtype=acc), torch.zeros(rows, hh.shape[1], dtype=acc)
    for start in range(0, hh.shape[0], rows):
        a, b = hp[start:start + rows], hh[start:start + rows]
        m = a.shape[0]
        b_w = b if weights is None else b * weights[start:start + m]
        num_acc[:m].addcmul_(a, b_w)
        den_acc[:m].addcmul_(b_w, b)
    return num_acc.sum(0), den_acc.sum(0)


@pytest.mark.parametrize("n,out", [(300, 64), (162, 512), (97, 1408), (5, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_every", [0, 3])
def test_first_block_written_not_added_is_bit_identical(n, out, dtype, mask_every):
    """The first block is written into the accumulators instead of added to zeros: bit for bit the same
    sums (0 + a·b == a·b, bf16 factors widened before the product), whatever the scratch held before."""
    hp, hh, weights = activations(n, out, dtype, seed=7, mask_every=mask_every)
    acc = torch.promote_types(dtype, torch.float32)
    rows = min(n, max(san_mod._LSQ_MIN_ROWS, san_mod._LSQ_BLOCK_BYTES // (2 * out * torch.finfo(acc).bits // 8)))
    san_mod._scratch("lsq_acc", 2 * rows * out, acc, hh.device).fill_(float("nan"))  # stale contents
    num, den = _lsq_sums_blocked(hp, hh, weights, acc)
    ref_num, ref_den = zero_filled_block_sums(hp, hh, weights, rows)
    assert torch.equal(num, ref_num) and torch.equal(den, ref_den)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_raw_gamma_no_grad_equals_reference_and_grad_path(dtype):
    """γ of the no-grad CPU path = the previous computation = the autograd (vecdot) path, with padding."""
    cfg = SanConfig()
    hp, hh, w = activations(2 * 40, 96, dtype, mask_every=5)
    hp, hh = hp.reshape(2, 40, 96), hh.reshape(2, 40, 96)
    with torch.no_grad():
        fast = _raw_gamma(hp, hh, w, cfg)
    ref = reference_raw_gamma(hp, hh, w, cfg)
    graph = _raw_gamma(hp.clone().requires_grad_(), hh, w, cfg)  # the differentiable path
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, ref, rtol=3e-6, atol=3e-6)
    torch.testing.assert_close(fast, graph.detach(), rtol=3e-6, atol=3e-6)


def test_dead_channel_still_gives_one():
    cfg = SanConfig()
    hp, hh, _ = activations(64, 8, torch.float32)
    hh[:, 3] = 0
    with torch.no_grad():
        g = _raw_gamma(hp, hh, None, cfg)
    assert g[3] == 1.0


def _inputs(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(12, 20, generator=g, dtype=dtype)
    x1 = torch.randn(3, 5, 20, generator=g, dtype=dtype)
    x2 = torch.randn(3, 5, 20, generator=g, dtype=dtype)
    g_row = 1 + 0.1 * torch.randn(12, generator=g, dtype=dtype)
    g_col = 1 + 0.1 * torch.randn(20, generator=g, dtype=dtype)
    return w, x1, x2, g_row, g_col


@pytest.mark.parametrize("col_grad", [False, True])
def test_two_input_scaled_linear_equals_explicit(col_grad):
    """DoRA's shared scaled weight: values and gradients (x_1, x_2 and g_col) equal F.linear on the
    explicitly scaled weight, and equal one call per input."""
    w, x1, x2, g_row, g_col = _inputs()
    gy1, gy2 = torch.randn(3, 5, 12, dtype=w.dtype), torch.randn(3, 5, 12, dtype=w.dtype)

    def run(fn):
        a, b = x1.clone().requires_grad_(), x2.clone().requires_grad_()
        c = g_col.clone().requires_grad_(col_grad)
        y1, y2 = fn(a, b, c)
        ((y1 * gy1).sum() + (y2 * gy2).sum()).backward()
        return y1.detach(), y2.detach(), a.grad, b.grad, c.grad

    explicit = run(lambda a, b, c: (F.linear(a, scaled_weight(w, g_row, c)), F.linear(b, scaled_weight(w, g_row, c))))
    pair = run(lambda a, b, c: _ScaledFrozenLinear.apply(w, g_row, c, a, b))
    single = run(lambda a, b, c: (_ScaledFrozenLinear.apply(w, g_row, c, a)[0],
                                  _ScaledFrozenLinear.apply(w, g_row, c, b)[0]))
    for got in (pair, single):
        for e, v in zip(explicit, got):
            if e is None:
                assert v is None
            else:
                torch.testing.assert_close(v, e, rtol=1e-12, atol=1e-12)


def test_two_input_scaled_linear_one_output_unused():
    """An output that takes no part in the loss gets no gradient (grads are not materialised)."""
    w, x1, x2, g_row, g_col = _inputs(1)
    a, b = x1.clone().requires_grad_(), x2.clone().requires_grad_()
    y1, _ = _ScaledFrozenLinear.apply(w, g_row, g_col, a, b)
    y1.sum().backward()
    torch.testing.assert_close(a.grad, torch.ones(3, 5, 12, dtype=w.dtype) @ scaled_weight(w, g_row, g_col))
    assert b.grad is None


SPEC = TinyLlavaSpec(text_layers=3, text_hidden=32, text_intermediate=64, text_heads=2, text_kv_heads=2)


def _model(san_cfg, dora, base):
    torch.manual_seed(0)
    model = get_san_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, use_dora=dora),
                          san_cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model.train()


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 700, (2, 40), generator=g)  # 80 tokens >= in_features: the weight side
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


@pytest.mark.parametrize("propagation,dora", [("blockwise", True), ("layerwise", True), ("blockwise", False)])
def test_model_weight_side_with_dropout_equals_activation_side(propagation, dora):
    """With LoRA dropout (DoRA: one scaled weight for x and drop(x)) the weight side gives the loss, γ and
    gradients of the activation side (fp64, the same dropout masks)."""
    base = build_tiny_llama(SPEC, seed=0).to(torch.float64)
    results = []
    for weight_side in (True, False):
        model = _model(SanConfig(propagation=propagation, weight_side_scaling=weight_side), dora, base)
        torch.manual_seed(5)
        loss = model(**_batch()).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        gammas = [layer._san.batch_gamma.detach() for layer in san_layers(model) if layer._san.batch_gamma is not None]
        results.append((loss.detach(), grads, gammas))
    (l0, g0, y0), (l1, g1, y1) = results
    torch.testing.assert_close(l0, l1, rtol=1e-10, atol=1e-12)
    assert len(y0) == len(y1) > 0
    for a, b in zip(y0, y1):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert set(g0) == set(g1)
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], rtol=1e-8, atol=1e-11, msg=n)


@pytest.mark.parametrize("dora", [False, True])
def test_model_gamma_equals_reference_pooling(dora, monkeypatch):
    """A whole fp32 train step: the γ every layer records equals the reference pooling of the same
    forward (the previous code, patched in), within fp32 round-off; the losses are equal."""
    base = build_tiny_llama(SPEC, seed=0)

    def run():
        model = _model(SanConfig(), dora, base)
        torch.manual_seed(5)
        loss = model(**_batch()).loss
        return loss.detach(), [layer._san.batch_gamma.detach() for layer in san_layers(model)
                               if layer._san.batch_gamma is not None]

    loss_new, g_new = run()

    def old_raw_gamma(h_prime, h, weights, cfg):
        if cfg.pool == "lsq" and not (torch.is_grad_enabled() and (h_prime.requires_grad or h.requires_grad)):
            return reference_raw_gamma(h_prime, h, weights, cfg)
        return real(h_prime, h, weights, cfg)

    real = san_mod._raw_gamma
    monkeypatch.setattr(san_mod, "_raw_gamma", old_raw_gamma)
    loss_old, g_old = run()
    assert len(g_new) == len(g_old) > 0
    for a, b in zip(g_new, g_old):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(loss_new, loss_old, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# SanConfig.fused_gamma: the torch.compile'd lsq sums
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,mask_every", [(torch.float32, 3), (torch.float32, 0), (torch.bfloat16, 3)])
def test_compiled_lsq_sums_equal_eager(dtype, mask_every):
    """One compiled kernel (dynamic shapes: several N and out through the same graph) = the reference
    sums within fp32 round-off."""
    compiled = san_mod._lsq_sums_compiled()
    for n, out in ((37, 16), (300, 64), (97, 40)):
        hp, hh, w = activations(n, out, dtype, seed=n, mask_every=mask_every)
        num, den = compiled(hp, hh, w, torch.float32)
        ref_num, ref_den = reference_lsq_sums(hp, hh, w)
        assert num.dtype == den.dtype == torch.float32
        scale = ref_den.abs() + 1e-30
        assert ((num - ref_num).abs() / scale).max() <= 2e-6
        assert ((den - ref_den).abs() / scale).max() <= 2e-6


def test_model_fused_gamma_equals_eager():
    """A whole train step with fused_gamma=True records the γ (and the loss) of the eager path."""
    base = build_tiny_llama(SPEC, seed=0)
    results = []
    for fused in (False, True):
        model = _model(SanConfig(fused_gamma=fused), True, base)
        torch.manual_seed(5)
        loss = model(**_batch()).loss
        results.append((loss.detach(), [layer._san.batch_gamma.detach() for layer in san_layers(model)
                                         if layer._san.batch_gamma is not None]))
    (l0, g0), (l1, g1) = results
    assert len(g0) == len(g1) > 0
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(l0, l1, rtol=1e-5, atol=1e-6)


def test_fused_gamma_config():
    with pytest.raises(ValueError, match="fused_gamma"):
        SanConfig(fused_gamma="yes")
    cfg = SanConfig(fused_gamma=True)
    assert SanConfig.from_dict(cfg.to_dict()).fused_gamma is True
    d = cfg.to_dict()
    del d["fused_gamma"]  # a folder saved before the switch existed loads with the default
    assert SanConfig.from_dict(d).fused_gamma is False

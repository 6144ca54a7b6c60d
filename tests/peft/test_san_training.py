"""Gradients, activation checkpointing, the regulariser, statistics and config validation of SAN."""
import copy

import pytest
import torch
from peft import LoraConfig

from llava_san.models import TinyLlavaSpec, build_tiny_llama
from llava_san.peft import (
    SanConfig,
    get_san_model,
    san_gamma_stats,
    san_layers,
    san_regularization,
    set_gamma_logging,
)

SPEC = TinyLlavaSpec(text_layers=2, text_hidden=32, text_intermediate=64, text_heads=2, text_kv_heads=2)


def make(san_cfg, dora=False, dtype=torch.float64, seed=0):
    base = build_tiny_llama(SPEC, seed=0).to(dtype)
    torch.manual_seed(seed)
    model = get_san_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_dora=dora), san_cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    model.train()
    return model


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 700, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def layer(model, block, path):
    return model.base_model.model.model.layers[block].get_submodule(path)


def loss_fn(model, frozen_gamma=None):
    """Loss of one train-mode forward. ``frozen_gamma = (layer, value)`` replaces that layer's batch γ by
    a constant right after it is computed (so its consumers see a constant)."""
    handle = None
    if frozen_gamma is not None:
        src, value = frozen_gamma

        def hook(mod, inp, out):
            mod._san.batch_gamma = value

        handle = src.register_forward_hook(hook)
    try:
        b = batch()
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # fp64
        # the loss in fp64 too (transformers' own loss upcasts to fp32 only, too coarse for finite differences)
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1), ignore_index=-100)
    finally:
        if handle is not None:
            handle.remove()


def finite_difference(model, param, idx, frozen_gamma=None, eps=1e-3):
    """Central difference. eps is not tiny because LlamaRMSNorm computes in fp32 even in an fp64 model."""
    with torch.no_grad():
        orig = param[idx].item()
        param[idx] = orig + eps
        up = loss_fn(model, frozen_gamma).item()
        param[idx] = orig - eps
        down = loss_fn(model, frozen_gamma).item()
        param[idx] = orig
    return (up - down) / (2 * eps)


IDX = [(0, 0), (5, 1), (17, 3)]


def test_gradient_flows_within_block():
    """layerwise v→o inside the last block: autograd (which keeps γ's graph) matches finite differences,
    which see the full effect of v's adapter on o through γ."""
    model = make(SanConfig(propagation="layerwise"))
    v1 = layer(model, 1, "self_attn.v_proj")
    param = v1.lora_B["default"].weight
    model.zero_grad()
    loss_fn(model).backward()
    assert v1._san.batch_gamma.grad_fn is not None  # kept its graph: o_proj consumes it in-block
    for idx in IDX:
        assert param.grad[idx].item() == pytest.approx(finite_difference(model, param, idx), rel=2e-3, abs=2e-5)


def test_gradient_does_not_cross_blocks_when_detached():
    """detach_cross_block: down(0)'s γ reaches q,k,v(1) as a constant. Autograd equals the finite
    difference of a model where that γ is frozen, and differs from the full derivative."""
    model = make(SanConfig(propagation="layerwise", detach_cross_block=True))
    down0 = layer(model, 0, "mlp.down_proj")
    param = down0.lora_B["default"].weight
    model.zero_grad()
    loss_fn(model).backward()
    assert down0._san.batch_gamma.grad_fn is None  # no consumer keeps its gradient: computed under no_grad
    frozen = (down0, down0._san.batch_gamma.detach().clone())
    full = []
    for idx in IDX:
        assert param.grad[idx].item() == pytest.approx(finite_difference(model, param, idx, frozen), rel=2e-3, abs=2e-5)
        full.append(finite_difference(model, param, idx))
    assert any(abs(f - param.grad[i].item()) > 0.1 * abs(f) for f, i in zip(full, IDX))

    # without detaching, the gradient is the full derivative
    model = make(SanConfig(propagation="layerwise", detach_cross_block=False))
    param = layer(model, 0, "mlp.down_proj").lora_B["default"].weight
    model.zero_grad()
    loss_fn(model).backward()
    for idx, f in zip(IDX, full):
        assert param.grad[idx].item() == pytest.approx(f, rel=2e-3, abs=2e-5)


@pytest.mark.parametrize("propagation,dora", [("blockwise", True), ("layerwise", False), ("layerwise", True)])
def test_activation_checkpointing_same_loss_grads_and_ema(propagation, dora):
    """Recomputation under activation checkpointing gives the same loss, gradients and γ̄ (updated once)."""
    results = []
    for ckpt in (False, True):
        model = make(SanConfig(propagation=propagation, ema=0.5), dora=dora)
        if ckpt:
            model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.base_model.model.enable_input_require_grads()
        model.train()
        model.zero_grad()
        loss = model(**batch()).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        emas = [l.san_gamma_ema.clone() for l in san_layers(model)]
        results.append((loss.detach(), grads, emas))
    (l0, g0, e0), (l1, g1, e1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-12)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-9, atol=1e-12, msg=n)
    for a, b in zip(e0, e1):
        assert torch.equal(a, b)


def test_ema_updates_once_per_forward_also_under_no_grad():
    model = make(SanConfig(ema=0.5))
    l0 = layer(model, 0, "self_attn.q_proj")
    with torch.no_grad():
        model(**batch())
    g1 = l0._san.batch_gamma.clone()
    torch.testing.assert_close(l0.san_gamma_ema, (0.5 + 0.5 * g1).float())
    model(**batch(1))
    g2 = l0._san.batch_gamma.clone()
    torch.testing.assert_close(l0.san_gamma_ema, (0.5 * (0.5 + 0.5 * g1) + 0.5 * g2).float())
    ema = l0.san_gamma_ema.clone()
    model.eval()
    model(input_ids=batch()["input_ids"])  # eval: no γ, no update
    assert torch.equal(l0.san_gamma_ema, ema)


def test_regularizer_matches_formula_and_has_gradient():
    model = make(SanConfig(reg_lambda=0.3))
    loss = model(**batch()).loss
    reg = san_regularization(model)
    layers = san_layers(model)
    want = 0.3 * torch.stack([((l._san.batch_gamma.detach() - 1) ** 2).sum() for l in layers]).mean()
    assert all(l._san.batch_gamma is not None for l in layers)  # reg > 0: every layer computes γ
    torch.testing.assert_close(reg.detach(), want)
    (loss + reg).backward()
    model.zero_grad()
    model(**batch())
    san_regularization(model).backward()  # the regulariser alone reaches the adapters through γ
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    # reg_lambda = 0 -> a zero scalar
    assert san_regularization(make(SanConfig())).item() == 0.0


def test_gamma_stats_per_module_type():
    model = make(SanConfig(clamp=(0.99, 1.01)))
    set_gamma_logging(model, True)
    model(**batch())
    stats = san_gamma_stats(model)
    for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        gs = torch.cat([l._san.batch_gamma.float() for l in san_layers(model) if l._san.mtype == t])
        assert stats[f"san/{t}/mean"] == pytest.approx(gs.mean().item(), rel=1e-6)
        assert stats[f"san/{t}/min"] == pytest.approx(gs.min().item())
        assert stats[f"san/{t}/max"] == pytest.approx(gs.max().item())
        assert 0.99 <= stats[f"san/{t}/min"] <= stats[f"san/{t}/max"] <= 1.01
        assert 0.0 <= stats[f"san/{t}/clamped"] <= 1.0
    assert sum(stats[k] for k in stats if k.endswith("/clamped")) > 0  # a narrow clamp clips something


def test_random_pairing_is_seeded_and_valid():
    a = make(SanConfig(propagation="random", seed=3))
    b = make(SanConfig(propagation="random", seed=3))
    c = make(SanConfig(propagation="random", seed=4))
    pa, pb, pc = a._san_state.cfg.pairs, b._san_state.cfg.pairs, c._san_state.cfg.pairs
    assert pa == pb and pa != pc
    order = [l._san.name for l in san_layers(a)]
    out = {l._san.name: l.base_layer.out_features for l in san_layers(a)}
    for src, tgt, kind in pa:
        assert kind == "row" and order.index(src) < order.index(tgt) and out[src] == out[tgt]
    # the first layer has no earlier candidate
    assert order[0] not in {t for _, t, _ in pa}


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(propagation="sideways"), "propagation"),
        (dict(pool="median"), "pool"),
        (dict(modules=["q_proj", "lm_head"]), "modules"),
        (dict(modules="q_proj"), "modules"),
        (dict(clamp=(1.2, 2.0)), "clamp"),
        (dict(clamp=(0.0,)), "clamp"),
        (dict(eps=0), "eps"),
        (dict(ema=1.0), "ema"),
        (dict(reg_lambda=-1), "reg_lambda"),
        (dict(dora_norm="other"), "dora_norm"),
        (dict(detach_cross_block="yes"), "detach_cross_block"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"SanConfig.{field}"):
        SanConfig(**kwargs)


def test_config_roundtrip_and_module_order():
    cfg = SanConfig(modules=["down_proj", "q_proj"], clamp=[0.5, 1.5])
    assert cfg.modules == ("q_proj", "down_proj") and cfg.clamp == (0.5, 1.5)
    assert SanConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown SanConfig fields"):
        SanConfig.from_dict({"propagaton": "off"})


def test_modules_subset_and_pairs_need_both_ends():
    """Only layers of types in `modules` take part; a pair is active only if both ends take part."""
    model = make(SanConfig(propagation="layerwise", modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]))
    names = {l._san.name.split(".")[-1] for l in san_layers(model)}
    assert names == {"q_proj", "k_proj", "v_proj", "up_proj", "down_proj"}
    pairs = model._san_state.cfg.pairs
    # v->o and o->up are gone (o does not take part); up->down and down(0)->q,k,v(1) remain
    assert sorted((s.split(".")[-1], t.split(".")[-1]) for s, t, _ in pairs) == [
        ("down_proj", "k_proj"), ("down_proj", "q_proj"), ("down_proj", "v_proj"),
        ("up_proj", "down_proj"), ("up_proj", "down_proj")]
    # o_proj is still a plain LoRA layer
    assert type(layer(model, 0, "self_attn.o_proj")).__name__ == "Linear"


def test_grouped_query_v_to_o_is_skipped():
    spec = TinyLlavaSpec(text_layers=2, text_hidden=32, text_intermediate=64, text_heads=4, text_kv_heads=2)
    base = build_tiny_llama(spec)
    model = get_san_model(base, LoraConfig(r=2, lora_alpha=4), SanConfig(propagation="layerwise"))
    assert not any(s.endswith("v_proj") and t.endswith("o_proj") for s, t, _ in model._san_state.cfg.pairs)
    assert any(s.endswith("o_proj") and t.endswith("up_proj") for s, t, _ in model._san_state.cfg.pairs)


@pytest.mark.parametrize("propagation,dora", [("blockwise", False), ("blockwise", True), ("layerwise", True),
                                              ("random", False)])
def test_weight_side_scaling_equals_activation_scaling(propagation, dora):
    """The custom autograd path (scaled weight, made transiently) and the module-call path (scaled
    activations, used under ZeRO-3) give the same loss, γ and gradients."""
    results = []
    for weight_side in (True, False):
        model = make(SanConfig(propagation=propagation, ema=0.5, weight_side_scaling=weight_side), dora=dora)
        model.zero_grad()
        loss = loss_fn(model)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        gammas = [l._san.batch_gamma.detach().clone() for l in san_layers(model) if l._san.batch_gamma is not None]
        results.append((loss.detach(), grads, gammas))
    (l0, g0, y0), (l1, g1, y1) = results
    torch.testing.assert_close(l0, l1, rtol=1e-10, atol=1e-12)
    for a, b in zip(y0, y1):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], rtol=1e-8, atol=1e-11, msg=n)

"""SAN computes what the spec says: checked against peft and against independent computations."""
import copy

import pytest
import torch
from peft import LoraConfig

from llava_san.models import TinyLlavaSpec, build_tiny_llama, build_tiny_llava
from llava_san.peft import SanConfig, get_san_model, san_layers, set_gamma_logging
from llava_san.peft.san_model import LAYERWISE_IN_BLOCK, LAYERWISE_NEXT_BLOCK

SPEC = TinyLlavaSpec(text_layers=3)


def lora_cfg(dora: bool, dropout: float = 0.0) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, use_dora=dora)


def make(base, lora, san=None, seed=0):
    """Fresh copy of ``base`` with LoRA/DoRA (+SAN); the adapter init is seeded so arms start equal."""
    torch.manual_seed(seed)
    return get_san_model(copy.deepcopy(base), lora, san)


def batch(seed=0, b=2, t=10, vocab=700, pad_last=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    if pad_last:
        mask[-1, -pad_last:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def randomize_adapters(model, seed=1, scale=0.05):
    """Give every LoRA B (and DoRA magnitude) non-trivial values so γ != 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))


def train_steps(model, steps=4, lr=1e-2, seed=0):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for i in range(steps):
        loss = model(**batch(seed + i)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("propagation,pool", [("blockwise", "lsq"), ("layerwise", "lsq"), ("random", "mean"),
                                              ("blockwise", "mean")])
def test_init_logits_equal_peft(dora, propagation, pool):
    """At init (B = 0, m = ‖W‖) SAN is exactly LoRA (bit-equal) / DoRA (1e-6 relative), train and eval."""
    base, proc = build_tiny_llava(SPEC, seed=0)
    from PIL import Image

    enc = proc(images=[Image.new("RGB", (64, 64), (200, 10, 10))] * 2,
               text=["USER: <image>\nwhat color is the shape? ASSISTANT: red", "USER: <image>\nhi ASSISTANT:"],
               return_tensors="pt", padding=True)
    ref = make(base, lora_cfg(dora, dropout=0.1))
    san = make(base, lora_cfg(dora, dropout=0.1), SanConfig(propagation=propagation, pool=pool))
    for train in (True, False):
        ref.train(train)
        san.train(train)
        torch.manual_seed(5)
        a = ref(**enc).logits
        torch.manual_seed(5)
        b = san(**enc).logits
        if dora:
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(a, b)
    if train:
        for layer in san_layers(san):
            if layer._san.batch_gamma is not None:
                assert torch.equal(layer._san.batch_gamma, torch.ones_like(layer._san.batch_gamma))


@pytest.mark.parametrize("dora", [False, True])
def test_off_trains_exactly_like_peft(dora):
    """propagation=off: same losses and same adapter weights as stock peft over several AdamW steps."""
    base = build_tiny_llama(SPEC, seed=0)
    ref = make(base, lora_cfg(dora, dropout=0.1))
    san = make(base, lora_cfg(dora, dropout=0.1), SanConfig(propagation="off"))
    torch.manual_seed(0)
    la = train_steps(ref)
    torch.manual_seed(0)
    lb = train_steps(san)
    assert torch.equal(la, lb)
    pa = dict(ref.named_parameters())
    for name, p in san.named_parameters():
        assert torch.equal(p, pa[name]), name
    # γ was computed and tracked in every layer (logged), though never applied
    assert all(not torch.equal(layer.san_gamma_ema, torch.ones_like(layer.san_gamma_ema)) for layer in san_layers(san))


# ------------------------------------------------------------------------------------------
# Independent computation: explicit rescaled weights, written from W, A, B, m
# ------------------------------------------------------------------------------------------
def explicit_weight(layer, g_row, g_col, dora, scaled_norm=False):
    """W' of one layer from its raw tensors: diag(g_row) W diag(g_col) (+ LoRA / DoRA)."""
    W = layer.base_layer.weight.detach().double()
    A = layer.lora_A["default"].weight.detach().double()
    B = layer.lora_B["default"].weight.detach().double()
    s = layer.scaling["default"]
    Ws = W * (g_row.double()[:, None] if g_row is not None else 1) * (g_col.double()[None, :] if g_col is not None else 1)
    if not dora:
        return Ws + s * B @ A
    m = layer.lora_magnitude_vector["default"].weight.detach().double()
    norm = torch.linalg.norm((Ws if scaled_norm else W) + s * B @ A, dim=1)
    return (m / norm)[:, None] * (Ws + s * B @ A)


def expected_sources(names, propagation):
    """The spec's pairing for the tiny model (block, type) -> (source name, kind), written out by hand."""
    pairs = {}
    for n in names:
        block, mtype = int(n.split(".")[2]), n.split(".")[-1]
        if propagation == "blockwise" and block > 0:
            pairs[n] = (n.replace(f"layers.{block}.", f"layers.{block - 1}."), "row")
        if propagation == "layerwise":
            if mtype in LAYERWISE_IN_BLOCK:
                src_t = LAYERWISE_IN_BLOCK[mtype]
                pairs[n] = (next(x for x in names if x.startswith(f"model.layers.{block}.") and x.endswith(src_t)), "col")
            elif mtype in LAYERWISE_NEXT_BLOCK and block > 0:
                pairs[n] = (f"model.layers.{block - 1}.mlp.down_proj", "col")
    return pairs


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("propagation", ["blockwise", "layerwise"])
def test_eval_forward_equals_explicitly_rescaled_model(dora, propagation):
    """eval(): each target uses its source's γ̄; the logits equal a plain Llama whose weights were
    rescaled explicitly from W, A, B, m (fp64)."""
    base = build_tiny_llama(SPEC, seed=0)
    san = make(base, lora_cfg(dora), SanConfig(propagation=propagation))
    randomize_adapters(san)
    g = torch.Generator().manual_seed(3)
    layers = {l._san.name: l for l in san_layers(san)}
    for l in layers.values():  # arbitrary γ̄ values
        l.san_gamma_ema.copy_(1 + 0.3 * torch.randn(l.san_gamma_ema.shape, generator=g))
    assert {t: (s, k) for s, t, k in san._san_state.cfg.pairs} == expected_sources(list(layers), propagation)

    ref = copy.deepcopy(base).double()
    sources = expected_sources(list(layers), propagation)
    with torch.no_grad():
        for name, layer in layers.items():
            src, kind = sources.get(name, (None, None))
            g_src = layers[src].san_gamma_ema if src else None
            w = explicit_weight(layer, g_src if kind == "row" else None, g_src if kind == "col" else None, dora)
            ref.get_submodule(name).weight.copy_(w)
    b = batch()
    san.eval()
    got = san(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.double()
    want = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def lsq_gamma(h_prime, h, mask, lo=0.0, hi=2.0, eps=1e-12):
    """γ_j = Σ_t h'_tj h_tj / Σ_t h_tj² over the unmasked tokens, written independently of the library."""
    keep = mask.reshape(-1).bool()
    hp, hh = h_prime.reshape(-1, h.shape[-1])[keep].double(), h.reshape(-1, h.shape[-1])[keep].double()
    num, den = (hp * hh).sum(0), (hh * hh).sum(0)
    return torch.where(den >= eps, num / den, torch.ones_like(den)).clamp(lo, hi)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("propagation", ["blockwise", "layerwise"])
def test_train_forward_layer_by_layer(dora, propagation):
    """train(): each layer's output and γ equal an explicit computation from its captured input."""
    base = build_tiny_llama(SPEC, seed=0)
    san = make(base, lora_cfg(dora), SanConfig(propagation=propagation, ema=0.9))
    randomize_adapters(san)
    set_gamma_logging(san, True)  # γ in every layer, not only in sources
    layers = {l._san.name: l for l in san_layers(san)}
    captured = {}
    hooks = [l.register_forward_hook(lambda mod, inp, out, n=n: captured.__setitem__(n, (inp[0], out)))
             for n, l in layers.items()]
    b = batch()
    san.train()
    san(**b)
    for h in hooks:
        h.remove()
    sources = expected_sources(list(layers), propagation)
    gammas = {}
    for name, layer in layers.items():  # forward order
        x, out = captured[name]
        src, kind = sources.get(name, (None, None))
        g = gammas[src] if src else None
        W = explicit_weight(layer, g if kind == "row" else None, g if kind == "col" else None, dora)
        W0 = explicit_weight(layer, None, None, dora=False) - explicit_weight(layer, None, None, dora=False)  # zeros
        frozen = layer.base_layer.weight.detach().double()
        if g is not None:
            frozen = frozen * (g.double()[:, None] if kind == "row" else g.double()[None, :])
        h = x.double() @ (frozen + W0).T
        h_prime = x.double() @ W.T
        torch.testing.assert_close(out.double(), h_prime, rtol=1e-5, atol=1e-5)
        gammas[name] = lsq_gamma(h_prime, h, b["attention_mask"])
        torch.testing.assert_close(layer._san.batch_gamma.double(), gammas[name], rtol=1e-5, atol=1e-6)
        # one EMA step from 1: γ̄ = 0.9 + 0.1 γ
        torch.testing.assert_close(layer.san_gamma_ema.double(), 0.9 + 0.1 * gammas[name], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("pool", ["lsq", "mean"])
def test_padding_does_not_move_gamma(pool):
    """Appending padded positions (mask 0) to a batch leaves every γ unchanged.

    fp64, because the mean pool divides by |h| >= 1e-3 and so magnifies the last-ulp differences that
    a different matmul shape (longer sequence) produces in fp32."""
    base = build_tiny_llama(SPEC, seed=0).double()
    san = make(base, lora_cfg(True), SanConfig(pool=pool))
    randomize_adapters(san)
    set_gamma_logging(san, True)
    san.train()
    b = batch(pad_last=0, t=8)
    san(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    g1 = {l._san.name: l._san.batch_gamma.clone() for l in san_layers(san)}
    ids = torch.cat([b["input_ids"], torch.full((2, 5), 700)], dim=1)
    mask = torch.cat([b["attention_mask"], torch.zeros(2, 5, dtype=torch.long)], dim=1)
    san(input_ids=ids, attention_mask=mask)
    for l in san_layers(san):
        torch.testing.assert_close(l._san.batch_gamma, g1[l._san.name], rtol=1e-9, atol=1e-10)
        assert not torch.equal(l._san.batch_gamma, torch.ones_like(l._san.batch_gamma))


def test_mean_pool_matches_formula():
    """pool=mean: mean over unmasked tokens of clamp(1 + (h'−h)/h_safe, −10, 10), then the clamp."""
    from llava_san.peft.san import pool_gamma

    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 7, generator=g)
    h[0, 0, 0] = 0.0  # sign(0) = +1 -> h_safe = +1e-3
    h[0, 1, 1] = -1e-5
    hp = h + 0.01 * torch.randn(2, 5, 7, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    got, _ = pool_gamma(hp, h, mask.bool(), SanConfig(pool="mean", clamp=(0.5, 1.5)))
    want = torch.zeros(7, dtype=torch.float64)
    n = 0
    for bi in range(2):
        for t in range(5):
            if not mask[bi, t]:
                continue
            n += 1
            for j in range(7):
                hv, hpv = float(h[bi, t, j]), float(hp[bi, t, j])
                safe = (1 if hv >= 0 else -1) * max(abs(hv), 1e-3)
                want[j] += min(max(1 + (hpv - hv) / safe, -10), 10)
    want = (want / n).clamp(0.5, 1.5)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # exactly 1 where h' == h; lsq: dead channel -> 1
    same, _ = pool_gamma(h, h, None, SanConfig(pool="mean"))
    assert torch.equal(same, torch.ones(7))
    h[..., 2] = 0.0
    lsq, _ = pool_gamma(hp, h, None, SanConfig(pool="lsq"))
    assert lsq[2] == 1.0

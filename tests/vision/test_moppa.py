"""MoPPA invariants (the DCT and the three filters against dense references, identity at init, router,
parameter counts, bf16) plus attach / train-step / save-load / config checks.

Tiny random models on CPU (fixtures in tests/vision/conftest.py); full-size ViT-B/16 and CLIP-L/14-336
are built on the meta device, only to count parameters.
"""
import copy
import math

import numpy as np
import pytest
import scipy.fft
import scipy.linalg
import torch
import torch.nn.functional as F

from llava_san.vision import dct
from llava_san.vision import moppa as mp
from llava_san.vision.moppa import (
    MoppaConfig, MoppaUnit, apply_moppa, count_moppa_parameters, load_moppa_state_dict, moppa_state_dict,
    moppa_units, no_weight_decay_names, route_balance, route_loss, router_statistics,
)

F64 = torch.float64


# ------------------------------------------------------------ helpers

def inv_softplus(v: float) -> float:
    return math.log(math.expm1(v))


def randomize(module: torch.nn.Module, seed: int = 1, scale: float = 1.0) -> None:
    """Move every MoPPA tensor off its init (so no path is trivially zero or uniform)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in mp._moppa_named_parameters(module):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("k_raw", "c_raw", "t_raw"):
                p.add_(0.3 * noise)
            elif leaf == "rho":
                p.add_(0.3 * noise)
            elif ".route" in name or leaf == "route_logits":
                p.add_(0.7 * noise)
            elif leaf == "scale":
                p.add_(0.1 * noise)
            else:
                p.add_(0.2 * scale * noise)


def neumann_laplacian(h: int, w: int) -> np.ndarray:
    """Dense 2-D 5-point Neumann Laplacian L = −Δ (PSD) on a row-major h×w grid."""
    def one_d(n):
        a = 2 * np.eye(n) - np.eye(n, k=1) - np.eye(n, k=-1)
        a[0, 0] = a[-1, -1] = 1.0
        return a
    return np.kron(one_d(h), np.eye(w)) + np.kron(np.eye(h), one_d(w))


def spectral_filter(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """IDCT2(DCT2(x) ⊙ K) for x (..., H, W, C) with the pure dct functions."""
    h, w = x.shape[-3], x.shape[-2]
    c_h, c_w = dct.dct_matrix(h, x.dtype), dct.dct_matrix(w, x.dtype)
    return dct.idct2(dct.dct2(x, c_h, c_w) * k, c_h, c_w)


def unit_with(h, w, r=1, prefix=0, dim=None, dtype=F64, k=1.0, c=1.0, t=1.0, **cfg):
    unit = MoppaUnit(dim or r, (h, w), prefix, MoppaConfig(rank=r, **cfg), dtype=dtype)
    with torch.no_grad():
        for name, v in (("k_raw", k), ("c_raw", c), ("t_raw", t)):
            vals = torch.as_tensor(v, dtype=dtype).expand(getattr(unit, name).shape)
            getattr(unit, name).copy_(torch.log(torch.expm1(vals)))
    return unit


# ------------------------------------------------------------ 1. DCT

@pytest.mark.parametrize("n", [1, 3, 5, 14])
def test_dct_matrix_orthogonal(n):
    c32 = dct.dct_matrix(n, torch.float32)
    c64 = dct.dct_matrix(n, F64)
    assert c32.dtype == torch.float32 and c32.shape == (n, n)
    assert (c32 @ c32.T - torch.eye(n)).abs().max() <= 1e-6
    assert (c64 @ c64.T - torch.eye(n, dtype=F64)).abs().max() <= 1e-12
    assert dct.dct_matrix(n, torch.float32) is c32            # cached per size


def test_dct2_roundtrip_and_scipy_nonsquare():
    x = torch.randn(2, 3, 5, 4, dtype=F64)                    # (B, H=3, W=5, C): non-square grid
    c_h, c_w = dct.dct_matrix(3, F64), dct.dct_matrix(5, F64)
    x_hat = dct.dct2(x, c_h, c_w)
    ref = scipy.fft.dctn(x.numpy(), type=2, norm="ortho", axes=(1, 2))
    np.testing.assert_allclose(x_hat.numpy(), ref, atol=1e-12)
    assert torch.allclose(dct.idct2(x_hat, c_h, c_w), x, atol=1e-12)
    # swapped axes would be caught: the transform of the transposed map is not the transpose
    back = scipy.fft.idctn(x_hat.numpy(), type=2, norm="ortho", axes=(1, 2))
    np.testing.assert_allclose(back, x.numpy(), atol=1e-12)
    x32 = x.float()
    rt = dct.idct2(dct.dct2(x32, dct.dct_matrix(3), dct.dct_matrix(5)), dct.dct_matrix(3), dct.dct_matrix(5))
    assert (rt - x32).abs().max() <= 1e-5


def test_dct_matrix_built_in_inference_mode_is_usable_for_autograd():
    with torch.inference_mode():
        c = dct.dct_matrix(7, torch.float32)
    x = torch.randn(7, 7, requires_grad=True)
    (c @ x).sum().backward()                                  # would fail on an inference tensor
    assert x.grad is not None


# ------------------------------------------------------------ 2. responses

@pytest.mark.parametrize("kind", ["continuous", "discrete"])
def test_frequency_responses(kind):
    lam = dct.laplacian_eigenvalues(4, 6, kind, F64)[..., None]          # (H, W, 1)
    assert lam[0, 0, 0] == 0 and (lam[..., 0].flatten()[1:] > 0).all()
    k = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    t = torch.tensor([0.3, 1.0, 1.7], dtype=F64)
    heat = dct.heat_response(lam, k, t)                                   # (H, W, 3)
    assert heat.shape == (4, 6, 3)
    assert torch.all(heat[0, 0] == 1) and torch.all(heat > 0) and torch.all(heat <= 1)
    order = torch.argsort(lam.flatten(), stable=True)                    # non-increasing in Λ
    for ch in range(3):
        vals = heat[..., ch].flatten()[order]
        assert torch.all(vals[1:] <= vals[:-1] + 1e-15)
    t1, t2 = torch.tensor([0.4], dtype=F64), torch.tensor([0.9], dtype=F64)
    one = torch.ones(1, dtype=F64)
    assert torch.allclose(dct.heat_response(lam, one, t1) * dct.heat_response(lam, one, t2),
                          dct.heat_response(lam, one, t1 + t2), atol=1e-14)   # semigroup
    assert torch.allclose(dct.heat_response(lam, k, torch.full((3,), 1e-9, dtype=F64)),
                          torch.ones_like(heat), atol=1e-7)                  # identity as t -> 0

    c = torch.tensor([0.5, 1.0, 3.0], dtype=F64)
    wave = dct.wave_response(lam, c, t)
    assert torch.all(wave[0, 0] == 1) and torch.all(wave.abs() <= 1)
    assert torch.all(dct.wave_response(lam, c, torch.zeros(3, dtype=F64)) == 1)  # identity at t = 0
    assert (wave < 0).any()                                                    # it oscillates
    wave_in = dct.wave_response(lam, c, t, "input")
    assert torch.allclose(wave_in[0, 0], 1 + t)                              # limit sin(ctω)/(cω) -> t
    omega = lam.sqrt()
    expect = torch.cos(c * t * omega) + torch.sin(c * t * omega) / (c * omega)
    assert torch.allclose(wave_in[1:], expect[1:])

    pois = dct.poisson_response(lam, "screened", 1.0)
    assert pois[0, 0, 0] == 1 and torch.all(pois > 0) and torch.all(pois <= 1)
    pure = dct.poisson_response(lam, "pure")
    assert pure[0, 0, 0] == 0 and torch.allclose(pure.flatten()[1:], -1 / lam.flatten()[1:])


@pytest.mark.parametrize("laplacian", ["continuous", "discrete"])
def test_priors_keep_spatial_mean_and_constants(laplacian):
    """ρ = 1, router off: every prior keeps each channel's spatial mean; a constant map is unchanged."""
    unit = unit_with(3, 5, r=3, k=[0.5, 1.0, 2.0], c=[0.7, 1.0, 1.3], t=[0.5, 1.0, 2.0], laplacian=laplacian)
    x = torch.randn(2, 3, 5, 3, dtype=F64)
    y = unit.prior_outputs(x)                                                  # (B, 3, H, W, r)
    assert y.shape == (2, 3, 3, 5, 3)
    for p in range(3):
        assert torch.allclose(y[:, p].mean(dim=(1, 2)), x.mean(dim=(1, 2)), atol=1e-12)
    const = torch.full((1, 3, 5, 3), 0.7, dtype=F64) * torch.tensor([1.0, -2.0, 3.0], dtype=F64)
    y_const = unit.prior_outputs(const)
    for p in range(3):
        assert torch.allclose(y_const[:, p], const, atol=1e-12)


# ------------------------------------------------------------ 3. dense operators

def test_priors_equal_dense_operators_discrete():
    h, w = 4, 5
    ks, cs, ts = [0.6, 1.4], [0.8, 1.9], [0.7, 1.3]
    unit = unit_with(h, w, r=2, k=ks, c=cs, t=ts, laplacian="discrete")
    x = torch.randn(3, h, w, 2, dtype=F64)
    y = unit.prior_outputs(x).detach().numpy()                                        # (B, 3, H, W, r)
    lap = neumann_laplacian(h, w)
    evals, evecs = np.linalg.eigh(lap)
    evals = np.clip(evals, 0, None)
    eye = np.eye(h * w)
    for ch in range(2):
        k, c, t = ks[ch], cs[ch], ts[ch]
        ops = [scipy.linalg.expm(-k * t * lap),                                # heat
               evecs @ np.diag(np.cos(c * t * np.sqrt(evals))) @ evecs.T,     # wave
               1.0 * np.linalg.inv(1.0 * eye + lap)]                          # screened Poisson, μ = 1
        xv = x[..., ch].reshape(3, h * w).numpy()                             # row-major vec
        for p, op in enumerate(ops):
            np.testing.assert_allclose(y[:, p, :, :, ch].reshape(3, h * w), xv @ op.T, atol=1e-12)

    # the alternatives against dense operators too: pure Poisson = −L⁺, wave with u̇(0) = X
    unit = unit_with(h, w, r=1, c=1.3, t=0.8, laplacian="discrete", poisson="pure", wave_v0="input")
    y = unit.prior_outputs(x[..., :1]).detach().numpy()
    xv = x[..., 0].reshape(3, h * w).numpy()
    om = np.sqrt(evals)
    sinc = np.where(om > 1e-9, np.sin(1.3 * 0.8 * om) / np.where(om > 1e-9, 1.3 * om, 1.0), 0.8)
    wave_in = evecs @ np.diag(np.cos(1.3 * 0.8 * om) + sinc) @ evecs.T
    np.testing.assert_allclose(y[:, 1, :, :, 0].reshape(3, h * w), xv @ wave_in.T, atol=1e-12)
    np.testing.assert_allclose(y[:, 2, :, :, 0].reshape(3, h * w), xv @ (-np.linalg.pinv(lap)).T, atol=1e-10)


# ------------------------------------------------------------ 4. symmetry

@pytest.mark.parametrize("laplacian", ["continuous", "discrete"])
def test_filters_self_adjoint_and_flip_symmetric(laplacian):
    h, w = 3, 5
    unit = unit_with(h, w, r=1, k=0.8, c=1.3, t=0.9, laplacian=laplacian)
    basis = torch.eye(h * w, dtype=F64).reshape(h * w, h, w, 1)
    cols = unit.prior_outputs(basis)                                           # (HW, 3, H, W, 1)
    x = torch.randn(4, h, w, 1, dtype=F64)
    y = unit.prior_outputs(x)
    for p in range(3):
        mat = cols[:, p].reshape(h * w, h * w).T                               # M[:, j] = P(e_j)
        assert torch.allclose(mat, mat.T, atol=1e-12)                          # ⟨PX, Y⟩ = ⟨X, PY⟩
        for dim in (1, 2):                                                      # flip h, flip w
            flipped = unit.prior_outputs(torch.flip(x, dims=(dim,)))[:, p]
            assert torch.allclose(flipped, torch.flip(y[:, p], dims=(dim,)), atol=1e-12)


# ------------------------------------------------------------ 5. token layout

@pytest.mark.parametrize("prefix_mode", ["identity", "excluded"])
def test_token_layout_row_major_and_prefix(prefix_mode):
    h, w, p = 3, 5, 2
    # short time t: heat and wave stay concentrated, so the response peaks at the one-hot's own cell
    unit = unit_with(h, w, r=2, dim=2, prefix=p, t=0.2, act="none", router="static",
                     prefix_tokens=prefix_mode)
    with torch.no_grad():
        unit.down.weight.copy_(torch.eye(2, dtype=F64))
        unit.up.weight.copy_(torch.eye(2, dtype=F64))
    k_heat, k_wave, k_pois = unit.responses(h, w, F64)
    for (hh, ww) in [(0, 0), (1, 3), (2, 4)]:
        u = torch.zeros(1, p + h * w, 2, dtype=F64)
        u[0, p + hh * w + ww, 0] = 1.0
        out = unit(u)
        onehot = torch.zeros(1, h, w, 1, dtype=F64)
        onehot[0, hh, ww, 0] = 1.0
        expect = sum(spectral_filter(onehot, k) for k in (k_heat, k_wave, k_pois)) / 3.0   # α = 1/3
        assert torch.allclose(out[0, p:, 0].reshape(h, w), expect[0, ..., 0], atol=1e-12)
        assert torch.all(out[0, :p] == 0) and torch.all(out[0, p:, 1] == 0)
        # the peak sits at row-major index h·W + w of the grid tokens (not w·H + h)
        assert int(out[0, p:, 0].argmax()) == hh * w + ww
    # prefix tokens skip the spatial operator: identity (through down/up) or no update at all
    u = torch.zeros(1, p + h * w, 2, dtype=F64)
    u[0, 1, 1] = 2.0
    out = unit(u)
    assert torch.all(out[0, p:] == 0)
    if prefix_mode == "identity":
        assert torch.equal(out[0, :p], u[0, :p])
    else:
        assert torch.all(out[0, :p] == 0)


# ------------------------------------------------------------ 6. identity at init

@pytest.mark.parametrize("placement", ["sequential", "parallel", "pre_norm"])
def test_identity_at_init_timm(tiny_vit, placement):
    x = torch.randn(2, 3, 32, 32)
    frozen = tiny_vit()
    ref_blocks, ref = [], frozen.patch_embed(x)
    ref = frozen.norm_pre(frozen._pos_embed(ref))
    for blk in frozen.blocks:
        ref = blk(ref)
        ref_blocks.append(ref)
    ref_logits = frozen(x)
    model = apply_moppa(tiny_vit(), MoppaConfig(placement=placement))
    h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for blk, expect in zip(model.blocks, ref_blocks):
        h = blk(h)
        assert torch.equal(h, expect)                                         # bit-equal per block
    assert torch.equal(model(x), ref_logits)


@pytest.mark.parametrize("placement", ["sequential", "parallel", "pre_norm"])
def test_identity_at_init_clip(tiny_clip, placement):
    x = torch.randn(2, 3, 32, 32)
    ref = tiny_clip()(pixel_values=x, output_hidden_states=True)
    model = apply_moppa(tiny_clip(), MoppaConfig(placement=placement))
    assert len(moppa_units(model)) == 2                                       # layers 0..L-2
    out = model(pixel_values=x, output_hidden_states=True)
    for a, b in zip(out.hidden_states, ref.hidden_states):
        assert torch.equal(a, b)
    assert torch.equal(out.last_hidden_state, ref.last_hidden_state)
    # and the unit really is in the path: a non-zero W_up changes layer 0's output
    randomize(model)
    out2 = model(pixel_values=x, output_hidden_states=True)
    assert not torch.allclose(out2.hidden_states[1], ref.hidden_states[1])
    assert torch.equal(out2.hidden_states[0], ref.hidden_states[0])


def test_clip_scope_inside_llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    torch.manual_seed(0)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                          image_size=32, patch_size=8)
    tc = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=2, vocab_size=64)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vc, text_config=tc))
    assert model.config.vision_feature_layer == -2
    apply_moppa(model, MoppaConfig())
    names = [n for n, _ in model.named_parameters() if mp.is_moppa_param(n)]
    units = [n for n, _ in moppa_units(model)]
    assert units == [f"model.vision_tower.encoder.layers.{i}.layer_norm1.moppa_unit" for i in range(2)]
    assert names and all(n.startswith("model.vision_tower.encoder.layers.") for n in names)
    assert not any(".layers.2." in n or "post_layernorm" in n for n in names)   # last layer never used
    outside = ("model.language_model", "lm_head", "model.multi_modal_projector")
    assert not any(n.startswith(outside) for n in names)
    for n, p in model.named_parameters():
        if n.startswith("model.vision_tower") and not mp.is_moppa_param(n):
            assert not p.requires_grad
        if n.startswith(("model.language_model", "model.multi_modal_projector")):
            assert p.requires_grad                                                  # the caller decides
    # explicit clip_layers
    model2 = LlavaForConditionalGeneration(LlavaConfig(vision_config=vc, text_config=tc))
    apply_moppa(model2, MoppaConfig(clip_layers=1))
    assert len(moppa_units(model2)) == 1
    with pytest.raises(ValueError, match="clip_layers"):
        apply_moppa(LlavaForConditionalGeneration(LlavaConfig(vision_config=vc, text_config=tc)),
                    MoppaConfig(clip_layers=4))


# ------------------------------------------------------------ 7. router

def test_router_uniform_at_init_and_zero_loss(tiny_vit):
    model = apply_moppa(tiny_vit(), MoppaConfig())
    model(torch.randn(2, 3, 32, 32))
    for _, unit in moppa_units(model):
        alpha, _ = unit.routing(torch.randn(2, 4, 4, 8))
        assert torch.allclose(alpha, torch.full_like(alpha, 1 / 3), atol=1e-7)
        assert torch.allclose(unit._record.importance, torch.full((3,), 1 / 3), atol=1e-7)
    loss = route_loss(model)
    assert loss.dim() == 0 and loss.item() == 0.0
    stats = router_statistics(model)
    for prior in mp.PRIORS:
        assert stats[f"moppa/importance/{prior}"] == pytest.approx(1 / 3, abs=1e-6)
    assert stats["moppa/router_entropy"] == pytest.approx(math.log(3), abs=1e-6)
    for key in ("k", "c", "t", "rho"):
        assert stats[f"moppa/{key}"] == pytest.approx(1.0, abs=1e-6)


def test_route_balance_values():
    imp = torch.tensor([0.6, 0.2, 0.2], dtype=F64)
    assert route_balance(imp, "cv2").item() == pytest.approx(0.32, abs=1e-14)
    assert route_balance(imp, "cv2").item() == pytest.approx(3 * ((imp - 1 / 3) ** 2).sum().item(), abs=1e-14)
    assert route_balance(imp, "kl").item() == pytest.approx(sum(v * math.log(3 * v) for v in (0.6, 0.2, 0.2)))
    assert route_balance(torch.full((3,), 1 / 3), "cv2").item() == 0.0
    assert route_balance(imp, "entropy", torch.tensor(math.log(3))).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("router", ["token", "static"])
def test_route_loss_cv2_example(tiny_vit, router):
    """I = (0.6, 0.2, 0.2) in every layer: CV² = 0.32, L_route = 0.01 · 0.32 = 0.0032."""
    model = apply_moppa(tiny_vit(), MoppaConfig(router=router))
    logits = torch.log(torch.tensor([0.6, 0.2, 0.2]))
    with torch.no_grad():
        for _, unit in moppa_units(model):
            (unit.route_logits if router == "static" else unit.route.bias).copy_(logits)
    model(torch.randn(2, 3, 32, 32))
    assert route_loss(model).item() == pytest.approx(0.0032, rel=1e-5)
    assert router_statistics(model)["moppa/importance/heat"] == pytest.approx(0.6, rel=1e-5)


def test_route_loss_schedules_and_kinds(tiny_vit):
    x = torch.randn(2, 3, 32, 32)
    model = apply_moppa(tiny_vit(), MoppaConfig(route_schedule="linear_decay", route_lambda=0.1))
    randomize(model)
    model(x)
    full = route_loss(model, 0.0)
    assert full.item() > 0
    assert route_loss(model, 0.5).item() == pytest.approx(full.item() / 2, rel=1e-6)
    assert route_loss(model, 1.0).item() == 0.0 and route_loss(model, 2.0).item() == 0.0
    # λ = 0: exactly 0 and the training loss is bit-equal with and without the term
    model0 = apply_moppa(tiny_vit(), MoppaConfig(route_lambda=0.0))
    randomize(model0)
    out = model0(x).sum()
    z = route_loss(model0)
    assert z.item() == 0.0 and torch.equal(out + z, out)
    for kind in ("kl", "entropy"):
        m = apply_moppa(tiny_vit(), MoppaConfig(route_reg=kind))
        m(x)
        assert abs(route_loss(m).item()) < 1e-7                                   # ~0 at uniform routing
        randomize(m)
        m(x)
        loss = route_loss(m)
        assert loss.item() > 0
        loss.backward()
        assert any(u.route.weight.grad is not None and u.route.weight.grad.abs().sum() > 0
                   for _, u in moppa_units(m))
    with pytest.raises(RuntimeError, match="forward"):
        route_loss(apply_moppa(tiny_vit(), MoppaConfig()))


# ------------------------------------------------------------ 8. gradcheck

@pytest.mark.parametrize("cfg", [
    {},
    {"laplacian": "discrete", "wave_v0": "input", "poisson": "pure", "router": "image"},
    {"params": "per_frequency", "router": "static", "learnable_scale": True, "prefix_tokens": "excluded"},
    {"params": "per_layer", "act": "none", "scale": 0.5},
])
def test_gradcheck_all_parameters(cfg):
    torch.manual_seed(0)
    unit = MoppaUnit(6, (3, 4), 1, MoppaConfig(rank=2, **cfg), dtype=F64)
    randomize(unit, seed=3, scale=3.0)
    names = [n for n, _ in unit.named_parameters()]
    for required in ("down.weight", "up.weight", "k_raw", "c_raw", "t_raw", "rho"):
        assert required in names
    assert ("route.weight" in names) or ("route_logits" in names)
    params = tuple(p.detach().clone().requires_grad_(True) for _, p in unit.named_parameters())
    u = torch.randn(2, 1 + 12, 6, dtype=F64, requires_grad=True)

    def f(u, *ps):
        out = torch.func.functional_call(unit, dict(zip(names, ps)), (u,))
        return out, unit._record.importance, unit._record.entropy             # the regulariser's inputs too

    assert torch.autograd.gradcheck(f, (u,) + params, eps=1e-6, atol=1e-7)
    # every parameter actually receives a gradient
    out, imp, ent = f(u, *params)
    grads = torch.autograd.grad(out.square().sum() + route_balance(imp) + ent, params)
    for n, g in zip(names, grads):
        assert g.abs().sum() > 0, n


# ------------------------------------------------------------ 9. counts

def test_counts_vit_b16():
    import timm.models.vision_transformer as vt
    for r, total in ((8, 159_732), (16, 307_860)):
        with torch.device("meta"):
            model = vt.VisionTransformer(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12)
        assert sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head")) == 85_798_656
        apply_moppa(model, MoppaConfig(rank=r))
        assert count_moppa_parameters(model) == total
        per_block = sum(p.numel() for n, p in model.named_parameters()
                        if n.startswith("blocks.0.") and mp.is_moppa_param(n))
        assert per_block == total // 12
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        moppa_names = {n for n, _ in model.named_parameters() if mp.is_moppa_param(n)}
        assert trainable == moppa_names | {"head.weight", "head.bias"}


def test_counts_clip_l14_336():
    from transformers import CLIPVisionConfig, CLIPVisionModel
    with torch.device("meta"):
        model = CLIPVisionModel(CLIPVisionConfig(hidden_size=1024, num_hidden_layers=24,
                                                 intermediate_size=4096, num_attention_heads=16,
                                                 image_size=336, patch_size=14))
    apply_moppa(model, MoppaConfig())
    assert count_moppa_parameters(model) == 414_989
    assert count_moppa_parameters(model) == 23 * 18_043
    names = [n for n, _ in model.named_parameters() if mp.is_moppa_param(n)]
    assert not any(n.startswith("encoder.layers.23.") or "post_layernorm" in n for n in names)
    assert moppa_units(model)[0][1].grid_size == (24, 24)
    assert not any(p.requires_grad for n, p in model.named_parameters() if not mp.is_moppa_param(n))


def test_count_formula_tiny(tiny_vit):
    model = apply_moppa(tiny_vit(), MoppaConfig(rank=4))
    d, r, hw = 64, 4, 16
    assert count_moppa_parameters(model) == 2 * (d * r + r + r * d + d + 3 * r + 3 + 3 * r + hw)
    cfg = MoppaConfig(rank=4, router="static", params="per_frequency", learnable_scale=True)
    static = apply_moppa(tiny_vit(), cfg)
    assert count_moppa_parameters(static) == 2 * (d * r + r + r * d + d + 3 + 3 * hw * r + hw + 1)


# ------------------------------------------------------------ 10. autocast

def test_bf16_autocast_keeps_dct_in_fp32(tiny_vit, monkeypatch):
    model = apply_moppa(tiny_vit(), MoppaConfig())
    randomize(model, scale=2.0)
    x = torch.randn(2, 3, 32, 32)
    unit = moppa_units(model)[0][1]
    u = torch.randn(2, 17, 64)
    with torch.no_grad():
        ref_unit = unit(u)
        ref = model.forward_features(x)
    seen = []
    for fn in ("dct2", "idct2"):
        orig = getattr(dct, fn)

        def rec(xx, c_h, c_w, _orig=orig):
            seen.append((xx.dtype, c_h.dtype, c_w.dtype, torch.is_autocast_enabled("cpu")))
            out = _orig(xx, c_h, c_w)
            seen.append((out.dtype,))
            return out
        monkeypatch.setattr(dct, fn, rec)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out_unit = unit(u)
        out = model.forward_features(x)
    assert seen and all(all(d == torch.float32 for d in s if isinstance(d, torch.dtype)) for s in seen)
    assert not any(s[3] for s in seen if len(s) == 4)                          # autocast disabled inside
    assert out_unit.dtype == torch.float32 and torch.isfinite(out).all()
    rel = (out_unit.float() - ref_unit).norm() / ref_unit.norm()
    assert rel <= 1e-2, rel
    rel_model = (out.float() - ref).norm() / ref.norm()
    assert rel_model <= 1e-2, rel_model


# ------------------------------------------------------------ training / switches

def test_one_step_updates_only_moppa(tiny_vit):
    model = apply_moppa(tiny_vit(), MoppaConfig())
    model.head.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(moppa_state_dict(model))
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    for _ in range(2):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) + route_loss(model)
        loss.backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(mp.is_moppa_param(n) for n in changed)
    assert any(n.endswith("up.weight") for n in changed) and any(n.endswith("down.weight") for n in changed)
    for n, p in model.named_parameters():
        if not mp.is_moppa_param(n):
            assert torch.equal(p, before[n]), n


SWITCHES = [("act", "none"), ("placement", "parallel"), ("placement", "pre_norm"), ("laplacian", "discrete"),
            ("params", "per_frequency"), ("params", "per_layer"), ("wave_v0", "input"), ("poisson", "pure"),
            ("router", "image"), ("router", "static"), ("route_reg", "kl"), ("route_reg", "entropy"),
            ("route_schedule", "linear_decay"), ("prefix_tokens", "excluded"), ("scale", 0.1),
            ("learnable_scale", True), ("rank", 3)]


@pytest.mark.parametrize("field,value", SWITCHES, ids=[f"{f}={v}" for f, v in SWITCHES])
def test_every_switch_forward_backward(tiny_vit, field, value):
    x = torch.randn(2, 3, 32, 32)
    ref = tiny_vit()(x)
    model = apply_moppa(tiny_vit(), MoppaConfig(**{field: value}))
    assert torch.equal(model(x), ref)                                          # identity at init, every mode
    randomize(model)
    model.train()
    out = model(x)
    assert not torch.allclose(out, ref)
    loss = out.square().mean() + route_loss(model, 0.3)
    loss.backward()
    for n, p in mp._moppa_named_parameters(model):
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert sum(float(p.grad.abs().sum()) for _, p in mp._moppa_named_parameters(model)) > 0
    stats = router_statistics(model)
    assert all(math.isfinite(v) for v in stats.values())


def test_config_validation():
    for field, bad in [("act", "relu"), ("placement", "post"), ("laplacian", "cont"), ("params", "per_token"),
                       ("wave_v0", "one"), ("poisson", "screen"), ("router", "tok"), ("route_reg", "l2"),
                       ("route_schedule", "cosine"), ("prefix_tokens", "drop")]:
        with pytest.raises(ValueError, match=field):
            MoppaConfig(**{field: bad})
    for field, bad in [("rank", 0), ("rank", 2.0), ("route_lambda", -1.0), ("route_lambda", float("nan")),
                       ("scale", float("inf")), ("learnable_scale", 1), ("clip_layers", 0)]:
        with pytest.raises(ValueError, match=field):
            MoppaConfig(**{field: bad})
    assert MoppaConfig().to_dict()["rank"] == 8


def test_apply_errors(tiny_vit):
    model = apply_moppa(tiny_vit(), MoppaConfig())
    with pytest.raises(ValueError, match="already"):
        apply_moppa(model, MoppaConfig())
    with pytest.raises(ValueError, match="supports"):
        apply_moppa(torch.nn.Sequential(torch.nn.Linear(2, 2)), MoppaConfig())
    with pytest.raises(ValueError, match="no MoPPA"):
        route_loss(torch.nn.Linear(2, 2))


# ------------------------------------------------------------ save / load

def test_save_load_roundtrip_exact(tiny_vit, tiny_clip):
    x = torch.randn(2, 3, 32, 32)
    cfg = MoppaConfig(router="image", params="per_frequency", learnable_scale=True)
    model = apply_moppa(tiny_vit(), cfg)
    randomize(model, seed=7)
    state = moppa_state_dict(model)
    assert state and all(t.device.type == "cpu" and not t.requires_grad for t in state.values())
    assert set(state) == {n for n, _ in model.named_parameters() if mp.is_moppa_param(n)}
    assert not any("dct_" in k for k in state)                                 # buffers are not saved
    fresh = apply_moppa(tiny_vit(), cfg)
    assert not torch.equal(fresh(x), model(x))
    load_moppa_state_dict(fresh, state)
    assert torch.equal(fresh(x), model(x))
    # the clone is detached: changing the model does not change the saved tensors
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.endswith("rho")).add_(1.0)
    assert not torch.equal(fresh(x), model(x))

    clip = apply_moppa(tiny_clip(), MoppaConfig())
    randomize(clip)
    fresh_clip = apply_moppa(tiny_clip(), MoppaConfig())
    load_moppa_state_dict(fresh_clip, moppa_state_dict(clip))
    assert torch.equal(fresh_clip(pixel_values=x).last_hidden_state, clip(pixel_values=x).last_hidden_state)


def test_load_is_strict(tiny_vit):
    model = apply_moppa(tiny_vit(), MoppaConfig())
    state = moppa_state_dict(model)
    key = "blocks.0.norm1.moppa_unit.rho"
    missing = {k: v for k, v in state.items() if k != key}
    with pytest.raises(ValueError, match=r"missing keys.*blocks\.0\.norm1\.moppa_unit\.rho"):
        load_moppa_state_dict(model, missing)
    with pytest.raises(ValueError, match="unexpected keys.*blocks.9"):
        load_moppa_state_dict(model, {**state, "blocks.9.norm1.moppa_unit.rho": state[key]})
    with pytest.raises(ValueError, match="shape mismatch.*moppa_unit.rho"):
        load_moppa_state_dict(model, {**state, key: torch.ones(5, 5)})
    other = apply_moppa(tiny_vit(), MoppaConfig(rank=4))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_moppa_state_dict(other, state)


# ------------------------------------------------------------ misc

def test_no_weight_decay_names(tiny_vit):
    model = apply_moppa(tiny_vit(), MoppaConfig(router="static", learnable_scale=True))
    nwd = no_weight_decay_names(model)
    for i in range(2):
        base = f"blocks.{i}.norm1.moppa_unit."
        for leaf in ("down.bias", "up.bias", "k_raw", "c_raw", "t_raw", "rho", "route_logits", "scale"):
            assert base + leaf in nwd
        assert base + "down.weight" not in nwd and base + "up.weight" not in nwd
    assert "head.bias" in nwd and "head.weight" not in nwd
    assert not any(n.startswith("blocks.0.norm1.bias") or n.endswith("attn.qkv.bias") for n in nwd)  # frozen
    assert model.get_parameter("blocks.0.norm1.moppa_unit.rho").ndim == 2


def test_other_resolution_resamples_grid_tensors(tiny_vit):
    """ρ and per-frequency constants live on the training grid; other grids resample them bilinearly."""
    model = apply_moppa(tiny_vit(dynamic_img_size=True), MoppaConfig(params="per_frequency"))
    randomize(model)
    out = model.forward_features(torch.randn(1, 3, 48, 48))                   # 6 × 6 grid
    assert out.shape == (1, 37, 64) and torch.isfinite(out).all()
    unit = moppa_units(model)[0][1]
    assert unit.source(6, 6).shape == (6, 6)
    assert torch.allclose(unit.source(4, 4), unit.rho)                          # training grid: untouched
    const = unit._on_grid(torch.full((4, 4), 2.5), 7, 3)
    assert torch.allclose(const, torch.full((7, 3), 2.5))
    with pytest.raises(ValueError, match="grid"):
        unit(torch.randn(1, 1 + 12, 64))                                       # 12: neither 4x4 nor square


def test_deepcopy_after_training_forward(tiny_vit):
    """Model EMA deep-copies the model; the recorded routing (non-leaf tensors) must not break that."""
    model = apply_moppa(tiny_vit(), MoppaConfig())
    randomize(model)
    x = torch.randn(2, 3, 32, 32)
    model(x)
    ema = copy.deepcopy(model)
    assert torch.equal(ema(x), model(x))
    # the copy's hooks drive the copy's own units
    with torch.no_grad():
        moppa_units(ema)[0][1].up.weight.zero_()
        moppa_units(ema)[1][1].up.weight.zero_()
    assert not torch.equal(ema(x), model(x))
    assert torch.equal(ema(x), ema(x))
    # pickling (torch.save of the whole model) works too, hooks included
    import pickle
    clone = pickle.loads(pickle.dumps(model))
    assert torch.equal(clone(x), model(x)) and moppa_units(clone)[0][1]._record.importance is not None

"""SSF and SAN-SSF invariants on tiny random timm and CLIP models: identity at init, parameter counts,
shared scales and summed gradients, column scaling, merge equality, the regulariser, v_slice, CLIP scope."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llava_san.vision.ssf import (
    SanColumnHook,
    SsfConfig,
    SsfSiteHook,
    add_san_column,
    add_ssf_site,
    apply_ssf,
    count_ssf_parameters,
    load_ssf_state_dict,
    merge_ssf,
    san_columns,
    ssf_regulariser,
    ssf_sites,
    ssf_state_dict,
    ssf_statistics,
)

CONFIGS = {
    "ssf": dict(method="ssf"),
    "paper": dict(),
    "prototype": dict(mode="prototype"),
    "paper_vslice_chain": dict(qkv_to_proj="v_slice", chain_blocks=True),
    "paper_interp": dict(qkv_to_proj="interp"),
    "prototype_vslice": dict(mode="prototype", qkv_to_proj="v_slice"),
}


def _images(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g)


def _randomise(model, std=0.1, seed=3):
    """γ ~ N(1, std), β ~ N(0, std); the trained LayerNorm affines (prototype) get the same noise around
    their current values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ssf_state_dict(model).items():
            own = dict(model.named_parameters())[name]
            mean = 0.0 if name.endswith(("ssf_shift", ".bias")) else 1.0
            own.copy_(mean + std * torch.randn(own.shape, generator=g))


def _features(model, x):
    """Every feature the backbone gives: timm (pre-logits features, logits); CLIP (all hidden states)."""
    if hasattr(model, "forward_features"):
        return [model.forward_features(x), model(x)]
    out = model(pixel_values=x, output_hidden_states=True)
    return [*out.hidden_states, out.last_hidden_state, out.pooler_output]


def _make(kind, tiny_vit, tiny_clip, seed=0):
    return tiny_vit(seed) if kind == "timm" else tiny_clip(seed)


def _frozen(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if n not in ssf_state_dict(model)}


# 1. identity at init ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["timm", "clip"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_identity_at_init(kind, name, tiny_vit, tiny_clip):
    model, x = _make(kind, tiny_vit, tiny_clip), _images()
    with torch.no_grad():
        ref = _features(model, x)
        apply_ssf(model, SsfConfig(**CONFIGS[name]))
        got = _features(model, x)
    assert ssf_sites(model)
    for a, b in zip(ref, got):
        assert (a - b).abs().max().item() <= 1e-6


def test_ssf_paper_init_is_not_identity(tiny_vit):
    torch.manual_seed(5)
    model, x = tiny_vit(), _images()
    with torch.no_grad():
        ref = model(x)
        apply_ssf(model, SsfConfig(init="ssf_paper"))
        gammas = torch.cat([m.ssf_scale for _, m, _ in ssf_sites(model)])
        assert 0.01 < gammas.std().item() < 0.03 and abs(gammas.mean().item() - 1) < 0.01
        assert not torch.allclose(model(x), ref)


# 2. trainable set and counts -----------------------------------------------------------------------

def _tiny_count(d=64, depth=2, mlp=256, prototype=False):
    if prototype:  # scale-only sites + every LayerNorm affine (2 per block + final)
        return d + depth * (3 * d + d + mlp + d) + (2 * depth + 1) * 2 * d
    return 2 * d + depth * 2 * (4 * d + 3 * d + mlp) + 2 * d


@pytest.mark.parametrize("name", ["ssf", "paper", "prototype"])
def test_trainable_set_and_count_tiny(name, tiny_vit):
    model = tiny_vit()
    model.head.requires_grad_(False)  # apply_ssf must leave the head as it was ...
    apply_ssf(model, SsfConfig(**CONFIGS[name]))
    assert not model.head.weight.requires_grad
    model = tiny_vit()
    apply_ssf(model, SsfConfig(**CONFIGS[name]))  # ... and here it was trainable
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    method = set(ssf_state_dict(model))
    assert trainable == method | {"head.weight", "head.bias"}
    prototype = name == "prototype"
    for n in method:
        leaf = n.rsplit(".", 1)[-1]
        if prototype and "norm" in n and leaf in ("weight", "bias"):
            continue  # the LayerNorm affines the prototype trains
        assert leaf in (("ssf_scale",) if prototype else ("ssf_scale", "ssf_shift")), n
    assert count_ssf_parameters(model) == _tiny_count(prototype=prototype)
    assert count_ssf_parameters(model) == sum(t.numel() for t in ssf_state_dict(model).values())


def test_counts_full_size_vit_b16():
    import timm.models.vision_transformer as vt

    counts = {}
    for name in ("ssf", "paper", "prototype"):
        with torch.device("meta"):
            model = vt.VisionTransformer(num_classes=100)  # ViT-B/16 @ 224
        if name == "ssf":
            backbone = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head"))
            assert backbone == 85_798_656
        apply_ssf(model, SsfConfig(**CONFIGS[name]))
        counts[name] = count_ssf_parameters(model)
        head = sum(p.numel() for p in model.head.parameters())
        assert head == 76_900
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == counts[name] + head
    assert counts == {"ssf": 205_824, "paper": 205_824, "prototype": 122_112}


def test_counts_full_size_clip_l14_336():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                           num_attention_heads=16, image_size=336, patch_size=14)
    for name, expected in (("paper", 522_240), ("ssf", 522_240),
                           ("prototype", 1024 + 23 * (4 * 1024 + 4096 + 1024) + 2048 + 23 * 2 * 2048)):
        with torch.device("meta"):
            model = CLIPVisionModel(cfg)
        apply_ssf(model, SsfConfig(**CONFIGS[name]))
        assert count_ssf_parameters(model) == expected
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]  # meta: nothing to copy
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
        assert not any("layers.23." in n or "post_layernorm" in n for n in trainable)


# 3. sharing ------------------------------------------------------------------------------------------

def test_propagation_map_and_sharing(tiny_vit, tiny_clip):
    model = tiny_vit()
    apply_ssf(model, SsfConfig(qkv_to_proj="v_slice"))
    edges = {n: (h.source, h.part) for n, _, h in san_columns(model)}
    get = model.get_submodule
    expected = {}
    for i in range(2):
        b = f"blocks.{i}"
        expected[f"{b}.attn.qkv"] = (get("patch_embed.proj"), "full")
        expected[f"{b}.mlp.fc1"] = (get(f"{b}.attn.proj"), "full")
        expected[f"{b}.mlp.fc2"] = (get(f"{b}.mlp.fc1"), "full")
        expected[f"{b}.attn.proj"] = (get(f"{b}.attn.qkv"), "v_slice")
    assert set(edges) == set(expected)
    for target, (source, part) in expected.items():
        hook = edges[target][0], edges[target][1]
        assert hook[0] is source and hook[1] == part
    for _, m, h in san_columns(model):  # the very Parameter, not a copy
        if h.part == "full":
            assert h.scale() is h.source.ssf_scale
        assert "ssf_scale" not in m._parameters or m.ssf_scale is not h.source.ssf_scale
    # SAN adds no parameter: the state dict holds each shared scale once
    sd = [k for k in model.state_dict() if "ssf_" in k]
    assert len(sd) == len(set(sd)) == 2 * len(ssf_sites(model))

    chained = tiny_vit()
    apply_ssf(chained, SsfConfig(chain_blocks=True))
    src = {n: h.source for n, _, h in san_columns(chained)}
    assert src["blocks.0.attn.qkv"] is chained.patch_embed.proj
    assert src["blocks.1.attn.qkv"] is chained.blocks[0].mlp.fc2

    clip = tiny_clip()
    apply_ssf(clip, SsfConfig(qkv_to_proj="v_slice"))
    src = {n: (h.source, h.part) for n, _, h in san_columns(clip)}
    L0 = clip.encoder.layers[0]
    for p in ("q", "k", "v"):
        assert src[f"encoder.layers.1.self_attn.{p}_proj"][0] is clip.embeddings.patch_embedding
    assert src["encoder.layers.0.mlp.fc1"][0] is L0.self_attn.out_proj
    assert src["encoder.layers.0.mlp.fc2"][0] is L0.mlp.fc1
    assert src["encoder.layers.0.self_attn.out_proj"] == (L0.self_attn.v_proj, "full")
    assert len(src) == 2 * 6  # layers 0 and 1 only


def _grads(model, x, sources):
    model.zero_grad()
    (model(x) * torch.linspace(-1, 1, 10)).sum().backward()
    return [s.grad.clone() for s in sources]


def test_gradient_is_sum_of_both_uses(tiny_vit):
    model, x = tiny_vit(), _images()
    apply_ssf(model, SsfConfig(qkv_to_proj="v_slice"))
    _randomise(model)
    sources = list({id(h.source.ssf_scale): h.source.ssf_scale for _, _, h in san_columns(model)}.values())
    assert len(sources) == 1 + 3 * 2  # patch_embed + (proj, fc1, qkv) per block
    total = _grads(model, x, sources)
    for _, _, h in san_columns(model):  # only the output use carries gradient
        h.detach_scale = True
    out_use = _grads(model, x, sources)
    for _, _, h in san_columns(model):
        h.detach_scale = False
    for _, _, h in ssf_sites(model):  # only the column use carries gradient
        h.detach_scale = True
    col_use = _grads(model, x, sources)
    for t, o, c in zip(total, out_use, col_use):
        assert o.abs().sum() > 0 and c.abs().sum() > 0
        torch.testing.assert_close(t, o + c, rtol=1e-5, atol=1e-6)


def test_deepcopy_keeps_sharing_inside_the_copy(tiny_vit):
    """timm's model EMA and Lightning deep-copy models: a copy's targets must read the copy's γ."""
    import copy

    model, x = apply_ssf(tiny_vit(), SsfConfig(qkv_to_proj="v_slice")), _images()
    _randomise(model)
    twin = copy.deepcopy(model)
    names = {id(m): n for n, m in twin.named_modules()}
    for _, _, h in san_columns(twin):
        assert id(h.source) in names  # a module of the copy, not of the original
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
        twin.patch_embed.proj.ssf_scale.mul_(2.0)
        assert not torch.allclose(twin(x), model(x))


# 4. propagation is column scaling -----------------------------------------------------------------

def test_target_output_is_hand_formula(tiny_vit):
    model, x = tiny_vit(), _images()
    apply_ssf(model, SsfConfig(qkv_to_proj="v_slice"))
    _randomise(model)
    seen = {}
    for name, m, h in san_columns(model):
        m.register_forward_pre_hook(lambda mod, a, name=name: seen.__setitem__(name + ":x", a[0]),
                                    prepend=True)
        m.register_forward_hook(lambda mod, a, out, name=name: seen.__setitem__(name + ":y", out))
    with torch.no_grad():
        model(x)
    for name, m, h in san_columns(model):
        gs = h.source.ssf_scale
        if h.part == "v_slice":
            gs = gs[2 * m.in_features:3 * m.in_features]
        xin = seen[name + ":x"]
        hand = m.ssf_scale * ((gs * xin) @ m.weight.T + m.bias) + m.ssf_shift
        torch.testing.assert_close(seen[name + ":y"], hand, rtol=1e-5, atol=1e-6)

    # activation scaling == scaling a copy of the weight: outputs and gradients
    fc1 = model.blocks[0].mlp.fc1
    xin = seen["blocks.0.mlp.fc1:x"].detach()
    gs, gt, bt = model.blocks[0].attn.proj.ssf_scale, fc1.ssf_scale, fc1.ssf_shift
    up = torch.randn(xin.shape[:-1] + (fc1.out_features,))
    y_act = gt * F.linear(xin * gs, fc1.weight, fc1.bias) + bt
    g_act = torch.autograd.grad((y_act * up).sum(), (gs, gt, bt))
    y_w = gt * F.linear(xin, fc1.weight * gs[None, :], fc1.bias) + bt
    g_w = torch.autograd.grad((y_w * up).sum(), (gs, gt, bt))
    torch.testing.assert_close(y_act, y_w, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_act, g_w):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert fc1.in_features == gs.numel()


# 5. merge ------------------------------------------------------------------------------------------

def _own_hooks(model):
    return [h for m in model.modules() for hooks in (m._forward_hooks, m._forward_pre_hooks)
            for h in hooks.values() if isinstance(h, (SsfSiteHook, SanColumnHook))]


@pytest.mark.parametrize("kind", ["timm", "clip"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_merge_is_exact(kind, name, tiny_vit, tiny_clip):
    model, x = _make(kind, tiny_vit, tiny_clip), _images()
    fresh_keys = list(_make(kind, tiny_vit, tiny_clip).state_dict())
    apply_ssf(model, SsfConfig(**CONFIGS[name]))
    _randomise(model)
    pos = model.embeddings.position_embedding.weight.detach().clone() if kind == "clip" else None
    patch = model.embeddings.patch_embedding if kind == "clip" else None
    beta = patch.ssf_shift.detach().clone() if patch is not None and hasattr(patch, "ssf_shift") else None
    with torch.no_grad():
        before = _features(model, x)
        cls = type(model)
        merged = merge_ssf(model)
        after = _features(merged, x)
    assert type(merged) is cls and not _own_hooks(merged) and "_ssf_plan" not in vars(merged)
    assert list(merged.state_dict()) == fresh_keys
    assert not any(k.rsplit(".", 1)[-1].startswith(("ssf_", "san_")) for k in merged.state_dict())
    for a, b in zip(before, after):
        assert (a - b).abs().max().item() <= 1e-5
    if kind == "clip":
        delta = merged.embeddings.position_embedding.weight.detach() - pos
        assert torch.equal(delta[0], torch.zeros_like(delta[0]))  # the CLS position is untouched
        if beta is not None:
            torch.testing.assert_close(delta[1:], beta.expand_as(delta[1:]), rtol=0, atol=1e-6)
        else:
            assert torch.equal(delta, torch.zeros_like(delta))
    apply_ssf(merged, SsfConfig(**CONFIGS[name]))  # a merged model is plain: it can be adapted again


# 6. squared effect ---------------------------------------------------------------------------------

def test_squared_effect_on_linear_toy():
    torch.manual_seed(0)
    toy = nn.Sequential(nn.Linear(4, 5, bias=False), nn.Linear(5, 3, bias=False))
    add_ssf_site(toy[0], "l1", shift=False)
    add_ssf_site(toy[1], "l2", shift=False)
    add_san_column(toy[1], toy[0])
    with torch.no_grad():
        toy[0].ssf_scale.copy_(torch.tensor([0.5, 2.0, -1.0, 1.5, 0.8]))
        toy[1].ssf_scale.copy_(torch.tensor([1.2, 0.7, -0.3]))
        end_to_end = toy(torch.eye(4)).T  # [3, 4]
    g1, g2 = toy[0].ssf_scale.detach(), toy[1].ssf_scale.detach()
    W1, W2 = toy[0].weight.detach(), toy[1].weight.detach()
    torch.testing.assert_close(end_to_end, torch.diag(g2) @ W2 @ torch.diag(g1) ** 2 @ W1)
    reg = ssf_regulariser(toy, reg_lambda=1.0)
    assert reg.item() == pytest.approx(((g1 - 1) ** 2).sum().item(), rel=1e-6)
    merge_ssf(toy)
    torch.testing.assert_close(toy(torch.eye(4)).T, end_to_end)
    assert not any(n.startswith("ssf_") for n, _ in toy.named_parameters())


# 7. regulariser ------------------------------------------------------------------------------------

def test_regulariser(tiny_vit):
    x, y = _images(), torch.tensor([1, 7])
    model = tiny_vit()
    apply_ssf(model, SsfConfig(qkv_to_proj="v_slice"))
    _randomise(model)
    reg = ssf_regulariser(model)
    assert reg.dim() == 0 and reg.item() == 0.0 and reg.grad_fn is None and not reg.requires_grad
    loss = F.cross_entropy(model(x), y)
    assert torch.equal(loss + reg, loss)

    lam = 1e-3
    model = tiny_vit()
    apply_ssf(model, SsfConfig(qkv_to_proj="v_slice", reg_lambda=lam))
    _randomise(model)
    params = dict(model.named_parameters())
    names = [n for n in ssf_state_dict(model) if n.endswith("ssf_scale")]
    task = torch.autograd.grad(F.cross_entropy(model(x), y), [params[n] for n in names])
    reg = ssf_regulariser(model)
    both = torch.autograd.grad(F.cross_entropy(model(x), y) + reg, [params[n] for n in names])
    d = 64
    expected_value = 0.0
    for n, gt, gb in zip(names, task, both):
        gamma = params[n].detach()
        mask = torch.zeros_like(gamma)
        if n.startswith(("patch_embed", "blocks.0.attn.proj", "blocks.1.attn.proj")) or ".mlp.fc1." in n:
            mask[:] = 1  # full sources
        elif ".attn.qkv." in n:
            mask[2 * d:] = 1  # v_slice: only the v third propagates
        expected = 2 * lam * (gamma - 1) * mask
        expected_value += lam * (((gamma - 1) * mask) ** 2).sum().item()
        torch.testing.assert_close(gb - gt, expected, rtol=1e-3, atol=1e-7)
    assert reg.item() == pytest.approx(expected_value, rel=1e-5)
    assert ssf_regulariser(model, reg_lambda=0.0).item() == 0.0
    # plain SSF has no propagating scale
    plain = tiny_vit()
    apply_ssf(plain, SsfConfig(method="ssf"))
    assert ssf_regulariser(plain, reg_lambda=1.0).item() == 0.0


# 8. v_slice exactness ----------------------------------------------------------------------------

def test_v_slice_scaling_v_equals_scaling_attention_output(tiny_vit):
    torch.manual_seed(0)
    model, x = tiny_vit(), _images()
    proj_in = {}
    hook = model.blocks[0].attn.proj.register_forward_pre_hook(lambda m, a: proj_in.__setitem__("x", a[0]))
    with torch.no_grad():
        model(x)
    plain = proj_in["x"]
    hook.remove()
    apply_ssf(model, SsfConfig(qkv_to_proj="v_slice"))
    d = 64
    gamma_v, beta_v = 1 + 0.3 * torch.randn(d), 0.3 * torch.randn(d)
    qkv = model.blocks[0].attn.qkv
    with torch.no_grad():
        qkv.ssf_scale[2 * d:] = gamma_v
        qkv.ssf_shift[2 * d:] = beta_v
    # captured before the SAN column hook of proj (which would apply γ_v a second time)
    model.blocks[0].attn.proj.register_forward_pre_hook(lambda m, a: proj_in.__setitem__("x", a[0]),
                                                        prepend=True)
    with torch.no_grad():
        model(x)
    torch.testing.assert_close(proj_in["x"], plain * gamma_v + beta_v, rtol=1e-5, atol=1e-6)


# 9. CLIP scope ------------------------------------------------------------------------------------

def test_clip_scope(tiny_clip):
    for name in ("paper", "prototype"):
        model = tiny_clip()
        apply_ssf(model, SsfConfig(**CONFIGS[name]))
        method = set(ssf_state_dict(model))
        assert any("layers.1." in n for n in method) and any("layers.0." in n for n in method)
        assert not any("layers.2." in n or "post_layernorm" in n for n in method)
        assert not any("layers.2." in n for n, _, _ in ssf_sites(model) + san_columns(model))
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == method
    model = tiny_clip()
    apply_ssf(model, SsfConfig(clip_layers=3))
    assert any("layers.2." in n for n in ssf_state_dict(model))
    assert not any("post_layernorm" in n for n in ssf_state_dict(model))
    with pytest.raises(ValueError, match="clip_layers"):
        apply_ssf(tiny_clip(), SsfConfig(clip_layers=4))


def test_llava_vision_tower_only(tiny_llava):
    model, _ = tiny_llava()
    fresh_keys = list(model.state_dict())
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    tower = model.model.vision_tower
    x = torch.randn(1, 3, tower.config.image_size, tower.config.image_size)
    with torch.no_grad():
        ref = tower(pixel_values=x, output_hidden_states=True).hidden_states[-2]
    apply_ssf(model, SsfConfig(qkv_to_proj="v_slice"))
    method = set(ssf_state_dict(model))
    assert method and all(n.startswith("model.vision_tower.") for n in method)
    n_layers = len(tower.encoder.layers)
    assert not any(f"layers.{n_layers - 1}." in n or "post_layernorm" in n for n in method)
    for n, p in model.named_parameters():
        if n.startswith("model.vision_tower."):
            assert p.requires_grad == (n in method), n
        else:
            assert p.requires_grad == before[n], n
    assert not _own_hooks(model.model.language_model) and not _own_hooks(model.model.multi_modal_projector)
    _randomise(model)
    with torch.no_grad():
        adapted = tower(pixel_values=x, output_hidden_states=True).hidden_states[-2]
        assert not torch.allclose(adapted, ref)
        merge_ssf(model)
        merged = tower(pixel_values=x, output_hidden_states=True).hidden_states[-2]
    assert (merged - adapted).abs().max().item() <= 1e-5
    assert list(model.state_dict()) == fresh_keys


# state dict, statistics, training step, errors ---------------------------------------------------

@pytest.mark.parametrize("kind,name", [("timm", "prototype"), ("timm", "paper_vslice_chain"),
                                       ("clip", "paper")])
def test_state_dict_round_trip(kind, name, tiny_vit, tiny_clip):
    x = _images()
    cfg = SsfConfig(**CONFIGS[name])
    a = apply_ssf(_make(kind, tiny_vit, tiny_clip), cfg)
    _randomise(a)
    state = ssf_state_dict(a)
    assert all(t.device.type == "cpu" and not t.requires_grad for t in state.values())
    assert set(state) <= set(dict(a.named_parameters()))
    b = apply_ssf(_make(kind, tiny_vit, tiny_clip), cfg)
    load_ssf_state_dict(b, state)
    with torch.no_grad():
        for u, v in zip(_features(a, x), _features(b, x)):
            assert torch.equal(u, v)
    state[next(iter(state))] += 1  # a clone: the model is not changed through it
    assert not torch.equal(ssf_state_dict(a)[next(iter(state))], state[next(iter(state))])


def test_load_state_dict_is_strict(tiny_vit):
    a = apply_ssf(tiny_vit(), SsfConfig())
    state = ssf_state_dict(a)
    first = next(iter(state))
    with pytest.raises(ValueError, match="missing 1"):
        load_ssf_state_dict(apply_ssf(tiny_vit(), SsfConfig()),
                            {k: v for k, v in state.items() if k != first})
    with pytest.raises(ValueError, match="unexpected 1 \\['bogus.ssf_scale'\\]"):
        load_ssf_state_dict(apply_ssf(tiny_vit(), SsfConfig()), {**state, "bogus.ssf_scale": torch.ones(3)})
    with pytest.raises(ValueError, match=first.replace(".", "\\.") + ": saved \\(3,\\)"):
        load_ssf_state_dict(apply_ssf(tiny_vit(), SsfConfig()), {**state, first: torch.ones(3)})
    with pytest.raises(ValueError, match="missing"):  # another config: shifts missing in prototype
        load_ssf_state_dict(apply_ssf(tiny_vit(), SsfConfig()), ssf_state_dict(
            apply_ssf(tiny_vit(), SsfConfig(mode="prototype"))))
    with pytest.raises(ValueError, match="no SSF tensors"):
        load_ssf_state_dict(tiny_vit(), state)


def test_statistics(tiny_vit):
    model = apply_ssf(tiny_vit(), SsfConfig())
    stats = ssf_statistics(model)
    for kind in ("patch_embed", "norm1", "qkv", "proj", "norm2", "fc1", "fc2", "final_norm"):
        assert stats[f"ssf/gamma_mean/{kind}"] == 1.0 and stats[f"ssf/gamma_std/{kind}"] == 0.0
        assert stats[f"ssf/gamma_min/{kind}"] == stats[f"ssf/gamma_max/{kind}"] == 1.0
    with torch.no_grad():
        model.blocks[0].attn.qkv.ssf_scale.fill_(2.0)
        model.blocks[1].attn.qkv.ssf_scale.fill_(4.0)
    stats = ssf_statistics(model)
    assert stats["ssf/gamma_mean/qkv"] == 3.0 and stats["ssf/gamma_std/qkv"] == 1.0
    assert stats["ssf/gamma_min/qkv"] == 2.0 and stats["ssf/gamma_max/qkv"] == 4.0
    assert all(isinstance(v, float) for v in stats.values())


@pytest.mark.parametrize("name", ["paper_vslice_chain", "prototype"])
def test_training_step_changes_only_method_tensors(name, tiny_vit):
    model = apply_ssf(tiny_vit(), SsfConfig(**CONFIGS[name]))
    model.train()
    method = ssf_state_dict(model)
    frozen = _frozen(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    loss = F.cross_entropy(model(_images(4)), torch.tensor([0, 3, 5, 9]))
    loss.backward()
    opt.step()
    params = dict(model.named_parameters())
    for n, before in frozen.items():
        if n.startswith("head."):
            assert not torch.equal(params[n], before)
        else:
            assert torch.equal(params[n], before), n
    for n, before in method.items():
        assert not torch.equal(params[n].detach(), before), n


@pytest.mark.parametrize("kwargs,field", [
    (dict(method="lora"), "method"), (dict(mode="full"), "mode"), (dict(qkv_to_proj="resize"), "qkv_to_proj"),
    (dict(chain_blocks="yes"), "chain_blocks"), (dict(init="zeros"), "init"),
    (dict(reg_lambda=-1.0), "reg_lambda"),
    (dict(reg_lambda=float("nan")), "reg_lambda"), (dict(reg_lambda="1e-3"), "reg_lambda"),
    (dict(clip_layers=0), "clip_layers"), (dict(clip_layers=2.5), "clip_layers"),
    (dict(method="ssf", mode="prototype"), "mode"),
    (dict(method="ssf", qkv_to_proj="v_slice"), "qkv_to_proj"),
    (dict(method="ssf", chain_blocks=True), "chain_blocks"),
    (dict(method="ssf", reg_lambda=1e-3), "reg_lambda"),
])
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SsfConfig(**kwargs)


def test_config_defaults_and_unsupported_models(tiny_vit):
    cfg = SsfConfig(reg_lambda=0)
    assert (cfg.method, cfg.mode, cfg.qkv_to_proj, cfg.chain_blocks, cfg.init, cfg.reg_lambda,
            cfg.clip_layers) == \
        ("san_ssf", "paper", "skip", False, "exact", 0.0, None)
    with pytest.raises(ValueError, match="Supported"):
        apply_ssf(nn.Sequential(nn.Linear(3, 3)), cfg)
    with pytest.raises(TypeError):
        apply_ssf(tiny_vit(), {"method": "ssf"})
    model = apply_ssf(tiny_vit(), cfg)
    with pytest.raises(ValueError, match="already"):
        apply_ssf(model, cfg)
    with pytest.raises(ValueError, match="no SSF sites"):
        merge_ssf(tiny_vit())

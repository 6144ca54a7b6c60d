"""MoPPA: Mixture of Physical Priors Adapter (Wang et al., arXiv 2412.02759), a reconstruction (README
"SAN on vision transformers": the paper gives no readable equations and no code).

One bottleneck unit per transformer block, placed before self-attention. By default it wraps the
block's first norm (timm ``blocks.i.norm1``, CLIP ``encoder.layers.i.layer_norm1``), whose output feeds
only attention::

    u  = norm1(x)                                   # (B, N, d), N = P prefix tokens + H·W grid tokens
    u' = u + s · MoPPA(u)
    x  = x + attn(u');  x = x + mlp(norm2(x))

and the unit is (r = bottleneck width, default 8)::

    z      = GELU(u W_downᵀ + b_down)                      # (B, N, r)
    z_pre, z_grid = z[:, :P], z[:, P:].view(B, H, W, r)    # row-major grid: token P + h·W + w is cell (h, w)
    Y_heat = IDCT2(DCT2(z_grid) ⊙ exp(−k t Λ))             # heat diffusion for time t   (local smoothing)
    Y_wave = IDCT2(DCT2(z_grid) ⊙ cos(c t √Λ))             # wave propagation for time t (long range)
    Y_pois = IDCT2(DCT2(ρ ⊙ z_grid) ⊙ μ/(μ + Λ))           # screened Poisson steady state (global)
    α      = softmax(z_grid W_routeᵀ + b_route)            # (B, H, W, 3), per token
    Y_grid = α₀ Y_heat + α₁ Y_wave + α₂ Y_pois
    MoPPA(u) = cat(z_pre, Y_grid) W_upᵀ + b_up             # W_up = 0, b_up = 0 at init ⇒ exact identity

The DCT diagonalises the Neumann Laplacian, so each PDE is a per-frequency multiplier; see
:mod:`llava_san.vision.dct` for the transforms and the three responses. Positive parameters k, c, t are
stored raw and passed through softplus (raw init ``log(e − 1)`` gives 1); ρ is a per-grid-cell source
weight (init 1). The DCT, filters and router run in fp32 (fp64 for fp64 inputs) with autocast disabled.

MoPPA **cannot** be merged into the backbone's weights (§4.3): the filter mixes tokens, the router is
input-dependent and GELU sits inside. Save/load only its own tensors (:func:`moppa_state_dict`).

Parameter names: every new tensor sits under a module called ``moppa_unit`` attached to the wrapped norm,
e.g. ``blocks.0.norm1.moppa_unit.down.weight`` or ``...layer_norm1.moppa_unit.rho``, so the repository's
prefix rule ("some dotted part starts with ``moppa_``") selects them; original backbone names are
unchanged (the unit is wired in with forward hooks, no module is replaced).

Every choice the paper leaves open (inferred here) is a switch of :class:`MoppaConfig`.
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import dct as _dct

__all__ = [
    "MoppaConfig",
    "MoppaUnit",
    "apply_moppa",
    "route_loss",
    "route_balance",
    "router_statistics",
    "moppa_state_dict",
    "load_moppa_state_dict",
    "count_moppa_parameters",
    "no_weight_decay_names",
    "moppa_units",
    "is_moppa_param",
    "PRIORS",
    "UNIT_NAME",
]

PRIORS = ("heat", "wave", "poisson")
UNIT_NAME = "moppa_unit"  # attribute name of the unit on the wrapped norm module
SOFTPLUS_ONE = math.log(math.e - 1.0)  # softplus(log(e − 1)) = 1
POISSON_MU = 1.0  # screening constant μ of the screened Poisson prior (fixed)

# leaf names (inside a MoppaUnit) that get no weight decay: biases, the positive PDE constants, the source
# map ρ (2-D, so it must be excluded by name, not by ndim), the static router logits and a learnable scale
_NO_DECAY_LEAVES = ("bias", "k_raw", "c_raw", "t_raw", "rho", "route_logits", "scale")

_CHOICES = {
    "act": ("gelu", "none"),
    "placement": ("sequential", "parallel", "pre_norm"),
    "laplacian": _dct.LAPLACIANS,
    "params": ("per_channel", "per_frequency", "per_layer"),
    "wave_v0": _dct.WAVE_V0,
    "poisson": _dct.POISSON_KINDS,
    "router": ("token", "image", "static"),
    "route_reg": ("cv2", "kl", "entropy"),
    "route_schedule": ("constant", "linear_decay"),
    "prefix_tokens": ("identity", "excluded"),
}


@dataclass
class MoppaConfig:
    """MoPPA hyper-parameters and ablation switches.

    Every choice the paper leaves open is a field here, set by default to the reconstruction the README
    describes ("SAN on vision transformers", "MoPPA is a reconstruction"). ``clip_layers`` only matters for CLIP towers: adapt
    layers ``0 .. clip_layers-1``; ``None`` adapts every layer whose output reaches the consumer (all but
    the last for a standalone tower; for a LLaVA model, the layers up to ``config.vision_feature_layer``,
    which is also all but the last for LLaVA-1.5's ``-2``).
    """

    rank: int = 8
    act: str = "gelu"
    placement: str = "sequential"
    laplacian: str = "continuous"
    params: str = "per_channel"
    wave_v0: str = "zero"
    poisson: str = "screened"
    router: str = "token"
    route_reg: str = "cv2"
    route_lambda: float = 0.01
    route_schedule: str = "constant"
    prefix_tokens: str = "identity"
    scale: float = 1.0
    learnable_scale: bool = False
    clip_layers: Optional[int] = None

    def __post_init__(self):
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"MoppaConfig.{name} must be one of {list(allowed)}, got {value!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"MoppaConfig.rank must be a positive int, got {self.rank!r}")
        for name in ("route_lambda", "scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"MoppaConfig.{name} must be a finite number, got {value!r}")
        if self.route_lambda < 0:
            raise ValueError(f"MoppaConfig.route_lambda must be >= 0, got {self.route_lambda!r}")
        if not isinstance(self.learnable_scale, bool):
            raise ValueError(f"MoppaConfig.learnable_scale must be a bool, got {self.learnable_scale!r}")
        cl = self.clip_layers
        if cl is not None and (isinstance(cl, bool) or not isinstance(cl, int) or cl < 1):
            raise ValueError(f"MoppaConfig.clip_layers must be None or a positive int, got {cl!r}")

    def to_dict(self) -> dict:
        """Plain-dict form (for logging and adapter configs)."""
        return asdict(self)


class _RouteRecord:
    """The routing of the most recent forward pass of one unit (with autograd graph when grad is on).

    Kept outside the module's tensors on purpose: ``copy.deepcopy`` (model EMA) and pickling cannot copy
    non-leaf tensors, so a copy starts with an empty record instead.
    """

    __slots__ = ("importance", "entropy")

    def __init__(self):
        self.importance: Optional[torch.Tensor] = None  # (3,) I_ℓ = mean over batch and grid tokens of α
        self.entropy: Optional[torch.Tensor] = None     # () mean per-token (image/static) entropy of α, nats

    def __deepcopy__(self, memo):
        return _RouteRecord()

    def __reduce__(self):  # pickling (torch.save of a whole model) also starts with an empty record
        return (_RouteRecord, ())


def _no_autocast(device_type: str):
    """Context that disables autocast on ``device_type`` (the DCT path must stay in fp32)."""
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # a device type autocast does not know: nothing to disable
        return contextlib.nullcontext()


class MoppaUnit(nn.Module):
    """One MoPPA unit: ``forward(u) = s · MoPPA(u)`` for ``u ∈ R[B, N, d]``, ``N = P + H·W``.

    Args:
        dim: token width d.
        grid_size: ``(H, W)`` of the training grid (ρ and per-frequency constants live on it).
        num_prefix_tokens: P, the CLS/register tokens in front of the row-major grid.
        config: the :class:`MoppaConfig`.

    Parameters (r = ``config.rank``):
        ``down`` Linear(d → r), Kaiming-uniform weight (nn.Linear default), zero bias;
        ``up`` Linear(r → d), zero weight and bias (exact identity at init);
        ``route`` Linear(r → 3), zeros (α = 1/3) for routers ``token``/``image``, or ``route_logits`` (3,)
        zeros for ``static``; ``k_raw``, ``c_raw``, ``t_raw``: raw diffusivity, wave speed and time,
        softplus(raw) = 1 at init, shape ``(r,)`` (per_channel), ``(H, W, r)`` (per_frequency) or ``(1,)``
        (per_layer); ``rho`` (H, W) Poisson source weights, ones; ``scale`` () when ``learnable_scale``.
    """

    def __init__(self, dim: int, grid_size: tuple[int, int], num_prefix_tokens: int, config: MoppaConfig,
                 device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        h, w = (int(grid_size[0]), int(grid_size[1]))
        if h < 1 or w < 1:
            raise ValueError(f"grid_size must be positive, got {grid_size}")
        if num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
        self.config = config
        self.dim = int(dim)
        self.rank = r = config.rank
        self.grid_size = (h, w)
        self.num_prefix_tokens = int(num_prefix_tokens)
        fk = dict(device=device, dtype=dtype)

        self.down = nn.Linear(dim, r, **fk)            # W_down (r, d): Kaiming-uniform (nn.Linear default)
        self.up = nn.Linear(r, dim, **fk)              # W_up (d, r)
        with torch.no_grad():
            self.down.bias.zero_()
            self.up.weight.zero_()                     # MoPPA(u) = 0 exactly at init, whatever the filters
            self.up.bias.zero_()
        if config.router == "static":
            self.route = None
            self.route_logits = nn.Parameter(torch.zeros(3, **fk))   # learned logits per block
        else:
            self.route = nn.Linear(r, 3, **fk)         # W_route (3, r), b_route (3,)
            with torch.no_grad():
                self.route.weight.zero_()
                self.route.bias.zero_()                # α = softmax(0) = 1/3 at init
            self.route_logits = None

        shape = {"per_channel": (r,), "per_frequency": (h, w, r), "per_layer": (1,)}[config.params]
        # t is shared by heat and wave: otherwise only the products k·t and c·t would matter
        self.k_raw = nn.Parameter(torch.full(shape, SOFTPLUS_ONE, **fk))
        self.c_raw = nn.Parameter(torch.full(shape, SOFTPLUS_ONE, **fk))
        self.t_raw = nn.Parameter(torch.full(shape, SOFTPLUS_ONE, **fk))
        # ρ: Poisson source distribution f = ρ ⊙ X on the training grid [INFERRED: unconstrained, init 1]
        self.rho = nn.Parameter(torch.ones(h, w, **fk))
        self.scale = nn.Parameter(torch.tensor(float(config.scale), **fk)) if config.learnable_scale else None

        # Orthonormal DCT-II matrices for the training grid: fp32, non-persistent (rebuilt, never saved)
        self.register_buffer("dct_h", _dct.dct_matrix(h, torch.float32, "cpu").to(device), persistent=False)
        self.register_buffer("dct_w", _dct.dct_matrix(w, torch.float32, "cpu").to(device), persistent=False)
        self._record = _RouteRecord()

    def extra_repr(self) -> str:
        c = self.config
        return (f"dim={self.dim}, rank={self.rank}, grid={self.grid_size}, prefix={self.num_prefix_tokens}, "
                f"router={c.router}, laplacian={c.laplacian}, params={c.params}, placement={c.placement}")

    # ------------------------------------------------------------------ grid-dependent constants
    def grid_for(self, n_grid: int) -> tuple[int, int]:
        """``(H, W)`` for ``n_grid`` grid tokens: the training grid if it fits, else a square grid."""
        h, w = self.grid_size
        if n_grid == h * w:
            return h, w
        side = math.isqrt(n_grid)
        if side * side == n_grid and side > 0:
            return side, side
        raise ValueError(f"MoPPA: {n_grid} grid tokens fit neither the training grid {h}x{w} nor a square")

    def _dct_mats(self, h: int, w: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``C_H (H, H)``, ``C_W (W, W)`` in ``dtype``: the buffers on the training grid, else the cache."""
        buf = self.dct_h
        if (h, w) == self.grid_size and buf.dtype == dtype and buf.device == torch.device(device):
            return self.dct_h, self.dct_w
        # another grid, or buffers cast by model.to(dtype) (e.g. bf16): use exact cached matrices instead
        return _dct.dct_matrix(h, dtype, device), _dct.dct_matrix(w, dtype, device)

    def _on_grid(self, p: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Resample a grid-indexed tensor ``(H0, W0)`` or ``(H0, W0, r)`` bilinearly to ``(h, w[, r])``."""
        if tuple(p.shape[:2]) == (h, w):
            return p
        x = p if p.dim() == 3 else p[..., None]                          # (H0, W0, C)
        x = x.permute(2, 0, 1)[None]                                     # (1, C, H0, W0)
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        x = x[0].permute(1, 2, 0)                                        # (h, w, C)
        return x if p.dim() == 3 else x[..., 0]

    def coefficients(self, h: int, w: int, dtype: torch.dtype = torch.float32):
        """Positive ``(k, c, t)`` broadcastable to ``(h, w, r)``: ``(r,)``, ``(h, w, r)`` or ``(1,)``."""
        out = []
        for raw in (self.k_raw, self.c_raw, self.t_raw):
            if raw.dim() == 3:                                           # per_frequency: resample raw values
                raw = self._on_grid(raw, h, w)
            out.append(F.softplus(raw.to(dtype)))
        return tuple(out)

    def source(self, h: int, w: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ρ on an ``(h, w)`` grid (bilinear resampling off the training grid), shape ``(h, w)``."""
        return self._on_grid(self.rho, h, w).to(dtype)

    def responses(self, h: int, w: int, dtype: torch.dtype = torch.float32, device=None):
        """The three multipliers ``(K_heat, K_wave, K_pois)``, broadcastable to ``(h, w, r)``."""
        device = self.k_raw.device if device is None else device
        cfg = self.config
        lam = _dct.laplacian_eigenvalues(h, w, cfg.laplacian, dtype, device)[..., None]   # (h, w, 1)
        k, c, t = self.coefficients(h, w, dtype)
        k_heat = _dct.heat_response(lam, k, t)                          # exp(−k t Λ)
        k_wave = _dct.wave_response(lam, c, t, cfg.wave_v0)            # cos(c t √Λ) [+ sin(c t √Λ)/(c √Λ)]
        k_pois = _dct.poisson_response(lam, cfg.poisson, POISSON_MU)   # μ/(μ + Λ)  or  −1/Λ (DC 0)
        return k_heat, k_wave, k_pois

    # ------------------------------------------------------------------ the spatial operators
    def prior_outputs(self, z_grid: torch.Tensor) -> torch.Tensor:
        """The three priors applied to a grid map, before routing ("router off").

        ``z_grid``: ``(B, H, W, r)`` in the compute dtype. Returns ``(B, 3, H, W, r)`` stacking
        ``[Y_heat, Y_wave, Y_pois]``.
        """
        _, h, w, _ = z_grid.shape
        dtype, device = z_grid.dtype, z_grid.device
        c_h, c_w = self._dct_mats(h, w, dtype, device)
        k_heat, k_wave, k_pois = self.responses(h, w, dtype, device)
        z_hat = _dct.dct2(z_grid, c_h, c_w)                                             # (B, H, W, r)
        src_hat = _dct.dct2(self.source(h, w, dtype)[..., None] * z_grid, c_h, c_w)    # DCT2(ρ ⊙ z)
        spectra = torch.stack([z_hat * k_heat, z_hat * k_wave, src_hat * k_pois], dim=1)  # (B, 3, H, W, r)
        return _dct.idct2(spectra, c_h, c_w)                               # one inverse for all 3

    def routing(self, z_grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router weights and their log: ``α, log α`` of shape ``(B, H, W, 3)`` (token), ``(B, 1, 1, 3)``
        (image: from the grid-average feature) or ``(1, 1, 1, 3)`` (static), all in ``z_grid``'s dtype."""
        dtype = z_grid.dtype
        if self.route is None:                                                           # static
            logits = self.route_logits.to(dtype).view(1, 1, 1, 3)
        else:
            weight, bias = self.route.weight.to(dtype), self.route.bias.to(dtype)
            if self.config.router == "token":
                logits = F.linear(z_grid, weight, bias)                                  # (B, H, W, 3)
            else:                                                          # image: GAP over grid
                logits = F.linear(z_grid.mean(dim=(1, 2)), weight, bias)[:, None, None, :]
        log_alpha = F.log_softmax(logits, dim=-1)
        return log_alpha.exp(), log_alpha

    def spatial_mix(self, z_grid: torch.Tensor) -> torch.Tensor:
        """``Y_grid = Σ_p α_p Y_p`` for a grid map ``(B, H, W, r)``; records the routing (regulariser)."""
        priors = self.prior_outputs(z_grid)                                 # (B, 3, H, W, r)
        alpha, log_alpha = self.routing(z_grid)                             # (B|1, H|1, W|1, 3)
        b, h, w = z_grid.shape[:3]
        # I_ℓ: mean of α over batch and grid tokens (broadcast image/static α to every token first)
        self._record.importance = alpha.expand(b, h, w, 3).mean(dim=(0, 1, 2))
        self._record.entropy = -(alpha * log_alpha).sum(-1).mean()
        weights = alpha.permute(0, 3, 1, 2)[..., None]                      # (B|1, 3, H|1, W|1, 1): over r
        return (weights * priors).sum(dim=1)                                # (B, H, W, r)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """``s · MoPPA(u)``: ``(B, N, d) -> (B, N, d)`` in ``u``'s dtype."""
        b, n, d = u.shape
        p = self.num_prefix_tokens
        r = self.rank
        z = self.down(u.to(self.down.weight.dtype))                         # (B, N, r); bf16 under autocast
        if self.config.act == "gelu":
            z = F.gelu(z)
        h, w = self.grid_for(n - p)
        # The DCT path in fp32 (fp64 for fp64 inputs, e.g. gradcheck), never in bf16/fp16
        compute = torch.float64 if z.dtype == torch.float64 else torch.float32
        with _no_autocast(u.device.type):
            z_grid = z[:, p:].to(compute).reshape(b, h, w, r)               # row-major: token P + h·W + w
            y_grid = self.spatial_mix(z_grid)                               # (B, H, W, r)
        y_grid = y_grid.to(z.dtype).reshape(b, h * w, r)
        if self.config.prefix_tokens == "identity" or p == 0:
            out = self.up(torch.cat([z[:, :p], y_grid], dim=1))             # prefix: identity spatial op
        else:                                                               # excluded: prefix gets no update
            grid_out = self.up(y_grid)
            out = torch.cat([grid_out.new_zeros(b, p, grid_out.shape[-1]), grid_out], dim=1)
        if self.scale is not None:
            out = out * self.scale.to(out.dtype)
        elif self.config.scale != 1.0:
            out = out * self.config.scale
        return out.to(u.dtype)

    # ------------------------------------------------------------------ hooks (the three placements)
    def _hook_sequential(self, module, args, output):
        """Forward hook on norm1: ``u' = u + s·MoPPA(u)``."""
        return output + self(output)

    def _hook_pre_norm(self, module, args):
        """Forward pre-hook on norm1: ``norm1(x + s·MoPPA(x))`` (the residual stream keeps x)."""
        x = args[0]
        return (x + self(x),) + tuple(args[1:])

    def _hook_parallel(self, module, args, kwargs, output):
        """Forward hook on the attention module: ``attn(u) + s·MoPPA(u)`` with u its input (= norm1(x))."""
        if args:
            u = args[0]
        else:  # transformers calls self_attn(hidden_states=...), timm calls attn(x)
            u = kwargs["hidden_states"] if "hidden_states" in kwargs else kwargs["x"]
        if isinstance(output, tuple):  # CLIPAttention returns (attn_output, attn_weights)
            return (output[0] + self(u),) + output[1:]
        return output + self(u)


# ============================================================================ attaching to backbones

def is_moppa_param(name: str) -> bool:
    """True for MoPPA tensor names (some dotted part starts with ``moppa_``)."""
    return any(part.startswith("moppa_") for part in name.split("."))


def moppa_units(model: nn.Module) -> list[tuple[str, MoppaUnit]]:
    """``(name, unit)`` for every MoPPA unit in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoppaUnit)]


@dataclass
class _Site:
    block: str            # e.g. "blocks.3" or "model.vision_tower.encoder.layers.3"
    norm: nn.Module       # the pre-attention norm the unit hangs on
    attn: nn.Module       # the attention module (parallel placement hooks its output)
    dim: int
    grid: tuple[int, int]
    prefix: int


def _is_timm_vit(model: nn.Module) -> bool:
    return (hasattr(model, "blocks") and hasattr(model, "patch_embed")
            and hasattr(model.patch_embed, "grid_size") and hasattr(model, "num_prefix_tokens"))


def _is_clip_tower(module: nn.Module) -> bool:
    enc = getattr(module, "encoder", None)
    emb = getattr(module, "embeddings", None)
    cfg = getattr(module, "config", None)
    return (isinstance(getattr(enc, "layers", None), nn.ModuleList) and emb is not None
            and hasattr(emb, "patch_embedding") and hasattr(cfg, "image_size") and hasattr(cfg, "patch_size"))


def _clip_used_layers(root: nn.Module, tower: nn.Module, n_layers: int, config: MoppaConfig) -> int:
    """How many leading CLIP layers to adapt (layers whose output reaches the consumer)."""
    if config.clip_layers is not None:
        if config.clip_layers > n_layers:
            raise ValueError(
                f"MoppaConfig.clip_layers={config.clip_layers} exceeds the tower's {n_layers} layers")
        return config.clip_layers
    vfl = getattr(getattr(root, "config", None), "vision_feature_layer", None) if root is not tower else None
    if vfl is None:
        return n_layers - 1  # a standalone tower: all but the last (LLaVA-style consumer assumed)
    # hidden_states[i] is the output of layer i-1 (hidden_states[0] = embeddings): index i uses layers 0..i-1
    idx = [v if v >= 0 else n_layers + 1 + v for v in (vfl if isinstance(vfl, (list, tuple)) else [vfl])]
    return max(idx)


def _find_sites(model: nn.Module, config: MoppaConfig) -> tuple[list[_Site], list[nn.Parameter]]:
    """The blocks to adapt and the backbone parameters to freeze."""
    if _is_timm_vit(model):
        grid = tuple(int(g) for g in model.patch_embed.grid_size)
        prefix = int(model.num_prefix_tokens)
        sites = []
        for i, blk in enumerate(model.blocks):
            if not (hasattr(blk, "norm1") and hasattr(blk, "attn")):
                raise ValueError(f"MoPPA: timm block {i} has no norm1/attn ({type(blk).__name__})")
            dim = getattr(model, "embed_dim", None) or blk.norm1.weight.shape[0]
            sites.append(_Site(f"blocks.{i}", blk.norm1, blk.attn, int(dim), grid, prefix))
        head = model.get_classifier() if hasattr(model, "get_classifier") else getattr(model, "head", None)
        head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
        frozen = [p for p in model.parameters() if id(p) not in head_ids]
        return sites, frozen

    if _is_clip_tower(model):
        towers = [("", model)]
    else:
        # LLaVA (LlavaForConditionalGeneration / LlavaModel): the tower under `vision_tower`, never the LM
        towers = [(n, m) for n, m in model.named_modules()
                  if re.search(r"(^|\.)vision_tower$", n) and _is_clip_tower(m)]
        if len(towers) != 1:
            raise ValueError(
                f"MoPPA supports a timm VisionTransformer, a CLIP vision tower or a LLaVA model with one "
                f"CLIP `vision_tower`; got {type(model).__name__} ({len(towers)} vision towers found)")
    name, tower = towers[0]
    layers = tower.encoder.layers
    n_use = _clip_used_layers(model, tower, len(layers), config)
    if n_use < 1:
        raise ValueError("MoPPA: no CLIP layer reaches the output (vision_feature_layer selects embeddings)")
    tcfg = tower.config
    side = int(tcfg.image_size) // int(tcfg.patch_size)
    prefix = f"{name}." if name else ""
    sites = []
    for i in range(n_use):
        layer = layers[i]
        if not (hasattr(layer, "layer_norm1") and hasattr(layer, "self_attn")):
            raise ValueError(f"MoPPA: CLIP layer {i} has no layer_norm1/self_attn ({type(layer).__name__})")
        sites.append(_Site(f"{prefix}encoder.layers.{i}", layer.layer_norm1, layer.self_attn,
                           int(tcfg.hidden_size), (side, side), 1))
    return sites, list(tower.parameters())


def apply_moppa(model: nn.Module, config: MoppaConfig) -> nn.Module:
    """Attach one MoPPA unit per block, in place, and freeze the backbone. Returns ``model``.

    Supported: a timm ``VisionTransformer`` (every block; grid ``patch_embed.grid_size``, P =
    ``num_prefix_tokens``), a transformers ``CLIPVisionModel`` or the ``vision_tower`` inside a LLaVA model
    (layers ``0 .. n-1`` with n from ``config.clip_layers``, see :class:`MoppaConfig`; grid
    ``image_size // patch_size``, P = 1). The unit hangs on the pre-attention norm as
    ``<norm>.moppa_unit`` and is wired in with hooks according to ``config.placement``:

    - ``sequential``: forward hook on norm1, ``u' = u + s·MoPPA(u)``;
    - ``parallel``: forward hook on attention, ``attn(u) + s·MoPPA(u)`` (on timm this sum then passes
      the block's ``ls1``/``drop_path1``, Identity for the usual ViT-B checkpoints);
    - ``pre_norm``: forward pre-hook on norm1, ``norm1(x + s·MoPPA(x))``.

    Every original backbone parameter (norms included) gets ``requires_grad=False``; a timm classifier
    head (``get_classifier()``) and anything outside a LLaVA vision tower (projector, language model) are
    left as they are. New parameters are fp32 (fp64 if the backbone is fp64) on the backbone's device
    (``meta`` works, for counting). Raises ``ValueError`` for unsupported models or a second application.
    """
    if not isinstance(config, MoppaConfig):
        raise ValueError(f"config must be a MoppaConfig, got {type(config).__name__}")
    if moppa_units(model):
        raise ValueError("MoPPA is already applied to this model")
    sites, frozen = _find_sites(model, config)
    for p in frozen:
        p.requires_grad_(False)
    for site in sites:
        ref = next(site.norm.parameters(), None)
        if ref is None:
            ref = next(site.attn.parameters())
        dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
        unit = MoppaUnit(site.dim, site.grid, site.prefix, config, device=ref.device, dtype=dtype)
        site.norm.add_module(UNIT_NAME, unit)
        if config.placement == "sequential":
            site.norm.register_forward_hook(unit._hook_sequential)
        elif config.placement == "pre_norm":
            site.norm.register_forward_pre_hook(unit._hook_pre_norm)
        else:
            site.attn.register_forward_hook(unit._hook_parallel, with_kwargs=True)
    return model


# ============================================================================ router regulariser and stats

def route_balance(importance: torch.Tensor, kind: str = "cv2",
                  entropy: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Balance loss of one layer's routing (0 for uniform routing, ≥ 0 otherwise).

    ``importance``: ``I_ℓ (3,)``, the mean of α over batch and grid tokens.
    - ``cv2`` (default): squared coefficient of variation ``Var(I)/Mean(I)² = 3·Σ_p (I_p − 1/3)²``
      (population variance; Mean(I) = 1/3 since Σ I = 1). E.g. ``I = (0.6, 0.2, 0.2)`` gives 0.32.
      Computed in the equivalent pairwise form ``Σ_{p<q} (I_p − I_q)² / (Σ_p I_p)²``, which is exactly 0
      (not a rounding residue) when the three importances are equal, as at init.
    - ``kl``: ``KL(I ‖ uniform) = Σ_p I_p log(3 I_p)``.
    - ``entropy``: ``log 3 − H̄`` with ``H̄`` the mean per-token entropy of α (pass ``entropy``); a bonus
      that also flattens each token's routing, not only the average.
    """
    if kind == "cv2":
        diffs = importance[:, None] - importance[None, :]                  # (3, 3), antisymmetric
        return 0.5 * (diffs ** 2).sum() / importance.sum() ** 2             # 0.5: each pair counted twice
    if kind == "kl":
        return (importance * torch.log(importance.clamp_min(1e-12) * 3.0)).sum()
    if kind == "entropy":
        if entropy is None:
            raise ValueError("route_balance(kind='entropy') needs the mean router entropy")
        return math.log(3.0) - entropy
    raise ValueError(f"route_reg must be one of {list(_CHOICES['route_reg'])}, got {kind!r}")


def _units_or_raise(model: nn.Module) -> list[MoppaUnit]:
    units = [u for _, u in moppa_units(model)]
    if not units:
        raise ValueError("the model has no MoPPA units (call apply_moppa first)")
    return units


def route_loss(model: nn.Module, progress: float = 0.0) -> torch.Tensor:
    """``L_route = λ_r(progress) · mean_ℓ balance(I_ℓ)`` from the most recent forward pass; a 0-dim tensor.

    ``λ_r(progress) = route_lambda`` (``route_schedule="constant"``) or ``route_lambda·(1 − progress)``
    (``"linear_decay"``; ``progress`` ∈ [0, 1] is the fraction of training done, clamped). The balance
    loss is ``config.route_reg`` (:func:`route_balance`). Exactly ``0`` (a constant, no graph) when the
    effective λ is 0. Differentiable through the router when the forward pass ran with grad enabled.
    """
    units = _units_or_raise(model)
    cfg = units[0].config
    lam = float(cfg.route_lambda)
    if cfg.route_schedule == "linear_decay":
        lam *= 1.0 - min(max(float(progress), 0.0), 1.0)
    device = units[0].down.weight.device
    if lam == 0.0:
        return torch.zeros((), device=device)
    losses = []
    for unit in units:
        rec = unit._record
        if rec.importance is None:
            raise RuntimeError("route_loss: no routing recorded yet (run a forward pass first)")
        losses.append(route_balance(rec.importance, cfg.route_reg, rec.entropy).float())
    return lam * torch.stack(losses).mean()


@torch.no_grad()
def router_statistics(model: nn.Module) -> dict[str, float]:
    """Scalars for logging, averaged over MoPPA layers.

    ``moppa/importance/{heat,wave,poisson}`` (mean α per prior) and ``moppa/router_entropy`` (mean
    per-token entropy in nats; log 3 ≈ 1.0986 is uniform) from the most recent forward pass, when there
    was one; ``moppa/{k,c,t}`` (mean of the positive constants), ``moppa/rho`` (mean source weight) and
    ``moppa/scale`` with ``learnable_scale``.
    """
    units = _units_or_raise(model)
    stats: dict[str, float] = {}
    recs = [u._record for u in units if u._record.importance is not None]
    if recs:
        imp = torch.stack([r.importance.detach().float().cpu() for r in recs]).mean(0)
        for name, v in zip(PRIORS, imp.tolist()):
            stats[f"moppa/importance/{name}"] = v
        ent = torch.stack([r.entropy.detach().float().cpu() for r in recs])
        stats["moppa/router_entropy"] = float(ent.mean())
    for key in ("k", "c", "t"):
        stats[f"moppa/{key}"] = float(torch.stack(
            [F.softplus(getattr(u, f"{key}_raw").float()).mean().cpu() for u in units]).mean())
    stats["moppa/rho"] = float(torch.stack([u.rho.float().mean().cpu() for u in units]).mean())
    if units[0].scale is not None:
        stats["moppa/scale"] = float(torch.stack([u.scale.float().cpu() for u in units]).mean())
    return stats


# ============================================================================ parameters, save / load

def _moppa_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(full name, parameter)`` of every parameter inside a :class:`MoppaUnit` (also on a bare unit)."""
    out = []
    for unit_name, unit in moppa_units(model):
        for n, p in unit.named_parameters():
            out.append((f"{unit_name}.{n}" if unit_name else n, p))
    return out


def count_moppa_parameters(model: nn.Module) -> int:
    """Number of MoPPA parameters (per block: d·r + r + r·d + d + 3r + 3 + 3r + H·W for the defaults)."""
    return sum(p.numel() for _, p in _moppa_named_parameters(model))


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters that must get no weight decay.

    MoPPA's biases, k, c, t (raw), ρ (2-D: selected by name, not by ``ndim``), static router logits and a
    learnable scale, plus every other *trainable* bias (e.g. the classifier ``head.bias``).
    """
    moppa = {n for n, _ in _moppa_named_parameters(model)}
    names = {n for n in moppa if n.rsplit(".", 1)[-1] in _NO_DECAY_LEAVES}
    for n, p in model.named_parameters():
        if n not in moppa and n.rsplit(".", 1)[-1] == "bias" and p.requires_grad:
            names.add(n)
    return names


def moppa_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """All MoPPA parameters, keyed by their names in ``model``, as detached CPU clones (no DCT buffers)."""
    return {n: p.detach().cpu().clone() for n, p in _moppa_named_parameters(model)}


def load_moppa_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a :func:`moppa_state_dict` into ``model`` (built with the same config), strictly.

    Raises ``ValueError`` naming the missing keys, unexpected keys or shape mismatches; nothing is copied
    unless all keys match. Values are cast to each parameter's dtype and device.
    """
    params = dict(_moppa_named_parameters(model))
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    mismatched = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(params[k].shape)}"
                        for k in set(params) & set(state) if tuple(state[k].shape) != tuple(params[k].shape))
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if mismatched:
            parts.append(f"shape mismatch {mismatched}")
        raise ValueError("load_moppa_state_dict: " + "; ".join(parts))
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k].to(device=p.device, dtype=p.dtype))

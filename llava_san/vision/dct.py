"""Orthonormal 2-D DCT-II on a token grid, and the frequency responses of MoPPA's three physical priors.

Everything here is a pure function of its arguments (plus small caches of constant
matrices), so each piece can be tested alone; :mod:`llava_san.vision.moppa` composes them.

**Why the DCT.** The orthonormal DCT-II basis is the eigenbasis of the Laplacian Δ on an ``H × W``
grid with Neumann (reflecting) boundaries. A linear, shift-invariant PDE in Δ (heat, wave, screened
Poisson) therefore acts on each DCT coefficient ``(n, m)`` independently: it becomes a per-frequency
multiplier ``K(Λ[n, m])`` with ``Λ[n, m] = ω_n² + ω_m²`` the eigenvalue of ``−Δ``. Solving the PDE is

    Y = IDCT2( DCT2(X) ⊙ K )

**Conventions.** Grids are channels-last: ``X ∈ R[..., H, W, C]`` (H rows, W columns, C channels),
matching the row-major token layout of a ViT (token ``P + h·W + w`` is cell ``(h, w)``). The DCT matrix
``C_N[n, x] = a_n · cos(π (x + ½) n / N)`` with ``a_0 = √(1/N)``, ``a_n = √(2/N)`` is orthogonal, so
the inverse transform uses its transpose; ``dct2`` equals ``scipy.fft.dctn(X, type=2, norm='ortho',
axes=(-3, -2))``.

**Precision.** The matrices are built in float64 and cast once; transforms run in the dtype of their
inputs. MoPPA calls them in fp32 (fp64 in gradchecks) with autocast disabled, never in bf16/fp16: a
14-point DCT in bf16 loses ~2 significant digits, and the heat/wave multipliers need more than that.
"""
from __future__ import annotations

import functools
import math

import torch

__all__ = [
    "dct_matrix",
    "dct2",
    "idct2",
    "laplacian_eigenvalues",
    "heat_response",
    "wave_response",
    "poisson_response",
    "LAPLACIANS",
    "WAVE_V0",
    "POISSON_KINDS",
]

LAPLACIANS = ("continuous", "discrete")
WAVE_V0 = ("zero", "input")
POISSON_KINDS = ("screened", "pure")


def _device_key(device) -> str:
    return str(torch.device(device)) if device is not None else "cpu"


@functools.lru_cache(maxsize=64)
def _dct_matrix_cached(n: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    # Built outside inference mode so that a matrix first requested under torch.inference_mode() is
    # still usable (saved for backward) by a later training forward.
    with torch.inference_mode(False), torch.no_grad():
        freq = torch.arange(n, dtype=torch.float64)[:, None]                 # (n, 1) frequency index
        pos = torch.arange(n, dtype=torch.float64)[None, :] + 0.5            # (1, n) sample position x + 1/2
        c = torch.cos(math.pi * freq * pos / n)                              # (n, n)
        scale = torch.full((n, 1), math.sqrt(2.0 / n), dtype=torch.float64)
        scale[0, 0] = math.sqrt(1.0 / n)                                     # a_0 = √(1/N): row 0 unit-norm
        return (scale * c).to(dtype=dtype, device=device)


def dct_matrix(n: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``C[n, x] = a_n cos(π (x + ½) n / N)``, shape ``(N, N)``.

    ``C @ C.T = I``; ``C @ v`` equals ``scipy.fft.dct(v, type=2, norm='ortho')``. Cached per
    ``(N, dtype, device)``: the returned tensor is shared, never modify it in place.
    """
    if n < 1:
        raise ValueError(f"DCT size must be >= 1, got {n}")
    return _dct_matrix_cached(int(n), dtype, _device_key(device))


def dct2(x: torch.Tensor, c_h: torch.Tensor, c_w: torch.Tensor) -> torch.Tensor:
    """2-D DCT-II over the grid axes of a channels-last map.

    ``x``: ``(..., H, W, C)``; ``c_h``: ``(H, H)``; ``c_w``: ``(W, W)`` from :func:`dct_matrix`.
    Returns ``X̂[..., n, m, c] = Σ_{h,w} C_H[n, h] X[..., h, w, c] C_W[m, w]``, shape ``(..., H, W, C)``.
    """
    return torch.einsum("nh,...hwc,mw->...nmc", c_h, x, c_w)


def idct2(x_hat: torch.Tensor, c_h: torch.Tensor, c_w: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`dct2` (the transposes, since C is orthogonal); shapes as in :func:`dct2`."""
    return torch.einsum("nh,...nmc,mw->...hwc", c_h, x_hat, c_w)


@functools.lru_cache(maxsize=64)
def _laplacian_cached(h: int, w: int, kind: str, dtype: torch.dtype, device: str) -> torch.Tensor:
    with torch.inference_mode(False), torch.no_grad():
        def omega2(n_pts: int) -> torch.Tensor:                              # (n_pts,) squared frequencies
            n = torch.arange(n_pts, dtype=torch.float64)
            if kind == "continuous":
                return (math.pi * n / n_pts) ** 2                              # ω_n = π n / N (vHeat)
            # eigenvalues of the 1-D Neumann 3-point −Δ
            return 4.0 * torch.sin(math.pi * n / (2 * n_pts)) ** 2

        lam = omega2(h)[:, None] + omega2(w)[None, :]                         # (H, W), Λ[0, 0] = 0
        return lam.to(dtype=dtype, device=device)


def laplacian_eigenvalues(h: int, w: int, kind: str = "continuous", dtype: torch.dtype = torch.float32,
                          device=None) -> torch.Tensor:
    """``Λ[n, m] = ω_n² + ω_m²``: the eigenvalue of ``−Δ`` for DCT mode ``(n, m)``, shape ``(H, W)``.

    ``kind="continuous"`` (default, vHeat): ``ω_n = π n / H``, the continuum Laplacian on a unit-spaced
    grid of side H. ``kind="discrete"``: ``ω_n² = 4 sin²(π n / 2H)``, the exact eigenvalues of the 2-D
    5-point Neumann Laplacian matrix L (so the filters equal ``expm(−k t L)`` etc. to rounding). Both
    have ``Λ[0, 0] = 0`` (the constant mode) and agree at low frequency. Cached; do not modify in place.
    """
    if kind not in LAPLACIANS:
        raise ValueError(f"laplacian must be one of {LAPLACIANS}, got {kind!r}")
    return _laplacian_cached(int(h), int(w), kind, dtype, _device_key(device))


# ----------------------------------------------------------------------------------------------------
# Frequency responses. ``lam`` is Λ broadcast against the parameters, typically ``(H, W, 1)`` against
# per-channel ``(r,)`` parameters, giving ``(H, W, r)``. Parameters are already positive (softplus is
# applied by the caller). All are differentiable in the parameters; Λ is a constant.
# ----------------------------------------------------------------------------------------------------

def heat_response(lam: torch.Tensor, k: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Heat equation ``∂u/∂t = k Δu``, ``u(0) = X``, read at time t: ``K = exp(−k t Λ)``.

    A low-pass filter with ``K ∈ (0, 1]``, ``K = 1`` at DC (the spatial mean is conserved: Neumann
    boundaries are insulating), non-increasing in Λ, and a semigroup ``K(t₁) K(t₂) = K(t₁ + t₂)``.
    """
    return torch.exp(-k * t * lam)


def wave_response(lam: torch.Tensor, c: torch.Tensor, t: torch.Tensor, v0: str = "zero") -> torch.Tensor:
    """Wave equation ``∂²u/∂t² = c² Δu``, ``u(0) = X``, read at time t.

    ``v0="zero"`` (default): ``u̇(0) = 0`` gives ``K = cos(c t √Λ)``: all-pass in magnitude (|K| ≤ 1, no
    decay), oscillating in frequency, ``K = 1`` at DC. ``v0="input"``: ``u̇(0) = X`` adds
    ``sin(c t √Λ) / (c √Λ)``, whose limit at Λ = 0 is t (DC gain 1 + t; no longer bounded by 1).
    """
    if v0 not in WAVE_V0:
        raise ValueError(f"wave_v0 must be one of {WAVE_V0}, got {v0!r}")
    omega = torch.sqrt(lam)                        # √Λ ≥ 0, a constant (no gradient through the sqrt)
    phase = c * t * omega
    k = torch.cos(phase)
    if v0 == "input":
        dc = lam <= 0
        # sin(c t ω)/(c ω) with its limit t at ω = 0; the `where` keeps both value and gradient finite
        safe_den = torch.where(dc, torch.ones_like(phase), c * omega)
        k = k + torch.where(dc, t * torch.ones_like(phase), torch.sin(phase) / safe_den)
    return k


def poisson_response(lam: torch.Tensor, kind: str = "screened", mu: float = 1.0) -> torch.Tensor:
    """Poisson steady state as a multiplier on the DCT of the source ``f = ρ ⊙ X``.

    ``kind="screened"`` (default): ``(μ − Δ) u = μ f`` gives ``K = μ / (μ + Λ)``: ``K ∈ (0, 1]``, DC gain
    1, a ``1/Λ`` fall-off (global equilibrium without the singular constant mode). ``kind="pure"``:
    ``Δu = f`` gives ``K = −1/Λ`` with ``K[Λ = 0] = 0`` (the zero-mean potential; DC is not solvable).
    """
    if kind not in POISSON_KINDS:
        raise ValueError(f"poisson must be one of {POISSON_KINDS}, got {kind!r}")
    if kind == "screened":
        return mu / (mu + lam)
    dc = lam <= 0
    return torch.where(dc, torch.zeros_like(lam), -1.0 / torch.where(dc, torch.ones_like(lam), lam))

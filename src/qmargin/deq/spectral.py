"""One home for the spectral quantities of a MonDEQ operator (design.md §5).

Every other module (the realized operators, the certificates, certified QAT) computes ``mu(W)``,
``L(W)``, spectral norms and the per-frequency blocks of a circular convolution with the functions
here. They are *dtype-preserving* and differentiable (autograd through ``torch.linalg.eigvalsh`` /
``matrix_norm``): a caller that wants float64 (the certificates) converts before calling, a caller
that runs in the model's precision (the solvers' step sizes) does not.

An operator ``W`` is a dense ``(n, n)`` matrix or a ``(..., c, c)`` stack of the blocks ``W_f`` of a
block-diagonal operator (a circular convolution is block-diagonalised by the unitary 2-D DFT). For a
stack every quantity is the min / max over the blocks.

Symbols (design.md §5):

* monotonicity margin ``mu(W) = lambda_min((I - W + (I - W)^H) / 2)``  (:func:`margin`);
* Lipschitz constant ``L(W) = ||I - W||_2``  (:func:`lipschitz`);
* ``||D||_2``, the largest singular value  (:func:`spectral_norm`);
* ``lambda_max(sym(D))``, by how much a perturbation ``D`` can lower a margin (Weyl)
  (:func:`sym_max_eigenvalue`).

Convolution convention (PyTorch cross-correlation on a circular grid, kernel centred at
``(rh, rw) = (kh // 2, kw // 2)``, also for even sizes; this is what
:func:`qmargin.deq.operators.circular_conv2d` applies)::

    (W z)[o, i, j] = sum_{c, p, q} K[o, c, p, q] z[c, (i + p - rh) mod H, (j + q - rw) mod W]

With ``Z = fft2(z)`` this reads ``(W z)^[:, u, v] = K_(u, v) Z[:, u, v]`` with the block

    K_(u, v)[o, c] = sum_{p, q} K[o, c, p, q] exp(+2 pi i (u (p - rh) / H + v (q - rw) / W)),

blocks ordered ``f = u * W + v`` (:func:`conv_blocks`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "identity_minus",
    "hermitian_part",
    "margin",
    "lipschitz",
    "margin_and_lipschitz",
    "spectral_norm",
    "sym_max_eigenvalue",
    "kernel_centre",
    "conv_blocks",
]


def identity_minus(W: Tensor) -> Tensor:
    """``I - W`` for a dense ``(n, n)`` ``W`` or a ``(..., c, c)`` stack of blocks."""
    eye = torch.eye(W.shape[-1], dtype=W.dtype, device=W.device)
    return eye - W


def hermitian_part(M: Tensor) -> Tensor:
    """``(M + M^H) / 2`` (``M^T`` for real ``M``)."""
    return (M + M.mH) / 2


def margin(W: Tensor) -> Tensor:
    """Monotonicity margin ``mu(W) = lambda_min((I - W + (I - W)^H) / 2)`` (min over blocks).

    ``eigvalsh`` (ascending) of the Hermitian part of ``I - W``, smallest eigenvalue, min over blocks:
    a 0-d real tensor in ``W``'s precision, differentiable where the smallest eigenvalue is simple.
    ``mu(W) > 0`` means ``F(z) = (I - W) z - (U x + b)`` is ``mu``-strongly monotone.
    """
    return torch.linalg.eigvalsh(hermitian_part(identity_minus(W)))[..., 0].min()


def spectral_norm(D: Tensor) -> Tensor:
    """``||D||_2``: the largest singular value of a ``(m, n)`` matrix, max over a ``(..., m, n)`` stack.

    ``torch.linalg.matrix_norm(ord=2)`` (exact, batched); 0-d real tensor in ``D``'s precision.
    """
    return torch.linalg.matrix_norm(D, ord=2).max()


def lipschitz(W: Tensor) -> Tensor:
    """Lipschitz constant ``L(W) = ||I - W||_2`` (max over blocks)."""
    return spectral_norm(identity_minus(W))


def margin_and_lipschitz(W: Tensor) -> tuple[Tensor, Tensor]:
    """``(mu(W), L(W))`` of a dense ``W`` or a stack of blocks (:func:`margin`, :func:`lipschitz`)."""
    return margin(W), lipschitz(W)


def sym_max_eigenvalue(D: Tensor) -> Tensor:
    """``lambda_max((D + D^H) / 2)`` (max over blocks).

    Weyl: ``mu(W + D) >= mu(W) - lambda_max(sym(D))`` and ``lambda_max(sym(D)) <= ||D||_2``.
    """
    return torch.linalg.eigvalsh(hermitian_part(D))[..., -1].max()


# --------------------------------------------------------------------------------------------------
# Per-frequency blocks of a circular convolution
# --------------------------------------------------------------------------------------------------
def kernel_centre(k: int) -> int:
    """Centre tap ``k // 2`` of a kernel of size ``k`` (odd or even), see the module docstring."""
    return k // 2


def _complex_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype in (torch.float64, torch.complex128):
        return torch.complex128
    return torch.complex64


def _phases(n: int, freqs: Tensor, k: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``exp(+2 pi i f (p - k // 2) / n)`` for ``f`` in ``freqs``, ``p = 0..k-1``: ``(len(freqs), k)``."""
    offs = torch.arange(k, device=device, dtype=torch.int64) - kernel_centre(k)
    steps = torch.remainder(freqs[:, None].to(torch.int64) * offs[None, :], n)
    ang = steps.to(torch.float64) * (2 * math.pi / n)
    return torch.polar(torch.ones_like(ang), ang).to(dtype)


def conv_blocks(kernel: Tensor, grid: tuple[int, int], *, half: bool = False) -> Tensor:
    """Per-frequency blocks of the circular convolution with ``kernel`` on ``grid``: ``(H, W', c_out, c_in)``.

    ``K_(u, v) = sum_{p, q} K[:, :, p, q] exp(+2 pi i (u (p - rh) / H + v (q - rw) / W))`` with
    ``(rh, rw) = (kh // 2, kw // 2)`` for ``u = 0..H-1`` and ``v = 0..W-1`` (``W' = W``) or, with
    ``half``, ``v = 0..W//2`` (the rfft frequencies, ``W' = W // 2 + 1``; for a real kernel the others
    are complex conjugates of these, with the same singular values and Hermitian-part eigenvalues).
    Differentiable, complex in the precision of ``kernel`` (complex64 for float32, complex128 for
    float64 / complex128). Kernels larger than the grid wrap around exactly as the circular
    convolution does.
    """
    H, W = grid
    cd = _complex_dtype(kernel.dtype)
    dev = kernel.device
    fh = torch.arange(H, device=dev)
    fw = torch.arange(W // 2 + 1 if half else W, device=dev)
    Eh = _phases(H, fh, kernel.shape[-2], dev, cd)
    Ew = _phases(W, fw, kernel.shape[-1], dev, cd)
    return torch.einsum("oipq,up,vq->uvoi", kernel.to(cd), Eh, Ew)

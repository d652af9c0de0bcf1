"""The f-divergences of f-distill: f, f'' and the weighting h(r) = r^2 f''(r) (docs/algorithms.md 2.1).

D_f(p || q) = E_q[f(p / q)] with f convex and f(1) = 0. f-distill weights the score-distillation
gradient of each student sample by h(r) at its density ratio r = p / q (paper Table 1):

    reverse-KL 1 | softened RKL 1/(r+1) | Jensen-Shannon r/(r+1) | squared Hellinger r^(1/2)/4 |
    forward-KL r | Jeffreys r+1 | Pearson chi^2 2r^2 | Neyman chi^2 2/r | alpha-divergence r^alpha

Constant factors of h cancel in f-distill's weight normalisation; we keep h = r^2 f'' exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from flowalign.objectives._common import check_floating, upcast


@dataclass(frozen=True)
class FDivergence:
    """One f-divergence D_f(p || q) = E_q[f(p / q)] of the f-distill suite.

    Attributes:
        name: canonical name.
        aliases: other accepted names (FastGen's short keys among them).
        f: the generator f(r), r > 0.
        f_second_derivative: f''(r) in closed form.
        h: the f-distill weighting h(r) = r^2 f''(r).
    """

    name: str
    aliases: tuple[str, ...]
    f: Callable[[Tensor], Tensor]
    f_second_derivative: Callable[[Tensor], Tensor]
    h: Callable[[Tensor], Tensor]


def _alpha_divergence(alpha: float) -> FDivergence:
    # f = (r^a - a r - (1 - a)) / (a (a - 1)); the a -> 0 and a -> 1 limits are reverse and forward KL
    # up to a linear term (r - 1), which does not change the divergence (E_q[r - 1] = 0).
    if alpha == 0:
        f = lambda r: r - 1 - torch.log(r)  # noqa: E731
    elif alpha == 1:
        f = lambda r: r * torch.log(r) - r + 1  # noqa: E731
    else:
        f = lambda r: (r.pow(alpha) - alpha * r - (1 - alpha)) / (alpha * (alpha - 1))  # noqa: E731
    return FDivergence(
        name="alpha",
        aliases=("alpha_divergence",),
        f=f,
        f_second_derivative=lambda r: r.pow(alpha - 2),
        h=lambda r: r.pow(alpha),
    )


_DIVERGENCES: tuple[FDivergence, ...] = (
    FDivergence(
        "reverse_kl",
        ("rkl",),
        f=lambda r: -torch.log(r),
        f_second_derivative=lambda r: r.pow(-2),
        h=torch.ones_like,
    ),
    FDivergence(
        "softened_reverse_kl",
        ("sf", "softened_rkl", "srkl"),
        f=lambda r: (r + 1) * torch.log((r + 1) / (2 * r)),
        f_second_derivative=lambda r: 1 / (r.pow(2) * (r + 1)),
        h=lambda r: 1 / (r + 1),
    ),
    FDivergence(
        "jensen_shannon",
        ("js",),
        f=lambda r: r * torch.log(r) - (r + 1) * torch.log((r + 1) / 2),
        f_second_derivative=lambda r: 1 / (r * (r + 1)),
        h=lambda r: r / (r + 1),
    ),
    FDivergence(
        "squared_hellinger",
        ("sh", "hellinger"),
        f=lambda r: 1 - torch.sqrt(r),
        f_second_derivative=lambda r: 0.25 * r.pow(-1.5),
        h=lambda r: 0.25 * torch.sqrt(r),  # FastGen uses sqrt(r); the 1/4 cancels in the normalisation
    ),
    FDivergence(
        "forward_kl",
        ("kl", "fkl"),
        f=lambda r: r * torch.log(r),
        f_second_derivative=lambda r: 1 / r,
        h=lambda r: r,
    ),
    FDivergence(
        "jeffreys",
        ("jf",),
        f=lambda r: (r - 1) * torch.log(r),
        f_second_derivative=lambda r: (r + 1) / r.pow(2),
        h=lambda r: r + 1,
    ),
    FDivergence(
        "pearson",
        ("pearson_chi2", "chi2"),
        f=lambda r: (r - 1).pow(2),
        f_second_derivative=lambda r: torch.full_like(r, 2.0),
        h=lambda r: 2 * r.pow(2),
    ),
    FDivergence(
        "neyman",
        ("neyman_chi2",),
        f=lambda r: (1 - r).pow(2) / r,
        f_second_derivative=lambda r: 2 / r.pow(3),
        h=lambda r: 2 / r,
    ),
)
_BY_NAME: dict[str, FDivergence] = {}
for _d in _DIVERGENCES:
    for _n in (_d.name, *_d.aliases):
        _BY_NAME[_n] = _d
_ALPHA_NAMES = ("alpha", "alpha_divergence")


def divergence_names() -> tuple[str, ...]:
    """Every accepted divergence name: canonical names and aliases (e.g. "js", "rkl", "kl")."""
    return (*_BY_NAME, *_ALPHA_NAMES)


def get_divergence(name: str, *, alpha: float = 0.5) -> FDivergence:
    """Look up an f-divergence by canonical name or alias.

    Args:
        name: e.g. "reverse_kl"/"rkl", "softened_reverse_kl"/"sf", "jensen_shannon"/"js",
            "squared_hellinger"/"sh", "forward_kl"/"kl", "jeffreys"/"jf", "pearson", "neyman", "alpha".
        alpha: the alpha of the alpha-divergence (h = r^alpha); ignored for the others.

    Returns:
        The :class:`FDivergence`.

    Raises:
        ValueError: unknown name (the message lists the known ones) or a non-finite alpha.
    """
    key = name.lower() if isinstance(name, str) else name
    if key in _ALPHA_NAMES:
        if not math.isfinite(alpha):
            raise ValueError(f"get_divergence: alpha must be finite, got {alpha}")
        return _alpha_divergence(float(alpha))
    if key not in _BY_NAME:
        raise ValueError(
            f"get_divergence: unknown divergence {name!r}; known: {', '.join(divergence_names())}"
        )
    return _BY_NAME[key]


def f_weight(r: Tensor, *, divergence: str = "js", alpha: float = 0.5) -> Tensor:
    """The f-distill weighting h(r) = r^2 f''(r) (paper Table 1), elementwise.

    Args:
        r: density ratios p / q > 0, any shape.
        divergence: a name accepted by :func:`get_divergence`.
        alpha: alpha of the alpha-divergence.

    Returns:
        h(r), shape of ``r`` (fp32 or fp64).
    """
    check_floating("f_weight", "r", r)
    return get_divergence(divergence, alpha=alpha).h(upcast(r))


def f_second_derivative(r: Tensor, *, divergence: str = "js", alpha: float = 0.5) -> Tensor:
    """f''(r) of the chosen divergence in closed form, elementwise (h(r) = r^2 f''(r)).

    Args:
        r: density ratios > 0, any shape.
        divergence: a name accepted by :func:`get_divergence`.
        alpha: alpha of the alpha-divergence.

    Returns:
        f''(r), shape of ``r``.
    """
    check_floating("f_second_derivative", "r", r)
    return get_divergence(divergence, alpha=alpha).f_second_derivative(upcast(r))

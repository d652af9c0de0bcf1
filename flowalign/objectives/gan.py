"""GAN terms of f-distill's discriminator (density-ratio estimator) and generator (docs/algorithms.md 2.2, 2.4).

The discriminator reads noised samples (through frozen teacher features) and outputs one logit per
head, l = log D / (1 - D); at the optimum D = p / (p + q), so r = p / q = e^l. Multi-head logits
[B, H] are averaged over heads per sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from flowalign.objectives._common import check_floating, check_same_shape, upcast


def _checked_logits(fn: str, name: str, logits: Tensor, batch: int | None = None) -> Tensor:
    check_floating(fn, name, logits)
    if logits.ndim not in (1, 2) or (batch is not None and logits.shape[0] != batch):
        expected = "[B] or [B, H]" if batch is None else f"[{batch}] or [{batch}, H]"
        raise ValueError(f"{fn}: {name} must have shape {expected}, got {list(logits.shape)}")
    return upcast(logits)


def gan_generator_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating GAN generator loss per sample: softplus(-l(x_fake)), averaged over heads.

    Args:
        fake_logits: discriminator logits of the noised student samples [B] or [B, H]; they must carry
            the gradient to the sample (frozen teacher feature extractor, not under no_grad).

    Returns:
        Loss [B].
    """
    lg = _checked_logits("gan_generator_loss", "fake_logits", fake_logits)
    loss = F.softplus(-lg)
    return loss.mean(dim=1) if loss.ndim == 2 else loss


def gan_discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Discriminator loss per sample pair (docs/algorithms.md 2.2), averaged over heads:

        L_D,i = softplus(-l(x_real_i)) + softplus(l(x_fake_i))

    Args:
        real_logits: logits on noised real data [B] or [B, H].
        fake_logits: logits on noised (detached) student samples, same shape.

    Returns:
        loss: [B].
        metrics: detached scalars "d_loss", "d_real_acc" (frac l_real > 0), "d_fake_acc" (frac l_fake < 0),
            "logit_real", "logit_fake" (means).
    """
    fn = "gan_discriminator_loss"
    check_same_shape(fn, [("real_logits", real_logits), ("fake_logits", fake_logits)])
    real = _checked_logits(fn, "real_logits", real_logits)
    fake = _checked_logits(fn, "fake_logits", fake_logits)
    loss = F.softplus(-real) + F.softplus(fake)
    if loss.ndim == 2:
        loss = loss.mean(dim=1)
    metrics = {
        "d_loss": loss.detach().mean(),
        "d_real_acc": (real.detach() > 0).to(real.dtype).mean(),
        "d_fake_acc": (fake.detach() < 0).to(fake.dtype).mean(),
        "logit_real": real.detach().mean(),
        "logit_fake": fake.detach().mean(),
    }
    return loss, metrics


def r1_penalty(real_logits: Tensor, real_inputs: Tensor) -> Tensor:
    """Exact R1 term ||grad_x l(x_real)||^2 per sample (sum over elements; heads averaged first).

    The loss term is (gamma / 2) * this. ``real_inputs`` must require grad and ``real_logits`` must be
    computed from it; the graph is kept (create_graph) so the penalty trains the discriminator.

    Args:
        real_logits: logits [B] or [B, H] computed from ``real_inputs``.
        real_inputs: the discriminator input [B, ...] with requires_grad.

    Returns:
        Penalty [B].
    """
    fn = "r1_penalty"
    lg = _checked_logits(fn, "real_logits", real_logits, real_inputs.shape[0])
    if not real_inputs.requires_grad:
        raise ValueError(
            f"{fn}: real_inputs must require grad (call .requires_grad_() before the discriminator)"
        )
    if lg.ndim == 2:
        lg = lg.mean(dim=1)
    (grad,) = torch.autograd.grad(lg.sum(), real_inputs, create_graph=True)
    return upcast(grad).pow(2).reshape(grad.shape[0], -1).sum(dim=1)


def approx_r1_penalty(real_logits: Tensor, perturbed_logits: Tensor) -> Tensor:
    """Finite-difference R1 (FastGen / APT style): (l(x_real) - l(x_real + 0.1 N(0, I)))^2, averaged over heads.

    The caller perturbs the real inputs (FastGen: std 0.1) and runs the discriminator twice; the
    loss term is gamma * this.

    Args:
        real_logits: logits on the real inputs [B] or [B, H].
        perturbed_logits: logits on the perturbed real inputs, same shape.

    Returns:
        Penalty [B].
    """
    fn = "approx_r1_penalty"
    check_same_shape(fn, [("real_logits", real_logits), ("perturbed_logits", perturbed_logits)])
    sq = (_checked_logits(fn, "real_logits", real_logits) - upcast(perturbed_logits)).pow(2)
    return sq.mean(dim=1) if sq.ndim == 2 else sq

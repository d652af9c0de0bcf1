"""Teachers a one-step distillation run refuses: a two-expert Wan 2.2 A14B model (docs/families.md (g))."""

from __future__ import annotations

from flowalign.models.base import FlowModel


def refuse_two_experts(teacher: FlowModel) -> None:
    """Refuse a two-expert teacher (Wan 2.2 A14B): a one-step student of it is not meaningful.

    The generator is one network called once, at t = 1, where the pipeline always runs the high-noise
    expert: the student would be that expert alone, and the low-noise expert (half the model, the one
    that makes the detail) would be neither distilled into it nor used when it samples.
    """
    if getattr(teacher, "two_experts", False):
        raise ValueError(
            f"one-step distillation of a two-expert {teacher.family} teacher (Wan 2.2 A14B) is not supported: "
            "the one-step generator runs only at t = 1, where only the high-noise expert acts, so the "
            "low-noise expert would be neither distilled nor used; distil a one-network model "
            "(Wan 2.2 TI2V-5B, Wan 2.1) instead"
        )

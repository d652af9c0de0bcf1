"""The base of the video families whose joint transformer blocks return the media tokens first."""

from __future__ import annotations

from flowalign.models.base import FlowModel


class MediaFirstVideoModel(FlowModel):
    """A video family (HunyuanVideo 1.5, LTX-2) whose blocks return ``(video tokens, text or audio tokens)``.

    ``block_media_index`` tells per-block readers (the one-step heads) which output holds the
    video tokens; the released checkpoints of these families default to 121 frames.
    """

    is_video = True
    default_num_frames = 121
    block_media_index = 0

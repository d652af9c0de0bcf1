"""Exact oracle rewards for the toy world, computed from pixels only (never from the scene or seed).

Per frame (``_detect``), batched over frames with tensor ops:

1. distance from the fixed background d = |p - bg|; foreground = d > 0.12; keep the connected
   component (8-neighbour, found by iterated 3x3 max-pooling of labels) with the largest mass sum(d).
   The object is that component's solid part (alpha >= 1/2, step 3) plus a 2-pixel fringe (a triangle's
   anti-aliased apex reaches 2 pixels past its solid part).
2. object colour c = median of the component's most saturated pixels (d >= 0.85 * 90th percentile of d),
   so anti-aliased edge pixels, which are mixtures with the background, do not bias it.
3. coverage alpha = clamp(<p - bg, c - bg> / |c - bg|^2, 0, 1) and residual r = |p - bg - alpha (c - bg)|:
   a clean render is exactly bg + alpha (c - bg), so r = 0 on it.
4. shape: for each of the 5 shapes, place a template (the renderer's own ``shape_alpha``) with the same
   area and centroid as the object's alpha, and keep the shape with the smallest L1 error
   sum |alpha - template| / area. The winning template gives the extent (size) and the bounding-box
   centre (position; the triangle's centroid sits extent/6 below its box centre). An object is present
   if its alpha mass is >= 4 px (at 32x32) and its best template error is <= 0.5 (renders <= 0.05,
   Gaussian blurs of sigma 2 ~0.3, noise fields >= 0.55): pure noise shows no object and scores 0.
   Size is the extent against the midpoint of small and large, position the nearest anchor, colour the
   nearest palette entry to c; the colour counts as stated only within half the closest palette pair's
   distance of that entry (33.5/255), so an off-palette object matches no colour.
5. plausibility (the world draws one object of a toy size wholly inside the frame); the object is
   present only if also: extent within [6.5, 16.5] px at 32x32 (each size +- half the gap between them;
   a frame filled by one colour reads as a frame-sized square), no interior pixel (alpha >= 0.9) on
   the frame's outermost pixels (renders keep every edge >= 0.25 px inside, border alpha <= 0.75), and
   stray < 1/2 (the object holds most of the foreground: copies of the shape are no object).
6. visual quality vq = present * clean * crisp * single * shaped, each in [0, 1]:
   clean = mean over pixels of exp(-(r / 0.05)^2)               (noise, off-palette tint, stray colours)
   crisp = clamp((2.1 - w) / (2.1 - 1.3), 0, 1), w = #{0.1 < alpha < 0.9} / TV(alpha)
           (mean edge width in pixels; renders have w <= 1.18, Gaussian blurs of sigma 0.6 / 1.0 have
           w ~ 1.5 / 2.2)
   single = clamp(1 - 5 * stray, 0, 1), stray = fraction of the foreground's mass (foreground pixels
           weighted by min(1, d / |c - bg|)) outside the object: ghosts, speckles, second objects.
   shaped = clamp((0.4 - e) / (0.4 - 0.25), 0, 1), e the best template error (renders <= 0.05; crisp
           lumps such as touching copies of a shape >= 0.43).

Videos: frames are detected independently, then a frame is "good" if the object is present with area
within 25% and colour within 0.1 of the clip's medians. mq = persist * smooth with
persist = (fraction of good frames)^4 and smooth = exp(-(rms / 0.75 px)^2), rms the deviation of the good
frames' centres from a least-squares constant-velocity line (pixels at 32x32). The fitted line's mid-clip
point is the position and its displacement over the clip the motion (still below 2 px at 32x32).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from flowalign.toy.oracle_inputs import MAX_SIZE, MIN_SIZE, check_media, parse_prompts
from flowalign.toy.render import background_rgb, palette_rgb, shape_alpha
from flowalign.toy.world import (
    ANCHORS,
    COLOURS,
    EXTENT,
    MOTIONS,
    PALETTE,
    POSITIONS,
    SHAPES,
    SIZE_THRESHOLD,
    SIZES,
)

IMAGE_ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "size", "position")
VIDEO_ATTRIBUTES: tuple[str, ...] = IMAGE_ATTRIBUTES + ("motion",)
__all__ = ["MAX_SIZE", "MIN_SIZE", "detect_attributes", "score_images", "score_videos"]

_CHUNK_PIXELS = 2**22
_FG_THRESHOLD = 0.12  # |p - bg| above which a pixel is foreground
_MIN_AREA_PX = 4.0  # alpha mass (pixels at 32x32) below which no object is present
# Template error above which the blob is not a shape at all (renders <= 0.05, Gaussian blurs of sigma 2
# ~0.29, noise fields 0.55-1.4).
_OBJECT_MAX_ERROR = 0.5
_CLEAN_TAU = 0.05
_SHAPED_OK, _SHAPED_BAD = 0.25, 0.4  # template error: renders <= 0.05, lumps of copies >= 0.43
_MID_LO, _MID_HI = 0.1, 0.9
_EDGE_W_OK, _EDGE_W_BAD = 1.3, 2.1
_STRAY_SCALE = 5.0
_MAX_STRAY = 0.5  # the object must hold most of the foreground: two equal copies are no object
_AREA_TOL, _COLOUR_TOL = 0.25, 0.1
_PERSIST_POWER = 4.0
_SMOOTH_TAU = 0.75 / 32  # fraction of the width (0.75 px at 32x32)
_STILL_THRESHOLD = 2.0 / 32  # displacement over the clip below which the object is "still"
# Area of each shape relative to its bounding box (first guess of the extent; refined once).
_AREA_COEF = {"circle": math.pi / 4, "square": 1.0, "diamond": 0.5, "triangle": 0.5, "cross": 5 / 9}
_REFINE = 1  # extent refinements: Newton step on area(template) = area(object)
_CENTROID_OFFSET = {"triangle": 1 / 6}  # centroid below the box centre, in units of extent
# The world's two extents, each widened by half the gap between them: [6.5, 16.5] px at 32x32.
_HALF_GAP = (EXTENT["large"] - EXTENT["small"]) / 2
_MIN_EXTENT, _MAX_EXTENT = EXTENT["small"] - _HALF_GAP, EXTENT["large"] + _HALF_GAP
# A colour further than half the closest palette pair's distance from every entry is no palette colour.
_PALETTE_TOL = torch.pdist(torch.tensor(list(PALETTE.values()), dtype=torch.float64)).min().item() / 510


@dataclass
class _Frames:
    """Per-frame detections, all [N] (rgb [N, 3]); geometry in fractions of the width."""

    present: Tensor
    shape_id: Tensor
    colour_id: Tensor
    on_palette: Tensor
    rgb: Tensor
    extent: Tensor
    cx: Tensor
    cy: Tensor
    area: Tensor
    shape_error: Tensor
    edge_width: Tensor
    clean: Tensor
    crisp: Tensor
    single: Tensor

    @property
    def vq(self) -> Tensor:
        shaped = ((_SHAPED_BAD - self.shape_error) / (_SHAPED_BAD - _SHAPED_OK)).clamp(0.0, 1.0)
        return self.present.float() * self.clean * self.crisp * self.single * shaped


def _max3x3(x: Tensor) -> Tensor:
    """3x3 max filter of [N, S, S] >= 0 with zero padding (separable; ~15x faster than max_pool2d on CPU)."""
    p = F.pad(x, (1, 1, 1, 1))
    rows = torch.maximum(torch.maximum(p[:, :, :-2], p[:, :, 1:-1]), p[:, :, 2:])  # [N, S+2, S]
    return torch.maximum(torch.maximum(rows[:, :-2], rows[:, 1:-1]), rows[:, 2:])


def _norm3(v: Tensor) -> Tensor:
    """Euclidean norm over dim 1 of size 3 (written out: linalg.vector_norm over dim 1 is slow on CPU)."""
    return torch.sqrt(v[:, 0] * v[:, 0] + v[:, 1] * v[:, 1] + v[:, 2] * v[:, 2])


def _largest_component(mask: Tensor, weight: Tensor) -> Tensor:
    """Boolean [N, S, S]: the 8-connected component of ``mask`` with the largest sum of ``weight``.

    Each foreground pixel starts with its own label and labels spread as the max over 3x3 neighbourhoods
    until nothing changes; frames that have converged drop out of the loop. Labels are int16 where they
    fit (4x less memory traffic than float32, which is what this loop is bound by on CPU).
    """
    n, s, _ = mask.shape
    dtype = torch.int16 if s * s < 2**15 else torch.int32
    keep = mask.to(dtype)
    ids = torch.arange(1, s * s + 1, device=mask.device).to(dtype).reshape(1, s, s)
    labels = ids * keep
    buf = torch.zeros(n, s + 2, s + 2, dtype=dtype, device=mask.device)  # zero border = padding
    active = torch.arange(n, device=mask.device)
    while active.numel():
        cur, k = labels[active], keep[active]
        pad = buf[: active.numel()]
        new = cur
        for _ in range(4):
            pad[:, 1:-1, 1:-1] = new
            rows = torch.maximum(pad[:, :, :-2], pad[:, :, 1:-1])
            rows = torch.maximum(rows, pad[:, :, 2:], out=rows)  # [n, S+2, S]
            new = torch.maximum(rows[:, :-2], rows[:, 1:-1])
            new = torch.maximum(new, rows[:, 2:], out=new).mul_(k)  # [n, S, S]
        changed = (new != cur).flatten(1).any(dim=1)
        labels[active] = new
        active = active[changed]
    flat = labels.reshape(n, s * s).long()  # [N, S*S], 0 = background
    mass = torch.zeros(n, s * s + 1, device=mask.device).scatter_add_(1, flat, weight.reshape(n, s * s))
    mass[:, 0] = -1.0
    best = mass.argmax(dim=1)  # [N]
    return (flat == best[:, None]).reshape(n, s, s) & mask


def _detect(frames: Tensor) -> _Frames:
    """Detect the object and its quality terms in each of N frames [N, 3, S, S] (see module docstring).

    Works through the frames in chunks of at most 2^22 pixels (bounds memory, and torch.nanquantile
    refuses inputs over 2^24 elements).
    """
    n, _, s, _ = frames.shape
    step = max(1, _CHUNK_PIXELS // (s * s))
    if n <= step:
        return _detect_chunk(frames)
    parts = [_detect_chunk(frames[i : i + step]) for i in range(0, n, step)]
    return _Frames(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(_Frames)})


def _detect_chunk(frames: Tensor) -> _Frames:
    x = frames.float()
    n, _, s, _ = x.shape
    dev = x.device
    bg = background_rgb(device=dev)
    diff = x - bg[None, :, None, None]  # [N, 3, S, S]
    dist = _norm3(diff)  # [N, S, S]
    comp = _largest_component(dist > _FG_THRESHOLD, dist)

    nan = torch.full_like(dist, float("nan"))
    d_comp = torch.where(comp, dist, nan).reshape(n, -1)
    q90 = torch.nanquantile(d_comp, 0.9, dim=1)  # [N], nan when comp is empty
    core = comp & (dist >= 0.85 * q90[:, None, None])
    pix = x.permute(0, 2, 3, 1).reshape(n, s * s, 3)  # [N, S*S, 3]
    pix = torch.where(core.reshape(n, s * s, 1), pix, float("nan"))
    rgb = torch.nanmedian(pix, dim=1).values  # [N, 3]
    has_comp = comp.flatten(1).any(dim=1)
    rgb = torch.where(has_comp[:, None], rgb, bg[None].expand(n, 3))

    axis = rgb - bg[None]  # [N, 3]
    axis_sq = (axis * axis).sum(dim=1).clamp_min(1e-6)
    alpha = ((diff * axis[:, :, None, None]).sum(dim=1) / axis_sq[:, None, None]).clamp(0.0, 1.0)
    resid = _norm3(diff - alpha[:, None] * axis[:, :, None, None])  # [N, S, S]

    # The object is the component's solid part (alpha >= 1/2) plus a 2-pixel fringe for its anti-aliased
    # edge, so a faint ghost or halo touching it neither distorts its shape nor its area.
    region = _max3x3(_max3x3((comp & (alpha >= 0.5)).float()))
    a_obj = alpha * region
    area_px = a_obj.flatten(1).sum(dim=1)  # [N] pixels
    big_enough = has_comp & (area_px >= _MIN_AREA_PX * (s / 32) ** 2)
    safe_area = area_px.clamp_min(1e-6)
    coords = torch.arange(s, device=dev, dtype=torch.float32) + 0.5
    cen_x = (a_obj.sum(dim=1) * coords).sum(dim=1) / safe_area / s  # [N] fraction
    cen_y = (a_obj.sum(dim=2) * coords).sum(dim=1) / safe_area / s

    errors, extents, centres_y = [], [], []
    for k, shape in enumerate(SHAPES):
        ids = torch.full((n,), k, device=dev, dtype=torch.long)
        off = _CENTROID_OFFSET.get(shape, 0.0)
        ext = torch.sqrt(safe_area / _AREA_COEF[shape]) / s
        for _ in range(_REFINE):
            tmpl = shape_alpha(ids, cen_x, cen_y - off * ext, ext, size=s)
            ext = ext * torch.sqrt(safe_area / tmpl.flatten(1).sum(dim=1).clamp_min(1e-6))
        tmpl = shape_alpha(ids, cen_x, cen_y - off * ext, ext, size=s)
        errors.append((a_obj - tmpl).abs().flatten(1).sum(dim=1) / safe_area)
        extents.append(ext)
        centres_y.append(cen_y - off * ext)
    err = torch.stack(errors, dim=1)  # [N, 5]
    shape_id = err.argmin(dim=1)
    pick = shape_id[:, None]
    extent = torch.stack(extents, dim=1).gather(1, pick)[:, 0]
    cy = torch.stack(centres_y, dim=1).gather(1, pick)[:, 0]
    colour_dist, colour_id = torch.cdist(rgb, palette_rgb(device=dev)).min(dim=1)
    shape_error = err.gather(1, pick)[:, 0]

    clean = torch.exp(-((resid / _CLEAN_TAU) ** 2)).flatten(1).mean(dim=1)
    mid = ((alpha > _MID_LO) & (alpha < _MID_HI)).float().flatten(1).sum(dim=1)
    tv = (alpha[:, 1:] - alpha[:, :-1]).abs().flatten(1).sum(dim=1)
    tv = tv + (alpha[:, :, 1:] - alpha[:, :, :-1]).abs().flatten(1).sum(dim=1)
    width = mid / tv.clamp_min(1.0)
    crisp = ((_EDGE_W_BAD - width) / (_EDGE_W_BAD - _EDGE_W_OK)).clamp(0.0, 1.0)
    fg = (dist / axis_sq.sqrt()[:, None, None]).clamp(0.0, 1.0) * (dist > _FG_THRESHOLD)
    stray = (fg * (1.0 - region)).flatten(1).sum(dim=1) / fg.flatten(1).sum(dim=1).clamp_min(1e-6)
    single = (1.0 - _STRAY_SCALE * stray).clamp(0.0, 1.0)
    # Plausibility (step 5): one object of a toy size, wholly inside the frame.
    # The world keeps every edge >= 0.25 px inside the frame (border alpha <= 0.75); an interior pixel
    # (alpha >= _MID_HI) on the border means the object reaches the edge or is cut by it.
    solid = a_obj >= _MID_HI
    on_border = solid[:, 0].any(1) | solid[:, -1].any(1) | solid[:, :, 0].any(1) | solid[:, :, -1].any(1)
    toy_size = (extent >= _MIN_EXTENT) & (extent <= _MAX_EXTENT)
    plausible = toy_size & ~on_border & (stray < _MAX_STRAY)
    present = big_enough & (shape_error <= _OBJECT_MAX_ERROR) & plausible

    return _Frames(
        present=present,
        shape_id=shape_id,
        colour_id=colour_id,
        on_palette=colour_dist <= _PALETTE_TOL,
        rgb=rgb,
        extent=extent,
        cx=cen_x,
        cy=cy,
        area=area_px / s**2,
        shape_error=shape_error,
        edge_width=width,
        clean=clean,
        crisp=crisp,
        single=single,
    )


def _size_id(extent: Tensor) -> Tensor:
    return (extent >= SIZE_THRESHOLD).long()  # SIZES = ("small", "large")


def _position_id(cx: Tensor, cy: Tensor) -> Tensor:
    anchors = torch.tensor([ANCHORS[p] for p in POSITIONS], device=cx.device)  # [5, 2]
    return torch.cdist(torch.stack([cx, cy], dim=1), anchors).argmin(dim=1)


@dataclass
class _Clips:
    """Per-clip detections, all [B]; ids index the vocab tuples; geometry in fractions of the width."""

    present: Tensor
    shape_id: Tensor
    colour_id: Tensor
    on_palette: Tensor
    size_id: Tensor
    position_id: Tensor
    motion_id: Tensor
    rgb: Tensor
    extent: Tensor
    cx: Tensor
    cy: Tensor
    dx: Tensor
    dy: Tensor
    vq: Tensor
    persist: Tensor
    smooth: Tensor

    @property
    def mq(self) -> Tensor:
        return self.persist * self.smooth


def _detect_clips(videos: Tensor) -> _Clips:
    b, t, _, s, _ = videos.shape
    det = _detect(videos.reshape(b * t, 3, s, s))

    def per_clip(v: Tensor) -> Tensor:
        return v.reshape(b, t, *v.shape[1:])

    present, area, rgb = per_clip(det.present), per_clip(det.area), per_clip(det.rgb)
    nan = torch.tensor(float("nan"), device=videos.device)
    ref_area = torch.where(present, area, nan).nanmedian(dim=1).values  # [B]
    ref_rgb = torch.where(present[..., None], rgb, nan).nanmedian(dim=1).values  # [B, 3]
    good = (
        present
        & ((area / ref_area[:, None] - 1.0).abs() <= _AREA_TOL)
        & ((rgb - ref_rgb[:, None]).norm(dim=2) <= _COLOUR_TOL)
    )  # [B, T]; nan comparisons are False
    g = good.float()
    count = g.sum(dim=1)
    any_good = count > 0
    persist = (count / t) ** _PERSIST_POWER

    # Constant-velocity least-squares fit of the good frames' centres: p(f) = p_mean + vel * (f - f_mean).
    frame = torch.arange(t, device=videos.device, dtype=torch.float32)[None]  # [1, T]
    safe = count.clamp_min(1.0)
    f_mean = (g * frame).sum(dim=1) / safe
    f_dev = (frame - f_mean[:, None]) * g
    f_var = (f_dev * f_dev).sum(dim=1)
    fits = []
    for coord in (per_clip(det.cx), per_clip(det.cy)):
        p_mean = (g * coord).sum(dim=1) / safe
        vel = (f_dev * (coord - p_mean[:, None])).sum(dim=1) / f_var.clamp_min(1e-6)
        vel = torch.where(f_var > 0, vel, torch.zeros_like(vel))
        resid = (coord - p_mean[:, None] - vel[:, None] * (frame - f_mean[:, None])) * g
        mid = p_mean + vel * ((t - 1) / 2 - f_mean)  # fitted centre at mid-clip
        fits.append((mid, vel * (t - 1), (resid * resid).sum(dim=1)))
    (cx, dx, sq_x), (cy, dy, sq_y) = fits
    rms = torch.sqrt((sq_x + sq_y) / safe)
    smooth = torch.where(any_good, torch.exp(-((rms / _SMOOTH_TAU) ** 2)), torch.zeros_like(rms))

    shape_votes = (F.one_hot(per_clip(det.shape_id), len(SHAPES)).float() * g[..., None]).sum(dim=1)
    clip_rgb = torch.where(any_good[:, None], ref_rgb.nan_to_num(0.0), background_rgb(device=videos.device))
    extent = torch.where(good, per_clip(det.extent), nan).nanmedian(dim=1).values.nan_to_num(0.0)

    colour_dist, colour_id = torch.cdist(clip_rgb, palette_rgb(device=videos.device)).min(dim=1)
    still = torch.maximum(dx.abs(), dy.abs()) < _STILL_THRESHOLD
    horizontal = dx.abs() >= dy.abs()
    m = MOTIONS.index
    direction = torch.where(
        horizontal,
        torch.where(dx > 0, m("right"), m("left")),
        torch.where(dy > 0, m("down"), m("up")),  # image y points down
    )
    motion_id = torch.where(still, MOTIONS.index("still"), direction)
    return _Clips(
        present=any_good,
        shape_id=shape_votes.argmax(dim=1),
        colour_id=colour_id,
        on_palette=colour_dist <= _PALETTE_TOL,
        size_id=_size_id(extent),
        position_id=_position_id(cx, cy),
        motion_id=motion_id,
        rgb=clip_rgb,
        extent=extent,
        cx=cx,
        cy=cy,
        dx=dx,
        dy=dy,
        vq=per_clip(det.vq).mean(dim=1),
        persist=persist,
        smooth=smooth,
    )


def _match(detected: Tensor, present: Tensor, targets: list[int]) -> Tensor:
    want = torch.tensor(targets, device=detected.device)
    return ((detected == want) & present).float()


def score_images(images: Tensor, prompts: Sequence[str]) -> dict[str, Tensor]:
    """Oracle rewards of images against their toy captions, from pixels only.

    ta = (ta_shape + ta_colour + ta_size + ta_position) / 4, each 0/1 (attribute detected == stated);
    all_correct = product of the four; vq = present * clean * crisp * single * shaped (module
    docstring).

    Args:
        images: float [B, 3, H, W] in [0, 1], H == W >= 24.
        prompts: B canonical image captions (``parse_caption``).

    Returns:
        float32 [B] tensors in [0, 1] on the images' device, keys "ta", "vq", "ta_shape", "ta_colour",
        "ta_size", "ta_position", "all_correct".
    """
    check_media(images, ndim=4, name="images")
    attrs = parse_prompts(prompts, images.shape[0], is_video=False)
    det = _detect(images)
    hits = {
        "ta_shape": _match(det.shape_id, det.present, [SHAPES.index(a.shape) for a in attrs]),
        "ta_colour": _match(
            det.colour_id, det.present & det.on_palette, [COLOURS.index(a.colour) for a in attrs]
        ),
        "ta_size": _match(_size_id(det.extent), det.present, [SIZES.index(a.size) for a in attrs]),
        "ta_position": _match(
            _position_id(det.cx, det.cy), det.present, [POSITIONS.index(a.position) for a in attrs]
        ),
    }
    stacked = torch.stack(list(hits.values()), dim=1)  # [B, 4]
    return {"ta": stacked.mean(dim=1), "vq": det.vq, **hits, "all_correct": stacked.prod(dim=1)}


def score_videos(videos: Tensor, prompts: Sequence[str]) -> dict[str, Tensor]:
    """Oracle rewards of clips against their toy video captions, from pixels only.

    ta = mean of ta_shape, ta_colour, ta_size, ta_position, ta_motion (each 0/1); all_correct = their
    product; vq = mean over frames of the image vq; mq = persist * smooth (module docstring).

    Args:
        videos: float [B, T, 3, H, W] in [0, 1], H == W >= 24.
        prompts: B canonical video captions (with "moving <dir>" or "staying still").

    Returns:
        float32 [B] tensors in [0, 1] on the videos' device, keys "ta", "vq", "mq", "ta_shape",
        "ta_colour", "ta_size", "ta_position", "ta_motion", "all_correct".
    """
    check_media(videos, ndim=5, name="videos")
    attrs = parse_prompts(prompts, videos.shape[0], is_video=True)
    clip = _detect_clips(videos)
    hits = {
        "ta_shape": _match(clip.shape_id, clip.present, [SHAPES.index(a.shape) for a in attrs]),
        "ta_colour": _match(
            clip.colour_id, clip.present & clip.on_palette, [COLOURS.index(a.colour) for a in attrs]
        ),
        "ta_size": _match(clip.size_id, clip.present, [SIZES.index(a.size) for a in attrs]),
        "ta_position": _match(clip.position_id, clip.present, [POSITIONS.index(a.position) for a in attrs]),
        "ta_motion": _match(clip.motion_id, clip.present, [MOTIONS.index(str(a.motion)) for a in attrs]),
    }
    stacked = torch.stack(list(hits.values()), dim=1)  # [B, 5]
    return {
        "ta": stacked.mean(dim=1),
        "vq": clip.vq,
        "mq": clip.mq,
        **hits,
        "all_correct": stacked.prod(dim=1),
    }


def detect_attributes(media: Tensor) -> list[dict[str, object]]:
    """What the oracle sees in each image or clip, for diversity and attribute-histogram metrics.

    Args:
        media: float [B, 3, H, W] images or [B, T, 3, H, W] clips in [0, 1].

    Returns:
        One dict per sample: "present" (bool); "shape", "colour", "size", "position" (and "motion" for
        clips) as vocabulary words, or None when no object is present; "rgb" (estimated object colour),
        "extent", "cx", "cy" (fractions of the width; mid-clip for clips); for images "shape_error"
        (template L1 error / area), "edge_width" (pixels) and the quality terms "vq", "clean", "crisp",
        "single"; "vq", "mq", "persist", "smooth", "dx", "dy" for clips.
    """
    if isinstance(media, Tensor) and media.ndim == 5:
        check_media(media, ndim=5, name="videos")
        c = _detect_clips(media)
        extra = ("dx", "dy", "vq", "mq", "persist", "smooth")
        return [_attribute_row(c, i, c.size_id, c.position_id, extra) for i in range(media.shape[0])]
    check_media(media, ndim=4, name="images")
    d = _detect(media)
    size_id, position_id = _size_id(d.extent), _position_id(d.cx, d.cy)
    extra = ("shape_error", "edge_width", "vq", "clean", "crisp", "single")
    return [_attribute_row(d, i, size_id, position_id, extra) for i in range(media.shape[0])]


def _attribute_row(d, i: int, size_id: Tensor, position_id: Tensor, extra: tuple[str, ...]) -> dict:
    """One sample's row of :func:`detect_attributes` from a detection (images) or a clip tracking."""
    ok = bool(d.present[i])
    row: dict[str, object] = {
        "present": ok,
        "shape": SHAPES[int(d.shape_id[i])] if ok else None,
        "colour": COLOURS[int(d.colour_id[i])] if ok else None,
        "size": SIZES[int(size_id[i])] if ok else None,
        "position": POSITIONS[int(position_id[i])] if ok else None,
    }
    if hasattr(d, "motion_id"):
        row["motion"] = MOTIONS[int(d.motion_id[i])] if ok else None
    row["rgb"] = tuple(float(v) for v in d.rgb[i])
    row.update({key: float(getattr(d, key)[i]) for key in ("extent", "cx", "cy", *extra)})
    return row

"""Rewards scored by a server over HTTP: ``remote:url=http://host:8000``.

Heavy or conflicting reward stacks (a VLM judge, an object detector with its own pinned packages) run in
their own environment behind ``flowalign serve-reward NAME`` (:mod:`flowalign.rewards.serving`), and a
training or scoring run uses them like any other reward. The protocol (version 1):

``GET /info``
    ``{"protocol": 1, "reward": NAME, "dimensions": [...], "media_kind": "image"|"video"|"both",
    "needs_prompts": bool, "scored_items": N}``.
``POST /score``
    ``multipart/form-data``: a field ``request`` holding JSON ``{"protocol": 1, "request_id": ID,
    "prompts": [...] | null, "count": B}`` and files ``media0`` ... ``media<B-1>``: 8-bit PNG images
    (``image/png``) or H.264 MP4 videos (``video/mp4``). Answer 200 ``{"request_id": ID, "scores":
    {dimension: [B floats]}, "cached": bool}``; 400 ``{"error", "item"}`` for input the reward refuses
    (``item``: the index of the item at fault, or null); 500 ``{"error"}`` when the reward failed; 503
    while the server is not ready.

Batching: one request per chunk of ``batch_size`` images (or videos) of one size.

Nothing is scored twice: the request id is the SHA-256 of the prompts and the encoded media, so a
resent request carries the id of the first. The server keeps every answer by id (in memory, and in a
``--cache`` file that outlives a restart) and answers a resent request from there. A run that stops
half-way (``flowalign score``) resumes from its score file, where a batch's rows are written only
after its answer came.

Failures: connection errors, timeouts and answers 502/503/504 are retried ``retries`` times with
exponential backoff (``backoff * 2**k`` seconds, at most ``max_backoff``); then, and at once for any
other error, a :class:`RemoteRewardError` names the server and the items (their prompts). Input refused
by the server's reward is a :class:`~flowalign.rewards.base.RewardInputError` naming the item.

Media travel as files would: images quantised to 8 bits (``round(255 x)``, so media read from
image files arrive unchanged and score exactly as in-process), videos as MP4 (lossy: H.264 at
CRF 18, yuv420p).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flowalign.rewards.base import RewardInputError, RewardModel

__all__ = ["PROTOCOL", "RemoteReward", "RemoteRewardError", "decode_media", "encode_media", "load_remote"]

PROTOCOL = 1
RETRY_STATUS = (502, 503, 504)


class RemoteRewardError(RuntimeError):
    """A reward server could not be reached, timed out, or failed to score a batch."""


def encode_media(item: Tensor) -> tuple[bytes, str]:
    """One image [3, H, W] as PNG bytes or one video [T, 3, H, W] as MP4 bytes; returns (bytes, type)."""
    from flowalign.data.media import save_image, save_video

    if item.ndim == 3:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "item.png"
            save_image(item.detach().float().cpu(), path)
            return path.read_bytes(), "image/png"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "item.mp4"
        save_video(item.detach().float().cpu(), path)
        return path.read_bytes(), "video/mp4"


def decode_media(data: bytes, content_type: str, *, source: str) -> Tensor:
    """Inverse of :func:`encode_media`: float32 [3, H, W] or [T, 3, H, W] in [0, 1] (k/255 for byte k)."""
    from flowalign.data.media import decode_image_bytes, load_video

    if content_type == "image/png":
        return decode_image_bytes(data, source=source)
    if content_type == "video/mp4":
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "item.mp4"
            path.write_bytes(data)
            return load_video(path)
    raise ValueError(f"{source}: media type {content_type!r} is not image/png or video/mp4")


def request_id(prompts: list[str] | None, parts: list[tuple[bytes, str]]) -> str:
    """SHA-256 over the prompts and the encoded media: equal batches get equal ids."""
    digest = hashlib.sha256(json.dumps(prompts).encode())
    for data, kind in parts:
        digest.update(kind.encode() + len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def _multipart(fields: dict[str, str], files: list[tuple[str, bytes, str]]) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body and its content type."""
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n'.encode())
        out.write(b"Content-Type: application/json\r\n\r\n" + value.encode() + b"\r\n")
    for name, data, kind in files:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}"\r\n'
        out.write(head.encode() + f"Content-Type: {kind}\r\n\r\n".encode() + data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


class RemoteReward(RewardModel):
    """A reward served by ``flowalign serve-reward`` (see the module doc for the protocol).

    Args:
        url: the server, e.g. ``http://127.0.0.1:8000``.
        timeout: seconds to wait for one answer.
        retries: further tries after a connection error, a timeout or a 502/503/504 answer.
        backoff: seconds before the first retry; doubled for each further one, at most ``max_backoff``.
        batch_size: images (videos) per request.
    """

    name = "remote"
    differentiable = False

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 120.0,
        retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        batch_size: int = 16,
    ) -> None:
        super().__init__(batch_size=batch_size, text_cache_size=0)
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"remote: url must start with http:// or https://, got {url!r}")
        for key, value in (("timeout", timeout), ("backoff", backoff), ("max_backoff", max_backoff)):
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"remote: {key} must be a finite number >= 0, got {value!r}")
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"remote: retries must be a whole number >= 0, got {retries!r}")
        self.url = url.rstrip("/")
        self.timeout, self.retries, self.backoff, self.max_backoff = timeout, retries, backoff, max_backoff
        info = self._call("/info", None, None, what="the server's description")
        if info.get("protocol") != PROTOCOL:
            raise RemoteRewardError(
                f"remote reward {self.url}: speaks protocol {info.get('protocol')!r}, this client {PROTOCOL}"
            )
        self.served = str(info["reward"])
        self.name = f"{self.served}@{self.url}"
        self.dimensions = tuple(info["dimensions"])
        self.media_kind = info["media_kind"]
        self.needs_prompts = bool(info["needs_prompts"])

    def info(self) -> dict[str, Any]:
        """The server's ``/info`` answer (its reward, dimensions and count of items scored)."""
        return self._call("/info", None, None, what="the server's description")

    def _score_images(self, images: Tensor, prompts: list[str] | None) -> dict[str, Tensor]:
        return self._score_items(images, prompts)

    def _score_videos(self, videos: Tensor, prompts: list[str] | None) -> dict[str, Tensor]:
        if self.media_kind == "image":  # the served reward scores frames: send frames, average here
            return super()._score_videos(videos, prompts)
        return self._score_items(videos, prompts)

    def _score_items(self, media: Tensor, prompts: list[str] | None) -> dict[str, Tensor]:
        parts = [encode_media(item) for item in media]
        rid = request_id(prompts, parts)
        meta = {"protocol": PROTOCOL, "request_id": rid, "prompts": prompts, "count": len(parts)}
        files = [(f"media{i}", data, kind) for i, (data, kind) in enumerate(parts)]
        body, content_type = _multipart({"request": json.dumps(meta)}, files)
        shown = (
            ""
            if prompts is None
            else f" (prompts {json.dumps(prompts[:3])[:200]}{'...' if len(prompts) > 3 else ''})"
        )
        answer = self._call("/score", body, content_type, what=f"{len(parts)} items{shown}", prompts=prompts)
        scores = answer.get("scores")
        if (
            answer.get("request_id") != rid
            or not isinstance(scores, dict)
            or set(scores) != set(self.dimensions)
        ):
            raise RemoteRewardError(
                f"remote reward {self.url}: malformed answer for {len(parts)} items{shown}"
            )
        return {k: torch.tensor(scores[k], dtype=torch.float32) for k in self.dimensions}

    def _call(
        self,
        path: str,
        body: bytes | None,
        content_type: str | None,
        *,
        what: str,
        prompts: list[str] | None = None,
    ) -> dict[str, Any]:
        """GET (no body) or POST ``path``, retrying transient failures; the JSON answer."""
        headers = {"Content-Type": content_type} if content_type else {}
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), self.max_backoff))
            request = urllib.request.Request(self.url + path, data=body, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as err:
                detail = _error_detail(err)
                if err.code in RETRY_STATUS:
                    last = f"HTTP {err.code}: {detail.get('error', err.reason)}"
                    continue
                message = (
                    f"remote reward {self.url}: {what}: HTTP {err.code}: {detail.get('error', err.reason)}"
                )
                item = detail.get("item")
                if (
                    err.code == 400
                    and isinstance(item, int)
                    and prompts is not None
                    and 0 <= item < len(prompts)
                ):
                    message += f" (item {item}, prompt {prompts[item][:80]!r})"
                raise (RewardInputError if err.code == 400 else RemoteRewardError)(message) from None
            except (OSError, TimeoutError) as err:  # refused, reset, unreachable, timed out
                last = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
        raise RemoteRewardError(
            f"remote reward {self.url}: {what}: failed after {self.retries + 1} tries ({last})"
        )


def _error_detail(err: urllib.error.HTTPError) -> dict[str, Any]:
    try:
        detail = json.loads(err.read())
    except (ValueError, OSError):
        return {}
    return detail if isinstance(detail, dict) else {}


def load_remote(
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    url: str,
    timeout: float = 120.0,
    retries: int = 5,
    backoff: float = 0.5,
    max_backoff: float = 30.0,
    batch_size: int = 16,
) -> RemoteReward:
    """A client of the reward server at ``url``; ``device`` and ``dtype`` are the server's business
    (given to ``flowalign serve-reward``) and unused here."""
    return RemoteReward(
        str(url),
        timeout=timeout,
        retries=retries,
        backoff=backoff,
        max_backoff=max_backoff,
        batch_size=batch_size,
    )

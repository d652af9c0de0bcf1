"""Serve a registered reward over HTTP: the server side of :mod:`flowalign.rewards.remote`.

:class:`RewardApp` is a WSGI application (Werkzeug request parsing), so it runs under any WSGI server;
:func:`make_reward_server` puts it in Werkzeug's threaded server, which ``flowalign serve-reward``
uses. Werkzeug is maintained, small and already installed with flowalign (TensorBoard depends on it),
so serving needs no new package; it is the ``serve`` extra all the same. For many clients, mount
``RewardApp(reward)`` under a production WSGI server (gunicorn, waitress) instead.

Scoring is serialised (one batch at a time under a lock: rewards are not thread-safe), and every answer
is kept by request id, in memory (the most recent ``cache_size``) and, with ``cache=PATH``, in a JSON
lines file that a restarted server reads back, so a request resent after a lost answer or a server
restart is answered without scoring it again. The file's first line names the reward; a server of
another reward refuses the file.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from flowalign.rewards.base import RewardInputError, RewardModel
from flowalign.rewards.remote import PROTOCOL, decode_media

__all__ = ["RewardApp", "make_reward_server"]

MAX_ITEMS = 1024  # media per request
MAX_BYTES = 2 << 30  # request body


def _werkzeug():
    try:
        from werkzeug.wrappers import Request, Response
    except ImportError as err:  # pragma: no cover - installed with tensorboard
        raise ImportError("serving a reward needs Werkzeug: pip install 'flowalign[serve]'") from err
    return Request, Response


class _AnswerCache:
    """Answers by request id: the latest ``size`` in memory, all of them in ``path`` (if given)."""

    def __init__(self, reward: str, path: str | Path | None, size: int) -> None:
        self.reward, self.size = reward, size
        self.path = None if path is None else Path(path)
        self.items: OrderedDict[str, dict[str, Any]] = OrderedDict()
        if self.path is not None and self.path.exists():
            self._read()
        elif self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"reward": reward, "protocol": PROTOCOL}) + "\n")

    def _read(self) -> None:
        text = self.path.read_text()
        if text and not text.endswith("\n"):  # a line cut by a kill: drop it, keep appending after it
            text = text[: text.rfind("\n") + 1]
            with self.path.open("r+") as handle:
                handle.truncate(len(text.encode()))
        lines = text.splitlines()
        head = json.loads(lines[0]) if lines else {}
        if head.get("reward") != self.reward:
            raise ValueError(f"{self.path}: answers of reward {head.get('reward')!r}, not {self.reward!r}")
        for number, line in enumerate(lines[1:], start=2):
            try:
                row = json.loads(line)
                self.items[row["request_id"]] = row
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{self.path}: line {number} is not a cached answer ({err})") from err
        while len(self.items) > self.size:
            self.items.popitem(last=False)

    def get(self, rid: str) -> dict[str, Any] | None:
        if rid in self.items:
            self.items.move_to_end(rid)
        return self.items.get(rid)

    def put(self, answer: dict[str, Any]) -> None:
        if self.path is not None:
            with self.path.open("a") as handle:
                handle.write(json.dumps(answer) + "\n")
                handle.flush()
        self.items[answer["request_id"]] = answer
        while len(self.items) > self.size:
            self.items.popitem(last=False)


class RewardApp:
    """WSGI application answering ``GET /info`` and ``POST /score`` for one reward.

    Args:
        reward: the reward to serve (from :func:`flowalign.rewards.load_reward`).
        served_name: the name it was loaded under (reported by ``/info``).
        cache: a JSON lines file keeping every answer across restarts (None: memory only).
        cache_size: answers kept in memory.
    """

    def __init__(
        self,
        reward: RewardModel,
        served_name: str,
        *,
        cache: str | Path | None = None,
        cache_size: int = 4096,
    ) -> None:
        self.reward, self.served_name = reward, served_name
        self.answers = _AnswerCache(served_name, cache, cache_size)
        self.lock = threading.Lock()
        self.scored_items = 0  # items this process scored (answers from the cache not counted)

    def info(self) -> dict[str, Any]:
        return {
            "protocol": PROTOCOL,
            "reward": self.served_name,
            "dimensions": list(self.reward.dimensions),
            "media_kind": self.reward.media_kind,
            "needs_prompts": self.reward.needs_prompts,
            "scored_items": self.scored_items,
        }

    def __call__(self, environ, start_response):  # noqa: ANN001 - the WSGI signature
        Request, Response = _werkzeug()
        request = Request(environ)
        request.max_content_length = MAX_BYTES
        request.max_form_parts = MAX_ITEMS + 8
        if request.path == "/info" and request.method == "GET":
            status, body = 200, self.info()
        elif request.path == "/score" and request.method == "POST":
            status, body = self._score(request)
        else:
            status, body = (
                404,
                {"error": f"no route {request.method} {request.path}; use GET /info, POST /score"},
            )
        return Response(json.dumps(body), status=status, mimetype="application/json")(environ, start_response)

    def _score(self, request) -> tuple[int, dict[str, Any]]:  # noqa: ANN001 - a werkzeug Request
        try:
            meta = json.loads(request.form.get("request", ""))
            rid, prompts, count = meta["request_id"], meta["prompts"], int(meta["count"])
        except (ValueError, KeyError, TypeError) as err:
            return 400, {
                "error": f"the 'request' field is not protocol {PROTOCOL} JSON ({err})",
                "item": None,
            }
        if meta.get("protocol") != PROTOCOL:
            return 400, {
                "error": f"protocol {meta.get('protocol')!r} asked, this server speaks {PROTOCOL}",
                "item": None,
            }
        if not 1 <= count <= MAX_ITEMS:
            return 400, {"error": f"count must be 1 to {MAX_ITEMS}, got {count}", "item": None}
        with self.lock:  # one batch at a time; a resent request waits for the first and reads its answer
            cached = self.answers.get(rid)
            if cached is not None:
                return 200, {**cached, "cached": True}
            try:
                media = self._media(request, count)
                scores = self.reward.score(media, prompts)
            except _ItemError as err:
                return 400, {"error": str(err), "item": err.item}
            except (RewardInputError, ValueError) as err:
                return 400, {"error": str(err), "item": None}
            except Exception as err:  # noqa: BLE001 - reported to the client, the server stays up
                return 500, {"error": f"{type(err).__name__}: {err}"}
            answer = {"request_id": rid, "scores": {k: v.cpu().tolist() for k, v in scores.items()}}
            self.answers.put(answer)
            self.scored_items += count
        return 200, {**answer, "cached": False}

    def _media(self, request, count: int) -> torch.Tensor:  # noqa: ANN001 - a werkzeug Request
        items = []
        for i in range(count):
            part = request.files.get(f"media{i}")
            if part is None:
                raise _ItemError(f"file media{i} is missing", i)
            try:
                items.append(decode_media(part.read(), part.mimetype, source=f"media{i}"))
            except ValueError as err:
                raise _ItemError(str(err), i) from err
            if items[i].shape != items[0].shape:
                raise _ItemError(
                    f"media{i} has shape {tuple(items[i].shape)}, media0 {tuple(items[0].shape)}", i
                )
        return torch.stack(items).to(self.reward.device)


class _ItemError(ValueError):
    def __init__(self, message: str, item: int) -> None:
        super().__init__(message)
        self.item = item


def make_reward_server(app: RewardApp, host: str = "127.0.0.1", port: int = 8000):
    """A threaded Werkzeug server for ``app`` (``serve_forever()`` to run it, ``shutdown()`` to stop);
    ``port=0`` picks a free port (``server.server_port``)."""
    try:
        from werkzeug.serving import make_server
    except ImportError as err:  # pragma: no cover - installed with tensorboard
        raise ImportError("serving a reward needs Werkzeug: pip install 'flowalign[serve]'") from err
    return make_server(host, port, app, threaded=True)

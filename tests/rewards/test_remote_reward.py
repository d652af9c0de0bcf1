"""``remote:url=...`` against ``flowalign serve-reward``: exact round trips, retries after a killed server,
answers cached by request id, and errors that name the server and the items."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import remote_toys  # noqa: F401 - registers rt-bright and rt-count
import torch

from flowalign.data.media import save_image
from flowalign.rewards import RewardInputError, load_reward
from flowalign.rewards.remote import RemoteRewardError, _multipart, decode_media, encode_media
from flowalign.rewards.scoring import score_files
from flowalign.rewards.serving import RewardApp, make_reward_server

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORDS = "a red fox jumps over the lazy dog under pale moon light".split()


def _media_folder(folder: Path, count: int, seed: int = 0) -> list[str]:
    """``count`` random 12x16 PNG images (values on the 1/255 grid) and one prompt each."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    for i in range(count):
        pixels = torch.randint(0, 256, (3, 12, 16), generator=gen).float() / 255
        save_image(pixels, folder / f"{i:03d}.png")
    return [" ".join(WORDS[: 1 + (i * 7) % len(WORDS)]) for i in range(count)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Served:
    """A reward served from a thread of this process."""

    def __init__(self, name: str, cache: Path | None = None, port: int = 0, **options) -> None:
        self.app = RewardApp(load_reward(name, **options), name, cache=cache)
        self.server = make_reward_server(self.app, "127.0.0.1", port)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture()
def serve():
    servers: list[_Served] = []

    def start(name: str, **kwargs) -> _Served:
        servers.append(_Served(name, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _dims(rows: list[dict], keys) -> dict[str, list[float]]:
    return {k: [row[k] for row in rows] for k in keys}


@pytest.mark.parametrize("name", ["rt-bright", "rt-count"])
def test_round_trip_equals_in_process_scores(serve, tmp_path, name) -> None:
    prompts = _media_folder(tmp_path / "media", 10)
    local = score_files(
        [name], tmp_path / "media", prompts, out=tmp_path / "local.jsonl", batch_size=4, progress=False
    )
    server = serve(name)
    remote = score_files(
        ["remote"], tmp_path / "media", prompts, out=tmp_path / "remote.jsonl", batch_size=4,
        reward_kwargs={"remote": {"url": server.url}}, progress=False,
    )  # fmt: skip
    assert remote.dimensions == local.dimensions
    assert _dims(remote.rows, local.dimensions) == _dims(local.rows, local.dimensions)  # exactly
    assert server.app.scored_items == 10


def test_videos_round_trip(serve) -> None:
    videos = torch.randint(0, 256, (2, 3, 3, 8, 8), generator=torch.Generator().manual_seed(3)).float() / 255
    prompts = ["a fox", "the lazy dog under the moon"]
    # An image reward: the client sends frames as PNG and averages, as the reward does in-process.
    bright = load_reward("remote", url=serve("rt-bright").url)
    assert torch.equal(
        bright.score(videos, prompts)["bright"], load_reward("rt-bright").score(videos, prompts)["bright"]
    )
    # A video reward gets MP4 (lossy): the server scores what the MP4 decodes to.
    count = load_reward("remote", url=serve("rt-count").url)
    decoded = torch.stack([decode_media(*encode_media(v), source="v") for v in videos])
    assert decoded.shape == videos.shape
    assert torch.equal(
        count.score(videos, prompts)["lit"], load_reward("rt-count").score(decoded, prompts)["lit"]
    )


def test_serve_reward_command_round_trip(tmp_path) -> None:
    prompts = _media_folder(tmp_path / "media", 6)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)]), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "flowalign",
        "serve-reward",
        "rt-bright",
        "--plugin",
        "remote_toys",
        "--port",
        "0",
    ]
    proc = subprocess.Popen([*command, "--device", "cpu"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "serving" not in line:
            line = proc.stderr.readline()
            assert line, "the server stopped before serving"
        url = line.split(" on ")[1].strip()
        remote = score_files(["remote"], tmp_path / "media", prompts, out=tmp_path / "r.jsonl",
                             reward_kwargs={"remote": {"url": url}}, progress=False)  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    local = score_files(["rt-bright"], tmp_path / "media", prompts, out=tmp_path / "l.jsonl", progress=False)
    assert _dims(remote.rows, ("bright", "warm")) == _dims(local.rows, ("bright", "warm"))


def _serve_in_child(port: int, cache: str, ready) -> None:  # noqa: ANN001 - a multiprocessing Event
    app = RewardApp(load_reward("rt-bright", delay=0.2), "rt-bright", cache=cache)
    server = make_reward_server(app, "127.0.0.1", port)
    ready.set()
    server.serve_forever()


def _start_child(context, port: int, cache: Path):
    ready = context.Event()
    child = context.Process(target=_serve_in_child, args=(port, str(cache), ready), daemon=True)
    child.start()
    assert ready.wait(30), "the reward server did not start"
    return child


def test_server_killed_mid_run_and_restarted(tmp_path) -> None:
    """The run goes on through the restart: every item scored, each once, no batch scored twice."""
    prompts = _media_folder(tmp_path / "media", 24)
    context = multiprocessing.get_context("fork")
    port, cache, out = _free_port(), tmp_path / "answers.jsonl", tmp_path / "scores.jsonl"
    child = _start_child(context, port, cache)
    options = {"url": f"http://127.0.0.1:{port}", "retries": 12, "backoff": 0.05, "max_backoff": 1.0}
    result: dict = {}

    def run() -> None:
        result["run"] = score_files(["remote"], tmp_path / "media", prompts, out=out, batch_size=4,
                                    reward_kwargs={"remote": options}, progress=False)  # fmt: skip

    client = threading.Thread(target=run)
    client.start()
    deadline = time.monotonic() + 30
    while not (out.exists() and out.read_text().count("\n") >= 1) and time.monotonic() < deadline:
        time.sleep(0.01)
    child.kill()  # SIGKILL, half-way through the run
    child.join()
    rows_at_kill = out.read_text().count("\n")
    assert 1 <= rows_at_kill < 24
    child = _start_child(context, port, cache)
    try:
        client.join(60)
    finally:
        child.kill()
        child.join()
    assert not client.is_alive() and "run" in result
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"{i:03d}.png" for i in range(24)]  # complete, in order, once each
    local = score_files(["rt-bright"], tmp_path / "media", prompts, out=tmp_path / "l.jsonl", progress=False)
    assert _dims(rows, ("bright", "warm")) == _dims(local.rows, ("bright", "warm"))
    answers = [json.loads(line) for line in cache.read_text().splitlines()[1:]]
    assert len(answers) == 6 and len({a["request_id"] for a in answers}) == 6  # 24 items / 4: each batch once


def test_resent_request_is_answered_from_the_cache(serve, tmp_path) -> None:
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = ["a fox", "a dog", "the moon"]
    first = serve("rt-count", cache=tmp_path / "answers.jsonl")
    client = load_reward("remote", url=first.url)
    scores = client.score(images, prompts)
    assert torch.equal(client.score(images, prompts)["lit"], scores["lit"])
    assert first.app.scored_items == 3 and client.info()["scored_items"] == 3
    first.close()
    # A restarted server reads the answers back.
    second = serve("rt-count", cache=tmp_path / "answers.jsonl")
    again = load_reward("remote", url=second.url).score(images, prompts)
    assert torch.equal(again["lit"], scores["lit"]) and second.app.scored_items == 0
    with pytest.raises(ValueError, match="answers of reward 'rt-count', not 'rt-bright'"):
        RewardApp(load_reward("rt-bright"), "rt-bright", cache=tmp_path / "answers.jsonl")


def test_unreachable_server_and_timeouts_name_the_server_and_items(serve, tmp_path) -> None:
    dead = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(RemoteRewardError, match=rf"remote reward {dead}: .* failed after 2 tries"):
        load_reward("remote", url=dead, retries=1, backoff=0)
    slow = serve("rt-bright", delay=1.0)
    prompts = _media_folder(tmp_path / "media", 2)
    options = {"url": slow.url, "timeout": 0.2, "retries": 0}
    with pytest.raises(RemoteRewardError) as err:
        score_files(["remote"], tmp_path / "media", prompts, out=tmp_path / "s.jsonl",
                    reward_kwargs={"remote": options}, progress=False)  # fmt: skip
    message = str(err.value)
    assert "000.png" in message and slow.url in message and "failed after 1 tries" in message
    assert json.dumps(prompts[0]) in message
    with pytest.raises(ValueError, match="url must start with http"):
        load_reward("remote", url="ftp://example")


def test_bad_item_is_refused_naming_it(serve) -> None:
    server = serve("rt-count")
    good, kind = encode_media(torch.zeros(3, 4, 4))
    meta = {"protocol": 1, "request_id": "x", "prompts": ["a", "b"], "count": 2}
    body, content_type = _multipart(
        {"request": json.dumps(meta)}, [("media0", good, kind), ("media1", b"junk", kind)]
    )
    request = urllib.request.Request(server.url + "/score", data=body, headers={"Content-Type": content_type})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 400
    assert json.loads(err.value.read())["item"] == 1
    with pytest.raises(RewardInputError, match="needs one prompt per media item"):
        load_reward("remote", url=server.url).score(torch.zeros(1, 3, 4, 4))


def test_serve_reward_command_refuses_bad_input() -> None:
    from typer.testing import CliRunner

    from flowalign.cli import app

    for args, message in (
        (["no-such-reward"], "unknown reward 'no-such-reward'"),
        (["remote:url=http://127.0.0.1:1"], "serve the reward itself"),
        (["rt-bright", "--plugin", "no_such_module_here"], "--plugin no_such_module_here: cannot import it"),
        (["rt-bright", "--port", "70000"], "--port"),
    ):
        res = CliRunner().invoke(app, ["serve-reward", *args, "--device", "cpu"])
        assert res.exit_code == 2, res.output
        assert message in res.output


def test_a_failing_reward_is_reported_at_once_and_the_server_stays_up(serve) -> None:
    server = serve("rt-bright")
    client = load_reward("remote", url=server.url, backoff=30.0)  # a retry would wait 30 s
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    start = time.monotonic()
    with pytest.raises(
        RemoteRewardError, match=r"HTTP 500: RuntimeError: the prompt 'boom' breaks this reward"
    ):
        client.score(images, ["a fox", "boom"])
    assert time.monotonic() - start < 10
    assert client.score(images, ["a fox", "a dog"])["bright"].shape == (2,)

"""``flowalign serve-reward``: serve a registered reward over HTTP for ``remote:url=...`` clients."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Annotated

import typer

from flowalign.cli.app import app, device_and_dtype, number


@app.command("serve-reward")
def serve_reward(
    reward: Annotated[str, typer.Argument(help="A registered reward, options as name:key=value.")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8000,
    cache: Annotated[
        Path | None, typer.Option(help="JSON lines file keeping every answer, read back on restart.")
    ] = None,
    plugin: Annotated[
        list[str] | None, typer.Option(help="Module to import first (it registers rewards); repeat.")
    ] = None,
    device: Annotated[str | None, typer.Option()] = None,
    dtype: Annotated[str | None, typer.Option(help="fp32, bf16 or fp16 (default: bf16 on GPU).")] = None,
) -> None:
    """Serve one reward: GET /info, POST /score (see flowalign.rewards.remote for the protocol)."""
    from flowalign.rewards.registry import load_reward, parse_reward_spec
    from flowalign.rewards.serving import RewardApp, make_reward_server

    number(port, "--port", lo=0, hi=65535)
    for module in plugin or []:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ValueError(f"--plugin {module}: cannot import it ({err})") from err
    name, options = parse_reward_spec(reward)
    if name == "remote":
        raise ValueError("serve-reward: serve the reward itself, not a remote client of another server")
    torch_device, torch_dtype = device_and_dtype(device, dtype)
    model = load_reward(name, device=torch_device, dtype=torch_dtype, **options)
    server = make_reward_server(RewardApp(model, name, cache=cache), host, port)
    typer.echo(f"serving {name} on http://{host}:{server.server_port}", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()

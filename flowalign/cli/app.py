"""The ``flowalign`` Typer application and the helpers its commands share (one ``error:`` line on bad input)."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="flowalign",
    help="Align and distill diffusion/flow generative models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Align and distill diffusion/flow generative models."""


USER_ERRORS = (ValueError, OSError)
"""What a command reports as one ``error:`` line: bad values, files or data (flowalign's errors are
ValueErrors) and missing/unreadable/unwritable paths (OSError: not found, permission, disk full)."""


def fail(message: str, code: int = 2) -> None:
    """Print one line naming the problem and exit non-zero."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def device_and_dtype(device: str | None, dtype: str | None):
    """``--device`` / ``--dtype`` with their defaults (cuda and bf16 when a GPU is present)."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = "bf16" if device.startswith("cuda") else "fp32"
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype not in dtypes:
        fail(f"--dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    return device, dtypes[dtype]


def parse_floats(text: str, option: str) -> list[float]:
    """``"1,1.5,3"`` -> [1.0, 1.5, 3.0], or one error naming the option and the bad item."""
    values = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        try:
            values.append(float(item))
        except ValueError:
            raise ValueError(f"{option}: {item!r} is not a number") from None
    return values


def weights_option(weights: str | None) -> dict[str, float] | None:
    """A ``--weights`` option (``vq=1,ta=0.5``) as a dict, or None when it is not given."""
    from flowalign.rewards.combine import parse_weights

    return parse_weights(weights) if weights else None

"""The ``flowalign`` Typer application and the helpers its commands share.

Errors and exit codes (every command, through :class:`Group`):

* ``0``: the command did its work.
* ``2``: the input was refused: a usage error (unknown option, a value of the wrong type) or a
  ``ValueError`` / ``OSError`` raised by a value, a file or a path (out of range, NaN, not found,
  unreadable, of the wrong format). Numbers are checked before any model is loaded or sample made.
* ``1``: the command ran and failed (a ``RuntimeError`` such as a device out of memory, an unexpected
  error) or produced nothing usable (``eval`` with no sample or no score).

Whatever the code, the problem is printed as one ``error: ...`` line (long values cut short), never a
traceback; set ``FLOWALIGN_TRACEBACK=1`` to see the traceback of an unexpected error.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import click
import typer

from flowalign.validation import check_number, short_repr

INPUT_ERROR = 2
RUN_ERROR = 1
MAX_MESSAGE = 300  # characters of an error line
DEVICE_TYPES = ("cpu", "cuda", "mps")

USER_ERRORS = (ValueError, OSError)
"""What a command reports as refused input (exit 2): bad values, files or data (flowalign's errors are
ValueErrors) and missing/unreadable/unwritable paths (OSError: not found, permission, disk full)."""


def one_line(err: BaseException) -> str:
    """The first non-empty line of an error's message (its type name when empty), at most MAX_MESSAGE long."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    text = lines[0].strip() if lines else type(err).__name__
    return text if len(text) <= MAX_MESSAGE else f"{text[: MAX_MESSAGE - 3]}..."


def fail(message: str, code: int = INPUT_ERROR) -> None:
    """Print one line naming the problem and exit non-zero."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with every error turned into one ``error:`` line and the exit code of the module's rule."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, click.exceptions.ClickException, click.exceptions.Abort):
            raise
        except USER_ERRORS as err:
            fail(one_line(err), INPUT_ERROR)
        except MemoryError:
            fail(
                "out of memory (host RAM); lower the size, the batch size or the number of samples", RUN_ERROR
            )
        except RuntimeError as err:  # torch's device errors, out of memory on a GPU, ...
            fail(one_line(err), RUN_ERROR)
        except Exception as err:
            if os.environ.get("FLOWALIGN_TRACEBACK"):
                raise
            fail(
                f"unexpected {type(err).__name__}: {one_line(err)} (FLOWALIGN_TRACEBACK=1 shows where)",
                RUN_ERROR,
            )

    return run


class Group(typer.Typer):
    """A Typer application whose commands all run under :func:`guarded`."""

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        register = super().command(*args, **kwargs)
        return lambda fn: register(guarded(fn))


app = Group(
    name="flowalign",
    help="Align and distill diffusion/flow generative models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Align and distill diffusion/flow generative models."""


def number(value: Any, option: str, **bounds: Any) -> Any:
    """``check_number`` for an optional command-line value (None passes: the option was not given)."""
    return value if value is None else check_number(value, option, **bounds)


def check_device(device: str) -> str:
    """A ``--device`` value that torch parses and that exists here (cpu, cuda[:i] or mps), else ValueError."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in DEVICE_TYPES:
        raise ValueError(f"--device must be cpu, cuda, cuda:N or mps, got {short_repr(device)}")
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {device}: no CUDA device is available here")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(
                f"--device {device}: there are {count} CUDA device(s) (cuda:0 to cuda:{count - 1})"
            )
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available here")
    return device


def device_and_dtype(device: str | None, dtype: str | None):
    """``--device`` / ``--dtype`` with their defaults (cuda and bf16 when a GPU is present)."""
    import torch

    device = check_device(device) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = "bf16" if device.startswith("cuda") else "fp32"
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"--dtype must be one of {sorted(dtypes)}, got {short_repr(dtype)}")
    return device, dtypes[dtype]


def parse_floats(text: str, option: str) -> list[float]:
    """``"1,1.5,3"`` -> [1.0, 1.5, 3.0], or one error naming the option and the bad item."""
    values = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        try:
            values.append(float(item))
        except ValueError:
            raise ValueError(f"{option}: {short_repr(item)} is not a number") from None
    return values


def parse_ints(text: str, option: str) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2], or one error naming the option and the bad item."""
    values = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        try:
            values.append(int(item))
        except ValueError:
            raise ValueError(f"{option}: {short_repr(item)} is not a whole number") from None
    if not values:
        raise ValueError(f"{option}: give at least one number")
    return values


def weights_option(weights: str | None) -> dict[str, float] | None:
    """A ``--weights`` option (``vq=1,ta=0.5``) as a dict, or None when it is not given."""
    from flowalign.rewards.combine import parse_weights

    return parse_weights(weights) if weights else None  # refuses NaN and infinite weights, naming the token

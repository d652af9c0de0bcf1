"""Counts gathered while the reliability suite runs, and the summary table built from them.

Tests call :func:`record` / :func:`count`; ``conftest.py`` prints :func:`render` at the end of the
session and writes it to the file named by ``FLOWALIGN_RELIABILITY_SUMMARY`` when that is set::

    FLOWALIGN_RELIABILITY_SUMMARY=reliability.md .venv/bin/python -m pytest -q tests/reliability -m ""
"""

from __future__ import annotations

from collections import defaultdict

# section -> key -> value (a count, or a list of names)
_DATA: dict[str, dict[str, object]] = defaultdict(dict)


def count(section: str, key: str, n: int = 1) -> None:
    """Add ``n`` to the counter ``section/key``."""
    _DATA[section][key] = int(_DATA[section].get(key, 0)) + n  # type: ignore[arg-type]


def record(section: str, key: str, value: object) -> None:
    """Set ``section/key`` to ``value``."""
    _DATA[section][key] = value


def add_to_list(section: str, key: str, item: str) -> None:
    """Append ``item`` to the list ``section/key`` (once)."""
    items = _DATA[section].setdefault(key, [])
    if item not in items:  # type: ignore[operator]
        items.append(item)  # type: ignore[union-attr]


def is_empty() -> bool:
    return not any(_DATA.values())


def render() -> str:
    """The summary as markdown, one table per section."""
    lines = ["# flowalign reliability summary", ""]
    titles = {
        "resume": "Exact resume (N straight == N/2 + resume + N/2, bit-identical on CPU)",
        "faults": "Fault injection",
        "fuzz": "Fuzzed inputs (hypothesis examples tried, by input kind)",
        "loading": "Safe loading",
        "numerics": "Numerical guards",
        "concurrency": "Two processes, one output folder (real processes, exactly one row per id)",
        "settings-aware resume": "Resume keyed by settings (a changed field is refused, named)",
        "interrupted pairs": "pairs killed midway and re-run (candidates kept, nothing drawn twice)",
        "oracle blind spots": "Toy oracle blind spots (images that do not draw the scene score 0)",
        "numbers": "Numbers and YAML from any source (finite, bounded, named)",
        "paths": "score / eval manifests confined to their folder",
        "file modes": "Atomic writes respect the umask (file kinds checked, by umask -> mode)",
        "option fuzzing": "CLI option values fuzzed (special and random values, models absent: 0 tracebacks)",
    }
    for section in [*titles, *sorted(set(_DATA) - set(titles))]:
        values = _DATA.get(section)
        if not values:
            continue
        lines += [f"## {titles.get(section, section)}", "", "| item | value |", "|---|---|"]
        for key in sorted(values):
            value = values[key]
            shown = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
            lines.append(f"| {key} | {shown} |")
        lines.append("")
    return "\n".join(lines)

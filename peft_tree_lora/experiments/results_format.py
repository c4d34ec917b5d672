"""Number formatting and the reproduce block shared by the sections of RESULTS.md."""

from __future__ import annotations

from statistics import mean
from typing import Any


def _spread(values: list[float], digits: int = 4) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{mean(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def _count(value: float) -> str:
    return f"{value / 1e6:.2f} M" if value >= 1e6 else f"{value / 1e3:.1f} k" if value >= 1e4 else f"{value:,.0f}"


def _reproduce(data: dict[str, Any]) -> list[str]:
    versions = ", ".join(f"{k} {v}" for k, v in data["versions"].items() if k != "machine")
    return [
        "Reproduce (after `python3 tasks.py setup`, from the repository root):",
        "",
        "```bash",
        *(data["command"] if isinstance(data["command"], list) else [data["command"]]),
        "```",
        "",
        f"Versions: {versions}. Machine: {data['versions']['machine']}. "
        f"Wall time of the whole study{' (all commands)' if isinstance(data['command'], list) else ''}: "
        f"{data['wall_seconds'] / 60:.1f} min (the machine was shared with other jobs, "
        "so times are noisy; compare training times only within one table).",
        "",
    ]

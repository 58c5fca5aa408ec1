"""User-facing errors, and the grouping of problem lists.

Everything a user can cause (a bad path, a broken checkpoint, an unsupported config) raises a
LowbitError subclass; the CLI prints its message on one line and exits 2, never a traceback.
Problem lists are grouped: lines that differ only in the decoder layer they name become one line
naming every affected layer (`model.layers.{0-13}.mlp.down_proj: ...`).
"""
from __future__ import annotations

import re


class LowbitError(Exception):
    """Base class for errors caused by the user's input rather than by a bug in lowbit."""


class ConfigError(LowbitError):
    """config.json / quantization config missing, malformed or unsupported."""


class CheckpointError(LowbitError):
    """The tensors on disk do not match what the model and its quantization config expect.

    Holds every violation found, not only the first, so one run shows the whole picture; the message
    lists them grouped by cause (`group_lines`).
    """

    def __init__(self, problems: list[str], header: str = "checkpoint does not load"):
        self.problems = list(problems)
        grouped = group_lines(self.problems)
        lines = [f"{header}: {len(self.problems)} problem(s)"]
        lines += [f"  - {p}" for p in grouped]
        super().__init__("\n".join(lines))


def index_ranges(idx: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    idx = sorted(set(idx))
    runs, start = [], idx[0]
    for a, b in zip(idx, idx[1:] + [None]):
        if b != a + 1:
            runs.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ",".join(runs)


_LAYER = re.compile(r"(layers\.|layer )(\d+)\b")


def group_lines(lines: list[str]) -> list[str]:
    """Lines equal but for the one layer index they mention -> one line listing the layers, in order
    of first appearance; other lines are kept as they are."""
    groups: dict[str, list[int]] = {}
    order: list[tuple[str, str | None]] = []
    for line in lines:
        found = {m.group(2) for m in _LAYER.finditer(line)}
        if len(found) != 1:
            order.append((line, None))
            continue
        key = _LAYER.sub(lambda m: m.group(1) + "\0", line)
        if key not in groups:
            groups[key] = []
            order.append((line, key))
        groups[key].append(int(found.pop()))
    out = []
    for line, key in order:
        if key is None:
            out.append(line)
        elif len(groups[key]) == 1:
            out.append(line)
        else:
            ranges = index_ranges(groups[key])
            out.append(key.replace("layers.\0", f"layers.{{{ranges}}}").replace("layer \0", f"layers {ranges}"))
    return out

"""Progress of long steps (load, demo, bench, quantize), visible whether or not stderr is a terminal.

`step(msg)` prints one line to stderr at once (flushed: a pipe or a log file sees it when it happens).
`Bar` is a tqdm bar on a terminal; elsewhere it prints a line when the work starts and one per 10%
(every item when there are few), so a piped run is never silent for long.
"""
from __future__ import annotations

import sys
import time


def step(msg: str) -> None:
    print(f"lowbit: {msg}", file=sys.stderr, flush=True)


class Bar:
    def __init__(self, total: float, desc: str, unit: str = "it", enabled: bool = True, scale_bytes: bool = False):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.scale_bytes = scale_bytes
        self.done = 0.0
        self._tqdm = None
        self._next = 0.0  # next fraction at which a line is printed (non-terminal)
        self._t0 = time.perf_counter()
        if not enabled:
            return
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self._tqdm = tqdm(total=total, desc=desc, unit="B" if scale_bytes else unit, unit_scale=scale_bytes,
                              leave=False, file=sys.stderr)
        else:
            step(f"{desc}: {self._fmt(0, total)}")
            self._next = 0.1

    def _fmt(self, done: float, total: float) -> str:
        if self.scale_bytes:
            return f"{done / 1e6:.1f}/{total / 1e6:.1f} MB"
        return f"{int(done)}/{int(total)} {self.unit}"

    def update(self, n: float = 1, what: str = "") -> None:
        self.done += n
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.update(n)
            return
        frac = self.done / self.total if self.total else 1.0
        if frac >= self._next or self.total <= 20:
            step(f"{self.desc}: {self._fmt(self.done, self.total)}{f' ({what})' if what else ''}, "
                 f"{time.perf_counter() - self._t0:.1f} s")
            while self._next <= frac:
                self._next += 0.1

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()


def iterate(items, desc: str, unit: str = "it", enabled: bool = True, label=str):
    """Yield from `items`, reporting each one done."""
    items = list(items)
    bar = Bar(len(items), desc, unit, enabled)
    try:
        for item in items:
            yield item
            bar.update(1, label(item))
    finally:
        bar.close()

"""Progress of long loops (shard, extract-codes, eval-recon, eval-gen, sample, convert, training), via tqdm.

On a terminal tqdm redraws one bar. When the output is not a terminal (SLURM logs, CI, pipes) a
redrawn bar would be one endless line of carriage returns, so a plain line is printed instead: at
the start, then at most every $TAMING_DIST_PROGRESS_EVERY_S seconds (default 30), and at the end:

    eval-recon: 12800/50000 images (25.6%) | 310.2 images/s | elapsed 00:41 | eta 02:00

Under torchrun ranks exchange nothing for progress: a collective per update would tie the ranks'
pace together, and evaluation and sampling ranks hold unequal shares. Rank 0 shows the global total
and counts its own work scaled by (global total / its own share, `local_total`): exact when ranks
hold equal shares, and the count reaches the total when rank 0 finishes.
"""
from __future__ import annotations

import os
import sys
from typing import Iterable, Optional

from tqdm import tqdm

EVERY_ENV = "TAMING_DIST_PROGRESS_EVERY_S"
DEFAULT_EVERY_S = 30.0


def every_s() -> float:
    """Seconds between two plain lines: $TAMING_DIST_PROGRESS_EVERY_S, default 30."""
    value = os.environ.get(EVERY_ENV, "")
    try:
        seconds = float(value) if value else DEFAULT_EVERY_S
    except ValueError:
        raise ValueError(f"{EVERY_ENV}={value!r} is not a number of seconds") from None
    if seconds < 0:
        raise ValueError(f"{EVERY_ENV}={value!r} must be >= 0")
    return seconds


class Progress(tqdm):
    """tqdm that counts in local units scaled to the global total, and prints plain lines off a terminal."""

    monitor_interval = 0  # no monitor thread: miniters=1 checks the clock at every update

    def __init__(self, iterable=None, *, plain: bool, scale: float = 1.0, initial: int = 0, **kwargs):
        self._plain, self._scale, self._local = plain, scale, initial
        super().__init__(iterable, initial=round(initial * scale), leave=not plain, miniters=1, **kwargs)

    def update(self, n=1):
        self._local += n
        return super().update(round(self._local * self._scale) - self.n)

    def __iter__(self):
        if self.disable:
            yield from self.iterable
            return
        for item in self.iterable:  # tqdm's own loop counts self.n directly, bypassing the scale
            yield item
            self.update(1)

    def display(self, msg=None, pos=None):
        if not self._plain:
            return super().display(msg, pos)
        # close() with leave=False asks to clear the bar (msg ""): print the last line instead.
        self.fp.write(self.plain_line(final=msg == "") + "\n")
        self.fp.flush()
        return False  # nothing to clear: close() then writes no carriage return

    def plain_line(self, final: bool = False) -> str:
        d = self.format_dict
        n, total, elapsed, unit = d["n"], d["total"], d["elapsed"], d["unit"].strip()

        sep = "" if self.unit_scale else " "

        def fmt(x) -> str:  # a count or a rate
            if self.unit_scale:
                return self.format_sizeof(x, divisor=self.unit_divisor)
            return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}" if x >= 10 else f"{x:.3g}"

        # The final line gives the overall rate, the others tqdm's smoothed one (the recent pace).
        rate = (n - self.initial) / elapsed if final and elapsed else d["rate"]
        done = f"{fmt(n)}/{fmt(total)}{sep}{unit} ({100 * n / total:.1f}%)" if total else f"{fmt(n)}{sep}{unit}"
        parts = [done, f"{fmt(rate) if rate else '?'}{sep}{unit}/s"]
        if final:
            parts.append(f"done in {self.format_interval(elapsed)}")
        else:
            parts.append(f"elapsed {self.format_interval(elapsed)}")
            if total:
                parts.append(f"eta {self.format_interval((total - n) / rate) if rate else '?'}")
        if self.postfix:
            parts.append(self.postfix.lstrip(", "))
        return f"{self.desc}: " + " | ".join(parts)


def progress(iterable: Optional[Iterable] = None, *, total: Optional[float] = None, desc: str, unit: str = "it",
             enabled: bool = True, local_total: Optional[float] = None, initial: int = 0,
             every: Optional[float] = None, unit_scale: bool = False, postfix: Optional[str] = None,
             file=None) -> Progress:
    """A progress bar over `iterable` or for `total` items updated with `.update(n)`; use it as a
    context manager (or call `.close()`) so the last line is printed.

    `total` is the global count; `local_total` this rank's share (counts are scaled by their
    ratio, see the module docstring). `enabled=False` (ranks > 0) shows nothing. `initial` items
    (local units) were done before, e.g. by an earlier run, and do not count in the rate. Off a
    terminal a line is printed at most every `every` seconds (default: $TAMING_DIST_PROGRESS_EVERY_S).
    """
    file = file if file is not None else sys.stderr
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    scale = total / local_total if total and local_total else 1.0
    plain = not (hasattr(file, "isatty") and file.isatty())
    return Progress(iterable, plain=plain, scale=scale, initial=initial, total=total, desc=desc,
                    unit=unit if unit_scale else f" {unit}", unit_scale=unit_scale, unit_divisor=1024,
                    mininterval=(every_s() if every is None else every) if plain else 0.1,
                    disable=not enabled, postfix=postfix, file=file, dynamic_ncols=not plain)

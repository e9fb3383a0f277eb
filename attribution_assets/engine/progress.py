"""Progress of long steps (gradient collection, scoring, autocorrelation): units done, rate,
ETA, told to whatever sinks the caller installed (:func:`reporting`), none by default.

The engine calls :func:`track` (or :func:`tracked` over an iterable) and never decides where
progress goes: the CLI installs :func:`terminal_sink` (a tqdm bar on a terminal, else a
throttled line on stderr), a Dagster asset a throttled log line (:func:`log_sink`: the first
report after ``every_seconds``, 10 by default, or after each ``every_fraction`` of the total;
under ``CI`` only the last line). Every line says done/total, rate and ETA. Sinks are
process-wide (a stack), so a step run in a worker thread reports too.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Report:
    """One step's state: ``done`` of ``total`` ``unit`` (and ``tokens``) after ``seconds``."""

    step: str
    unit: str
    done: int
    total: int | None
    seconds: float
    tokens: int = 0
    finished: bool = False

    @property
    def rate(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        if not self.total or self.done <= 0 or self.done >= self.total:
            return None if not self.total or self.done <= 0 else 0.0
        return (self.total - self.done) / self.rate

    def format(self) -> str:
        """``step: 120/400 documents (30%), 52.1 documents/s, 3.1k tokens/s, ETA 5 s``."""
        of = f"/{self.total}" if self.total else ""
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        parts = [f"{self.step}: {self.done}{of} {self.unit}{pct}", f"{self.rate:.1f} {self.unit}/s"]
        if self.tokens:
            parts.append(f"{self.tokens / max(self.seconds, 1e-9):.0f} tokens/s")
        if self.finished:
            parts.append(f"done in {self.seconds:.1f} s")
        elif self.eta_seconds is not None:
            parts.append(f"ETA {self.eta_seconds:.0f} s")
        return ", ".join(parts)


Sink = Callable[[Report], None]
_SINKS: list[Sink] = []
_LOCK = threading.Lock()


@contextlib.contextmanager
def reporting(sink: Sink) -> Iterator[None]:
    """Send every tracked step's reports to ``sink`` inside the block (stacked with any other)."""
    with _LOCK:
        _SINKS.append(sink)
    try:
        yield
    finally:
        with _LOCK:
            _SINKS.remove(sink)


class Tracker:
    """Counts one step's units; each :meth:`update` reports to the installed sinks."""

    def __init__(self, step: str, total: int | None, unit: str):
        self.step, self.total, self.unit = step, total, unit
        self.done = self.tokens = 0
        self.start = time.perf_counter()
        self.sinks = list(_SINKS)

    def _report(self, finished: bool) -> None:
        report = Report(self.step, self.unit, self.done, self.total, time.perf_counter() - self.start,
                        self.tokens, finished)
        for sink in self.sinks:
            sink(report)

    def update(self, n: int = 1, tokens: int = 0) -> None:
        self.done += n
        self.tokens += tokens
        if self.sinks:
            self._report(False)

    def close(self) -> None:
        if self.sinks:
            self._report(True)


@contextlib.contextmanager
def track(step: str, total: int | None, unit: str) -> Iterator[Tracker]:
    """A :class:`Tracker` for one step; its final report is sent when the block ends normally."""
    tracker = Tracker(step, total, unit)
    yield tracker
    tracker.close()


def tracked(items: Iterable[T], step: str, total: int | None, unit: str,
            size: Callable[[T], int] = lambda _: 1) -> Iterator[T]:
    """``items`` unchanged, counting ``size(item)`` units after each one is consumed."""
    with track(step, total, unit) as tracker:
        for item in items:
            yield item
            tracker.update(size(item))


def quiet() -> bool:
    """Whether progress should stay quiet: ``CI`` is set (to anything but ``false``/``0``)."""
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def log_sink(log: Callable[[str], None], every_seconds: float = 10.0, every_fraction: float = 0.1) -> Sink:
    """Log ``Report.format()`` lines, throttled per step: the first report after
    ``every_seconds`` or after another ``every_fraction`` of the total, and the last one (the
    step's end, once); only the last one when :func:`quiet`."""
    last: dict[str, tuple[float, int]] = {}  # step -> (seconds, fractions done) when last logged

    def sink(report: Report) -> None:
        if report.finished:
            last.pop(report.step, None)
            log(report.format())
            return
        if quiet() or (report.total and report.done >= report.total):  # the final line says it
            return
        seconds, bucket = last.get(report.step, (0.0, 0))
        now = int(report.done / report.total / every_fraction + 1e-9) if report.total else 0
        if report.seconds - seconds >= every_seconds or now > bucket:
            last[report.step] = (report.seconds, max(now, bucket))
            log(report.format())

    return sink


def tqdm_sink(stream=None) -> Sink:
    """A tqdm bar per step on ``stream`` (default stderr); none when the stream is not a
    terminal or :func:`quiet`."""
    stream = stream or sys.stderr
    if quiet() or not getattr(stream, "isatty", lambda: False)():
        return lambda report: None
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def sink(report: Report) -> None:
        bar = bars.get(report.step)
        if bar is None:
            bar = bars[report.step] = tqdm(total=report.total, desc=report.step, unit=f" {report.unit}",
                                           file=stream, leave=False, dynamic_ncols=True)
        bar.update(report.done - bar.n)
        if report.tokens:
            bar.set_postfix_str(f"{report.tokens / max(report.seconds, 1e-9):.0f} tokens/s", refresh=False)
        if report.finished:
            bar.close()
            del bars[report.step]

    return sink


def terminal_sink(stream=None, every_seconds: float = 10.0) -> Sink:
    """What a command shows on ``stream`` (default stderr): a tqdm bar per step on a terminal,
    else (a pipe, a log file) one ``Report.format()`` line per step at least every
    ``every_seconds`` and each quarter of the total, and the last one (only the last under
    :func:`quiet`)."""
    stream = stream or sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        return tqdm_sink(stream)
    return log_sink(lambda line: print(line, file=stream, flush=True), every_seconds, every_fraction=0.25)

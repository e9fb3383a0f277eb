"""Progress reports: rate and ETA arithmetic, throttled log lines, nothing under CI or off a
terminal, sinks installed only inside their block."""

import io
from types import SimpleNamespace

from attribution_assets.engine import progress
from attribution_assets.engine.progress import (
    Report,
    log_sink,
    reporting,
    terminal_sink,
    tqdm_sink,
    track,
    tracked,
)


def test_report_rate_eta_and_text():
    r = Report("gradients", "documents", 30, 120, 10.0, tokens=3000)
    assert r.rate == 3.0 and r.eta_seconds == 30.0
    assert r.format() == "gradients: 30/120 documents (25%), 3.0 documents/s, 300 tokens/s, ETA 30 s"
    done = Report("scores", "shards", 4, 4, 2.0, finished=True)
    assert done.format() == "scores: 4/4 shards (100%), 2.0 shards/s, done in 2.0 s"
    assert Report("x", "u", 0, None, 0.0).eta_seconds is None


def test_log_sink_logs_each_tenth_and_the_end(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    lines: list[str] = []
    with reporting(log_sink(lines.append, every_seconds=1e9, every_fraction=0.1)), \
            track("gradients", 1000, "documents") as tracker:
        for _ in range(1000):
            tracker.update(1)
    assert len(lines) == 10, lines  # 10 %, 20 %, ..., 90 % and the final line (100 % once)
    assert lines[-1].startswith("gradients: 1000/1000 documents (100%)") and "done in" in lines[-1]


def test_log_sink_is_quiet_under_ci_but_for_the_last_line(monkeypatch):
    monkeypatch.setenv("CI", "true")
    lines: list[str] = []
    with reporting(log_sink(lines.append, every_seconds=0.0)):
        assert list(tracked(range(50), "scores", 50, "shards")) == list(range(50))
    assert len(lines) == 1 and lines[0].startswith("scores: 50/50 shards")


def test_sinks_only_hear_steps_inside_their_block(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    lines: list[str] = []
    with track("before", 2, "documents") as tracker:
        tracker.update(2)
    with reporting(log_sink(lines.append)):
        pass
    with track("after", 2, "documents") as tracker:
        tracker.update(2)
    assert lines == []


def test_tqdm_sink_draws_nothing_off_a_terminal_or_under_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    stream = io.StringIO()
    with reporting(tqdm_sink(stream)):
        list(tracked(range(5), "gradients", 5, "documents"))
    assert stream.getvalue() == ""

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tty = Terminal()
    with reporting(tqdm_sink(tty)):
        list(tracked(range(5), "gradients", 5, "documents"))
    assert "gradients" in tty.getvalue() and "/5 " in tty.getvalue()  # tqdm redraws at most every 0.1 s
    monkeypatch.setenv("CI", "true")
    quiet = Terminal()
    with reporting(tqdm_sink(quiet)):
        list(tracked(range(5), "gradients", 5, "documents"))
    assert quiet.getvalue() == ""


def test_off_a_terminal_a_command_prints_a_line_each_quarter_and_every_ten_seconds(monkeypatch):
    """A pipe or log file gets done/total, rate and ETA lines (a terminal gets a tqdm bar)."""
    monkeypatch.delenv("CI", raising=False)
    stream = io.StringIO()
    with reporting(terminal_sink(stream, every_seconds=1e9)):
        list(tracked(range(100), "gradients", 100, "documents"))
    lines = stream.getvalue().splitlines()
    assert [line.split(" documents")[0] for line in lines] == [
        "gradients: 25/100", "gradients: 50/100", "gradients: 75/100", "gradients: 100/100"]
    assert all("documents/s" in line and "ETA" in line for line in lines[:3]) and "done in" in lines[-1]
    clock = iter(range(0, 10_000, 4))  # each report 4 s after the last: a line at least every 10 s
    monkeypatch.setattr(progress, "time", SimpleNamespace(perf_counter=lambda: float(next(clock))))
    stream = io.StringIO()
    with reporting(terminal_sink(stream)):
        list(tracked(range(10), "scores", 1000, "shards"))
    assert [line.split(" shards")[0] for line in stream.getvalue().splitlines()] == [
        "scores: 3/1000", "scores: 6/1000", "scores: 9/1000", "scores: 10/1000"]

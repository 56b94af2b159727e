"""What a training run tells its user while it runs: a progress bar per epoch and the expected time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

import torch


class Estimate:
    """The run's expected duration, printed once from the speed of the first training batches.

    The first batch is left out of the measurement (one-time set-up: allocations, kernel
    choice); the speed is measured over the next ones, for at least ``measure_s`` seconds or
    ``max_steps`` batches, whichever comes first. Validation is counted at a third of a
    training step's cost per image (a forward pass, no backward).
    """

    def __init__(self, epochs: int, batches: int, val_images: int, *, measure_s: float = 1.0,
                 max_steps: int = 8, clock: Callable[[], float] = time.perf_counter) -> None:
        self.epochs, self.batches, self.val_images = epochs, batches, val_images
        self.measure_s, self.max_steps, self.clock = measure_s, max_steps, clock
        self.since = clock()
        self.images = 0
        self.text: str | None = None

    def step(self, step: int, images: int, bar: ProgressBar, device: torch.device) -> None:
        """Record that training step ``step`` (1-based) of ``images`` images ended; print once it can tell."""
        if self.text is not None:
            return
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # a step's time is the device's, not the launch's
        now = self.clock()
        if step == 1:
            self.since = now
            return
        self.images += images
        if (now - self.since < self.measure_s and step - 1 < self.max_steps) and step < self.batches:
            return
        rate = self.images / (now - self.since)
        per_epoch = self.batches * (self.images / (step - 1)) / rate + self.val_images / (3 * rate)
        total = self.epochs * per_epoch
        batches = "batch 2" if step == 2 else f"batches 2-{step}"
        self.text = (f"expected time: {_duration(total)} ({_duration(per_epoch)} per epoch at {rate:.0f} img/s, "
                     f"measured over {batches})")
        bar.note(self.text)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def write(stream: TextIO | None, text: str) -> None:
    """Write ``text`` to ``stream`` and flush; ``None`` writes nothing."""
    if stream is not None:
        stream.write(text)
        stream.flush()


_CLEAR_TO_END = "\x1b[K"  # a shorter redraw must not leave the tail of the longer one behind


class ProgressBar:
    """One line per epoch: redrawn in place with ``\\r`` on a terminal, ended with a newline.

    Off a terminal (logs, pipes) only the finished line is written; ``stream=None`` writes nothing.
    """

    def __init__(self, stream: TextIO | None, label: str, total: int, *, interval: float = 0.2) -> None:
        self.stream, self.label, self.total, self.interval = stream, label, total, interval
        self.live = stream is not None and stream.isatty()
        self.done, self._drawn = 0, 0.0

    def update(self, done: int, text: Callable[[], str]) -> None:
        """Record progress; redraw with ``text()`` when live and due (``text`` runs only then)."""
        self.done = done
        if self.live and time.monotonic() - self._drawn >= self.interval:
            self._drawn = time.monotonic()
            self._write("\r" + self._line(text()) + _CLEAR_TO_END)

    def note(self, text: str) -> None:
        """Write ``text`` on a line of its own above the bar (redrawn at the next update)."""
        self._write(("\r" + text + _CLEAR_TO_END if self.live else text) + "\n")
        self._drawn = 0.0

    def close(self, text: str) -> None:
        """Write the finished line and the newline."""
        self._write(("\r" + self._line(text) + _CLEAR_TO_END if self.live else self._line(text)) + "\n")

    def _line(self, text: str) -> str:
        filled = round(20 * self.done / max(self.total, 1))
        return f"{self.label} [{'#' * filled}{'.' * (20 - filled)}] {self.done}/{self.total} {text}"

    def _write(self, text: str) -> None:
        if self.stream is not None:
            self.stream.write(text)
            self.stream.flush()

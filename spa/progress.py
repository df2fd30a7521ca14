"""Progress reporting for long steps: a no-op by default, lines on stderr from the CLI."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager


class Progress:
    def __init__(self, enabled: bool = False, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr

    @contextmanager
    def step(self, what: str):
        t0 = time.perf_counter()
        if self.enabled:
            print(f"[spa] {what} ...", end="", file=self.stream, flush=True)
        try:
            yield
        except BaseException:
            if self.enabled:
                print(" failed", file=self.stream, flush=True)
            raise
        if self.enabled:
            print(f" done ({time.perf_counter() - t0:.2f}s)", file=self.stream, flush=True)

    def note(self, text: str) -> None:
        if self.enabled:
            print(f"[spa] {text}", file=self.stream, flush=True)


SILENT = Progress(False)

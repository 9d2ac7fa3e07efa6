"""Peak memory of processes: per-process high-water mark and a sampled total."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


def peak_rss_bytes(pid: int) -> int | None:
    """The kernel's resident-set high-water mark (``VmHWM``) of ``pid``, or None if gone/unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def describe(pid: int) -> str:
    import psutil

    try:
        p = psutil.Process(pid)
        title = " ".join(p.cmdline())[:80] or p.name()
        return title
    except psutil.Error:
        return "?"


def peaks(pids: list[int]) -> dict[int, dict]:
    out = {}
    for pid in pids:
        b = peak_rss_bytes(pid)
        if b is not None:
            out[pid] = {"peak_rss_mb": round(b / 2**20, 1), "process": describe(pid)}
    return out


@dataclass
class RssSampler:
    """Samples the summed RSS of the processes ``pids_fn`` returns; keeps the maximum."""

    pids_fn: object
    interval_s: float = 0.5
    max_total_bytes: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            for pid in self.pids_fn():
                try:
                    total += psutil.Process(pid).memory_info().rss
                except psutil.Error:
                    pass
            self.max_total_bytes = max(self.max_total_bytes, total)
            self.samples += 1
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "RssSampler":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    @property
    def max_total_mb(self) -> float:
        return round(self.max_total_bytes / 2**20, 1)


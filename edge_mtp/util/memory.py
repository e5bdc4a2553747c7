"""Peak resident memory of this process and its children, sampled while work runs (what an OOM killer sees), peak
disk use of the same work, and the memory available before it starts."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Callable


def tree_rss_bytes(pid: int | None = None) -> int:
    """Resident bytes of a process and all its descendants, read from /proc (0 where /proc is missing)."""
    pid = pid or os.getpid()
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
            for task in Path(f"/proc/{current}/task").iterdir():
                children = (task / "children").read_text().split()
                stack.extend(int(c) for c in children)
        except OSError:
            continue
    return total


class PeakSampler:
    """`with PeakSampler(read) as m: ...` then `m.peak`: the largest value of `read()` seen, sampled every `interval`."""

    def __init__(self, read: Callable[[], int], interval: float = 0.2):
        self.read, self.interval, self.peak = read, interval, 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.read())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = self.read()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self.read())

    def restart(self) -> int:
        """The peak so far; sampling goes on from the current value (peaks of successive stages)."""
        now = self.read()
        peak, self.peak = max(self.peak, now), now
        return peak


class PeakMemory(PeakSampler):
    """`with PeakMemory() as m: ...` then `m.peak_mib`: the largest process-tree RSS seen (bytes in `m.peak`)."""

    def __init__(self, interval: float = 0.2, pid: int | None = None):
        super().__init__(lambda: tree_rss_bytes(pid), interval)

    @property
    def peak_mib(self) -> float:
        return self.peak / 2**20


def available_bytes() -> int:
    """Memory the system can give a new allocation without swapping (MemAvailable; 0 where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def disk_used_bytes(path: str | Path) -> int:
    """Bytes in use on the file system holding `path` (a disk-use sampler for PeakSampler)."""
    return shutil.disk_usage(path).used

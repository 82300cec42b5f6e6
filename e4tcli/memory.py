"""The process's peak resident memory, for logs and benchmarks."""

import sys
from pathlib import Path
from typing import Optional


def peak_rss_mb() -> Optional[float]:
    """Peak resident set size of this process so far, in MB (None where the OS does not say).

    On Linux it is ``VmHWM`` of /proc/self/status: ``getrusage`` there keeps the peak of the process
    that forked this one, so a small tool started by a big one would report the big one's peak."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6  # bytes on macOS, KiB elsewhere

"""The resident memory of this process, and its peak since a reset (Linux /proc), for the
memory benchmarks: ``base = rss_mb(); reset_peak_rss(); ...; peak_rss_mb(...) - base``."""

from __future__ import annotations

import os
import resource


def rss_mb() -> float:
    """Resident memory now, in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb(was_reset: bool) -> float:
    """Peak resident memory in MB: since the reset (VmHWM), or of the whole process without one."""
    if was_reset:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

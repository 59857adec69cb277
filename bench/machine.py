"""What a benchmark records about the machine it ran on, and waiting for a quiet one.

The CPU benchmarks share a 2-core machine with other jobs: the load average at
the start is part of every result, so that contention is visible.
"""
import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional


def cpu_model() -> str:
    """RETURNS (str): The CPU's model name (/proc/cpuinfo on Linux, else platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def load_average() -> Optional[float]:
    """RETURNS (Optional[float]): The 1-minute load average, if known."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def load_averages() -> Optional[List[float]]:
    """RETURNS (Optional[List[float]]): The 1, 5 and 15-minute load averages, if known."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def memory_gib() -> Optional[float]:
    """RETURNS (Optional[float]): The machine's physical memory in GiB, if known."""
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def wait_for_quiet(threshold: float = 1.5, max_wait_s: float = 900, poll_s: float = 30) -> Dict[str, Any]:
    """Wait (up to `max_wait_s`) until the 1-minute load average is at most `threshold`.

    RETURNS (Dict[str, Any]): The load at the first look and at the start, the seconds
        waited, and whether the benchmark started on a busy machine anyway.
    """
    first = load_average()
    begin = time.time()
    while (load_average() or 0.0) > threshold and time.time() - begin < max_wait_s:
        print(f"bench: 1-min load average {load_average()} > {threshold}; waiting", file=sys.stderr)
        time.sleep(poll_s)
    start = load_average()
    return {
        "load_average_1min_first_look": first,
        "load_average_1min_at_start": start,
        "waited_s": round(time.time() - begin),
        "started_busy": bool(start is not None and start > threshold),
        "busy_threshold": threshold,
    }


def machine_info() -> Dict[str, Any]:
    """RETURNS (Dict[str, Any]): The command line, machine, date and load average."""
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {
        "command": " ".join(["python"] + [shlex.quote(a) for a in sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": cores,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_1min": load_average(),
    }

"""Handing memory back between the stages of a long run.

A training stage on the CPU frees gigabytes of activations and optimizer state,
but glibc keeps freed heap pages mapped when live blocks sit above them, so the
process's resident size only grows: a general-mix stage followed by a K-shot
stage in one process was killed by the OOM killer at 24.4 GB, where the K-shot
stage alone, in a fresh process, peaked at 12.6 GB. Measured on that workload
(Qwen2.5-Coder-1.5B, bf16, CPU, 14 steps into the general stage), `malloc_trim(0)`
took the resident size from 10.4 GB to 6.8 GB. `release_memory` is called when a
training stage ends and before each dev evaluation during training.
"""
import ctypes
import gc
import os
import platform
from typing import Optional

import torch


def release_memory() -> bool:
    """Collect garbage, empty torch's CUDA cache and hand the free pages of the C
    heap back to the OS (`malloc_trim`, glibc only). Call it when a stage ends,
    after dropping the references to what it allocated.

    RETURNS (bool): Whether the C heap was trimmed (False off glibc).
    """
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def resident_bytes() -> Optional[int]:
    """RETURNS (Optional[int]): The process's resident set size now, in bytes
    (Linux `/proc/self/statm`; None elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_resident_bytes() -> int:
    """RETURNS (int): The highest resident set size of the process so far, in bytes
    (`getrusage`; 0 where the `resource` module is missing, e.g. on Windows)."""
    try:
        import resource
    except ImportError:
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if platform.system() == "Darwin" else int(peak) * 1024  # Linux reports KiB


__all__ = ("peak_resident_bytes", "release_memory", "resident_bytes")

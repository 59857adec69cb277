import ctypes
import gc
import platform

import pytest

from spacy_cllmfs import memory
from spacy_cllmfs.memory import peak_resident_bytes, release_memory, resident_bytes

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
MiB = 2**20


@pytest.mark.skipif(not GLIBC, reason="malloc_trim and /proc/self/statm are glibc/Linux's")
def test_freed_heap_pages_below_a_live_block_go_back_to_the_os():
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    # 64 KiB blocks stay under glibc's mmap threshold, so they live on the heap
    blocks = [libc.malloc(64 * 1024) for _ in range(3200)]
    assert all(blocks)
    for block in blocks:
        ctypes.memset(block, 1, 64 * 1024)  # resident
    pin = libc.malloc(64 * 1024)  # a live block above them: free() alone cannot shrink the heap
    try:
        for block in blocks:
            libc.free(block)
        gc.collect()
        before = resident_bytes()
        assert release_memory() is True
        after = resident_bytes()
    finally:
        libc.free(pin)
    assert before is not None and after is not None
    assert before - after > 100 * MiB, (before / MiB, after / MiB)


def test_release_memory_is_a_no_op_off_glibc(monkeypatch):
    monkeypatch.setattr(memory.platform, "libc_ver", lambda: ("", ""))
    assert release_memory() is False


@pytest.mark.skipif(platform.system() != "Linux", reason="/proc/self/statm is Linux's")
def test_the_peak_is_at_least_the_resident_size():
    now = resident_bytes()
    assert now is not None and now > 10 * MiB
    assert peak_resident_bytes() >= now

"""common.py's run helpers that the script tests do not reach: the CPU allocator setting."""

import ctypes
import platform

import pytest

import common


class MallocInfo(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def test_tune_cpu_allocator_serves_big_blocks_from_the_heap(monkeypatch):
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype, libc.malloc.restype = MallocInfo, ctypes.c_void_p
    libc.malloc.argtypes, libc.free.argtypes = [ctypes.c_size_t], [ctypes.c_void_p]
    common.tune_cpu_allocator()
    mapped = libc.mallinfo2().hblkhd  # bytes in blocks that have their own mmap
    block = libc.malloc(200 << 20)  # glibc's default maps anything over 32 MB on its own
    assert libc.mallinfo2().hblkhd == mapped
    libc.free(block)
    heap = libc.mallinfo2().arena
    assert heap >= 200 << 20  # freed, the block stays in the process for the next one
    # without glibc (macOS, Windows, musl): nothing is called
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    monkeypatch.setattr(ctypes, "CDLL", lambda *a: pytest.fail("libc loaded without glibc"))
    common.tune_cpu_allocator()

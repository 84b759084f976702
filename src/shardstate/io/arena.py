"""Load memory: one anonymous, page-aligned allocation that a rank's parameters become views of, and its
pre-faulting.

Fresh anonymous memory costs most of a warm load: the kernel zeroes every page on its first touch (on the
2-core VM about 0.33 s per GB, as long as the page-cache read itself). A worker therefore reserves its
load memory (`Reservation`) as its first act, before it imports torch, joins its process group and
builds its model, and a background thread faults the pages in meanwhile; the load then reads into
memory that is already there. Torch is imported here only when a tensor is made, for that reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PAGE = mmap.PAGESIZE
MADV_POPULATE_READ = 22  # Linux >= 5.14; Python 3.11's mmap module does not name them
MADV_POPULATE_WRITE = 23
PREFAULT_STEP = 16 << 20  # what the background thread faults in at a time (so that it can stop between)


def enabled(knob: str, default: bool = True) -> bool:
    """An environment switch: SHARDSTATE_PREFAULT (default on), SHARDSTATE_HUGEPAGES (default off): "0" or
    "1" to measure with and without."""
    return os.environ.get(knob, "1" if default else "0") != "0"


def align_down(n: int, a: int) -> int:
    return n - n % a


def align_up(n: int, a: int) -> int:
    return -(-n // a) * a


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return function


def populate_memory(address: int, size: int) -> None:
    """Fault in the whole pages of [address, address + size) in someone else's allocation (vLLM's
    parameters) right before they are read into: one MADV_POPULATE_WRITE costs less than a fault per
    4 KiB page in the middle of the copy (a warm 2.4 GB TP=1 read into fresh parameters: 0.50 against
    0.61 s here). The partial pages at either end, and kernels without it (< 5.14), fault as before."""
    madvise = _madvise()
    start, end = align_up(address, PAGE), align_down(address + size, PAGE)
    if madvise is not None and end > start:
        madvise(start, end - start, MADV_POPULATE_WRITE)  # a refusal (EINVAL) only leaves the faults to the copy


class Arena:
    """One anonymous, page-aligned allocation. Tensors made from it keep it alive. Pages are faulted in
    chunk by chunk just before each read (`populate`, one madvise per chunk) unless a reservation's
    thread did it already. With SHARDSTATE_HUGEPAGES=1 it asks for 2 MiB transparent huge pages
    (MADV_HUGEPAGE): 512x fewer faults, but no faster here (zeroing, not faulting, is the cost) and, where
    THP defrag is `madvise`, a fault may first compact memory (seconds, with the page cache full)."""

    def __init__(self, size: int):
        self.size = max(size, 1)
        self._map = mmap.mmap(-1, align_up(self.size, PAGE))
        self.faulted = 0  # bytes from the start known to be faulted in (by a reservation's thread)
        if enabled("SHARDSTATE_HUGEPAGES", default=False) and hasattr(mmap, "MADV_HUGEPAGE"):
            with contextlib.suppress(OSError):  # a kernel built without THP: EINVAL, and 4 KiB pages
                self._map.madvise(mmap.MADV_HUGEPAGE)

    @functools.cached_property
    def tensor(self) -> torch.Tensor:
        import torch  # not at module level: a worker reserves its arena before it imports torch

        return torch.frombuffer(self._map, dtype=torch.uint8)

    def prefault(self, offset: int, size: int) -> bool:
        """Fault the pages of [offset, offset + size) in without writing a byte (False where the kernel
        cannot: < 5.14)."""
        start = align_down(offset, PAGE)
        try:
            self._map.madvise(MADV_POPULATE_WRITE, start, align_up(offset + size, PAGE) - start)
        except (OSError, ValueError):
            return False
        return True

    def populate(self, offset: int, size: int) -> None:
        """Fault the pages of a range about to be read in: without MADV_POPULATE_WRITE, by writing to them.
        Nothing where a reservation's thread has been already (a populate call on present pages still walks
        them: ~15% of a warm read)."""
        if offset + size <= self.faulted:
            return
        if not self.prefault(offset, size):  # kernel < 5.14: touch the pages instead, but only at bytes of this range
            for page in range(align_up(offset, PAGE), offset + size, PAGE):  # (the page holding `offset` may
                self._map[page] = 0  # start with bytes another chunk has already read, or is reading now)

    def view(self, offset: int, size: int) -> memoryview:
        return memoryview(self._map)[offset : offset + size]


class Scratch:
    """An arena kept across reads, for a caller that needs one batch of spans at a time (the converter,
    one parameter at a time): its pages are faulted in once, not on every read. Tensors from one read
    are valid until the next read into the same Scratch."""

    def __init__(self) -> None:
        self._arena: Arena | None = None

    def arena(self, size: int) -> Arena:
        if self._arena is None or self._arena.size < size:
            self._arena = Arena(size)  # the old one is freed once the previous read's tensors are gone
        return self._arena


class Reservation(Scratch):
    """A rank's load memory, reserved before it is needed: `size` bytes whose pages a daemon thread faults
    in, in order, from the start (the load's own populate calls then find them present, or fault what the
    thread has not reached yet: both are safe at once). Used for one read (read_spans' `scratch`);
    `release` stops the thread and lets the memory go unless a read's tensors hold it."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self._arena = Arena(size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._prefault, args=(self._arena,), name="shardstate-prefault",
                                        daemon=True)
        self._thread.start()

    def _prefault(self, arena: Arena) -> None:
        for offset in range(0, arena.size, PREFAULT_STEP):
            if self._stop.is_set():
                return
            if not arena.prefault(offset, min(PREFAULT_STEP, arena.size - offset)):
                return  # never by writing: a read or a loader may be filling these pages already
            arena.faulted = min(offset + PREFAULT_STEP, arena.size)

    def arena(self, size: int) -> Arena:
        if size > self.size:  # more than was reserved: stop faulting in memory that will not be used
            self.release()
        return super().arena(size)

    @property
    def size(self) -> int:
        return self._arena.size if self._arena is not None else 0

    @property
    def faulted(self) -> int:
        """Bytes the thread has faulted in so far."""
        return self._arena.faulted if self._arena is not None else 0

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        self._arena = None

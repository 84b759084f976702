"""pread-based reading into preallocated tensors, with an account of files opened and bytes read."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from shardstate.errors import ShardstateError
from shardstate.io.files import open_regular


def byte_view(tensor: torch.Tensor) -> memoryview:
    """A writable memoryview of a contiguous CPU tensor's bytes (any dtype, bf16 included)."""
    if not tensor.is_contiguous() or tensor.device.type != "cpu":
        raise ValueError("byte_view needs a contiguous CPU tensor (a copy would swallow the reads)")
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def pread_exact(fd: int, dest: memoryview, offset: int) -> int:
    """Fill `dest` from `fd` at `offset` (preadv until done or end of file); the bytes read."""
    done = 0
    while done < len(dest):
        n = os.preadv(fd, [dest[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


class ReadAccount:
    """Open files once, pread into caller memory, and count files and bytes for the load report."""

    def __init__(self) -> None:
        self._fds: dict[tuple[Path, int], int] = {}
        self.files: list[str] = []  # every file opened, in order
        self.bytes_read = 0
        self.bytes_mapped = 0  # --io mmap: mapped now, read by the kernel when first touched

    def open_fd(self, path: Path, flags: int = 0) -> int:
        """The file opened read-only (plus `flags`, e.g. O_DIRECT), once; closed by `close`."""
        fd = self._fds.get((path, flags))
        if fd is None:
            try:
                fd = open_regular(path, flags)
            except OSError as exc:
                raise ShardstateError(f"cannot open ({exc.strerror})", path, "check the file exists") from None
            self._fds[path, flags] = fd
            if str(path) not in self.files:
                self.files.append(str(path))
        return fd

    def note_header(self, path: Path, nbytes: int) -> None:
        """Count a header read elsewhere (format.read_header) against this file."""
        self.open_fd(path)
        self.bytes_read += nbytes

    def read_into(self, path: Path, offset: int, dest: memoryview) -> None:
        """Fill `dest` from `path` at `offset` exactly; a short file is an error, not zeros."""
        done = pread_exact(self.open_fd(path), dest, offset)
        if done < len(dest):
            raise ShardstateError(
                f"file ends before byte {offset + len(dest)}", path, "the file is truncated: re-create it"
            )
        self.bytes_read += done

    def read_tensor(self, path: Path, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        tensor = torch.empty(shape, dtype=dtype)
        self.read_into(path, offset, byte_view(tensor))
        return tensor

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> ReadAccount:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

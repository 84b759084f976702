"""Reading into preallocated tensors through the storage protocol (io/storage.py), with an account of
files opened and bytes read."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from shardstate.errors import ShardstateError
from shardstate.io.s3 import RemoteFiles
from shardstate.io.storage import FetchReport, FileReader, LocalFile


class Arrivals:
    """Bytes this process has read into memory so far, counted as they land: what a rank's heartbeat
    reports while it loads (parallel/peers.py)."""

    total = 0
    lock = threading.Lock()

    @classmethod
    def add(cls, nbytes: int) -> None:
        with cls.lock:
            cls.total += nbytes

    @classmethod
    def so_far(cls) -> int:
        return cls.total


def byte_view(tensor: torch.Tensor) -> memoryview:
    """A writable memoryview of a contiguous CPU tensor's bytes (any dtype, bf16 included)."""
    if not tensor.is_contiguous() or tensor.device.type != "cpu":
        raise ValueError("byte_view needs a contiguous CPU tensor (a copy would swallow the reads)")
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


class ReadAccount:
    """Open files once (a local file, or an object where `remote` holds the path), read into caller
    memory, and count files and bytes for the load report."""

    def __init__(self, remote: RemoteFiles | None = None) -> None:
        self.remote = remote
        self.fetch_report = FetchReport()  # filled by a load from object storage
        self._readers: dict[tuple[Path, int], FileReader] = {}
        self.files: list[str] = []  # every file opened, in order
        self.bytes_read = 0
        self.bytes_mapped = 0  # --io mmap: mapped now, read by the kernel when first touched
        self.unverified = 0  # --verify: tensors no digest could be checked for (read only in part)

    def use_remote(self, remote: RemoteFiles) -> None:
        """From now on the files `remote` holds are read from object storage (even one opened here before)."""
        for key in [key for key in self._readers if remote.holds(key[0])]:
            self._readers.pop(key).close()
        self.remote = remote

    def reader(self, path: Path, flags: int = 0) -> FileReader:
        """The file opened for reading (plus `flags`, e.g. O_DIRECT, for a local one), once; closed by
        `close`."""
        reader = self._readers.get((path, flags))
        if reader is None:
            if self.remote is not None and self.remote.holds(path):
                reader = self.remote.open(path)
            else:
                try:
                    reader = LocalFile(path, flags)
                except OSError as exc:
                    raise ShardstateError(f"cannot read ({exc.strerror})", path,
                                          "check the path and permissions") from None
            self._readers[path, flags] = reader
            if str(path) not in self.files:
                self.files.append(str(path))
        return reader

    def sizes(self, paths: list[Path]) -> dict[str, int]:
        """Each file's size, by name."""
        return {path.name: self.reader(path).size for path in paths}

    def open_fd(self, path: Path) -> int:
        """A local file's descriptor (for mapping it)."""
        reader = self.reader(path)
        if not isinstance(reader, LocalFile):
            raise ValueError(f"{path} is not a local file")
        return reader.fd

    def note_header(self, path: Path, nbytes: int) -> None:
        """Count a header read elsewhere (format.read_header) against this file."""
        self.reader(path)
        self.bytes_read += nbytes

    def read_into(self, path: Path, offset: int, dest: memoryview) -> None:
        """Fill `dest` from `path` at `offset` exactly; a short file is an error, not zeros."""
        done = self.reader(path).read_into(offset, dest)
        Arrivals.add(done)
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
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()

    def __enter__(self) -> ReadAccount:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

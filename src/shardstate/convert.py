"""HF checkpoint -> sharded state, offline in one process: each source tensor is read once and its
slices are written (pwrite) straight to their final offsets in every rank's files."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from shardstate.config import load_config
from shardstate.errors import ShardstateError
from shardstate.format.checkpoint import INDEX_NAME, PICKLE_SUFFIXES
from shardstate.format.manifest import MANIFEST_NAME, PP1_PATTERN, Manifest, file_crc32, write_manifest
from shardstate.format.safetensors_header import DTYPE_NAMES
from shardstate.format.safetensors_writer import OutTensor, layout, split_into_parts
from shardstate.io.reader import ReadAccount, byte_view
from shardstate.loaders.base import open_checked
from shardstate.models import build_on_meta
from shardstate.runtime.distributed import TPGroup
from shardstate.runtime.worker import resolve_dtype
from shardstate.spec import ShardSpec

VLLM_SCALES = ("_q_scale", "_k_scale", "_v_scale", "_prob_scale")  # F32 1.0 scalars vLLM's files carry


@dataclass(frozen=True)
class ConvertReport:
    seconds: float
    bytes_read: int
    bytes_written: int
    files: list[str]


def vllm_scale_names(num_layers: int) -> list[str]:
    return [f"model.layers.{n}.self_attn.attn.{s}" for n in range(num_layers) for s in VLLM_SCALES]


def global_shape(spec: ShardSpec) -> list[int]:
    first = spec.parts[0].shape
    return [sum(p.shape[0] for p in spec.parts), *first[1:]]


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def copy_side_files(src: Path, dst: Path) -> None:
    """Config, generation config, tokenizer files...: everything but weights, indexes and manifests."""
    skip_suffixes = (".safetensors", *PICKLE_SUFFIXES)
    for path in src.iterdir():
        if path.is_file() and not path.name.endswith(skip_suffixes) and path.name not in (INDEX_NAME, MANIFEST_NAME):
            shutil.copy2(path, dst / path.name)


def convert(
    src: str | Path,
    out: str | Path,
    tp_size: int,
    dtype: str | None = None,
    max_part_bytes: int = 5 << 30,
    force: bool = False,
) -> ConvertReport:
    start = time.perf_counter()
    src, out = Path(src), Path(out)
    config = load_config(src)
    config.check_tp_size(tp_size)
    if (src / MANIFEST_NAME).exists():
        raise ShardstateError(
            "SRC is a sharded state; resharding is not built yet", src, "convert from the HF checkpoint"
        )
    if out.exists() and not force:
        raise ShardstateError("output exists", out, "pass --force to replace it")
    torch_dtype = resolve_dtype(dtype, config, src)
    specs = build_on_meta(config, TPGroup(0, tp_size), torch_dtype).shard_specs()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fds: dict[str, int] = {}
    try:
        with ReadAccount() as account:
            checkpoint = open_checked(specs, src, account)
            manifest = Manifest(
                tp_size, config.architecture, config.fingerprint, DTYPE_NAMES[torch_dtype],
                [{"name": h.path.name, "size": h.path.stat().st_size} for h in checkpoint.headers],
            )
            params = [OutTensor(n, torch_dtype, s.local_shape()) for n, s in specs.items()]
            scales = [OutTensor(n, torch.float32, ()) for n in vllm_scale_names(config.num_hidden_layers)]
            where: dict[tuple[int, str], tuple[int, int]] = {}  # (rank, tensor) -> (fd, offset)
            for rank in range(tp_size):
                manifest.tensors[str(rank)] = {}
                for part, tensors in enumerate(split_into_parts(params + scales, max_part_bytes)):
                    name = PP1_PATTERN.format(rank=rank, part=part)
                    plan = layout(tensors)
                    fd = fds[name] = os.open(tmp / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                    os.ftruncate(fd, plan.size)  # unwritten bytes (vocab padding) read as zeros
                    _write_all(fd, memoryview(plan.header), 0)
                    manifest.files[name] = {"rank": rank, "part": part, "size": plan.size}
                    for t in tensors:
                        where[rank, t.name] = (fd, plan.offsets[t.name])
                        spec = specs.get(t.name)
                        manifest.tensors[str(rank)][t.name] = {
                            "file": name, "dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                            "global_shape": global_shape(spec) if spec else [],
                            "spec": dataclasses.asdict(spec) if spec else {"kind": "constant", "value": 1.0},
                        }
            one = byte_view(torch.ones((), dtype=torch.float32))
            for rank in range(tp_size):
                for t in scales:
                    fd, offset = where[rank, t.name]
                    _write_all(fd, one, offset)
            users: dict[str, list] = {}
            for rank in range(tp_size):
                for name, spec in specs.items():
                    row_bytes = torch.Size(spec.local_shape()[1:]).numel() * torch_dtype.itemsize
                    fd, offset = where[rank, name]
                    for copy in spec.copies(rank):
                        users.setdefault(copy.source, []).append((copy, fd, offset + copy.dst_row * row_bytes))
            for header in checkpoint.headers:  # file order: sequential reads, one tensor in memory at a time
                for source, entry in header.tensors.items():
                    if source not in users:
                        continue
                    whole = account.read_tensor(header.path, entry.begin, entry.dtype, entry.shape)
                    for copy, fd, offset in users[source]:
                        piece = whole.narrow(copy.dim, copy.start, copy.stop - copy.start)
                        _write_all(fd, byte_view(piece.to(torch_dtype).contiguous()), offset)
            bytes_read = account.bytes_read
        for name, fd in fds.items():
            os.fsync(fd)
            os.close(fd)
            manifest.files[name]["crc32"] = file_crc32(tmp / name)
        fds.clear()
        copy_side_files(src, tmp)
        write_manifest(tmp, manifest)  # last: its presence says the directory is complete
        _swap_into_place(tmp, out)
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    written = sum(f["size"] for f in manifest.files.values())
    return ConvertReport(time.perf_counter() - start, bytes_read, written, sorted(manifest.files))


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished directory to OUT; an existing OUT (--force) is moved aside first and removed
    only after the new one is in place."""
    dir_fd = os.open(tmp, os.O_RDONLY)
    os.fsync(dir_fd)
    os.close(dir_fd)
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)

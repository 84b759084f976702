"""HF checkpoint (or a sharded state at another TP size) -> sharded state, offline in one process on CPU.

Parameters are produced in the model's order: each one's source tensors are read whole, once (or merged
from every saved rank when resharding), and every
rank's slice of it is appended to that rank's current part file. Every output file is written front to
back (large buffered writes, checksum on the fly), and memory holds one parameter's sources at a time."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from shardstate.config import load_config
from shardstate.dtypes import resolve_dtype
from shardstate.errors import ShardstateError
from shardstate.format.checkpoint import INDEX_NAME, PICKLE_SUFFIXES
from shardstate.format.manifest import MANIFEST_NAME, PP1_PATTERN, Manifest, write_manifest
from shardstate.format.safetensors_header import DTYPE_NAMES
from shardstate.format.safetensors_writer import OutTensor, RankWriter, split_into_parts
from shardstate.io.reader import ReadAccount
from shardstate.models import build_on_meta
from shardstate.runtime.distributed import TPGroup
from shardstate.sources import CheckpointSource, ShardedSource, TensorSource
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


def copy_side_files(src: Path, dst: Path) -> None:
    """Config, generation config, tokenizer files...: everything but weights, indexes and manifests."""
    skip_suffixes = (".safetensors", *PICKLE_SUFFIXES)
    for path in src.iterdir():
        if path.is_file() and not path.name.endswith(skip_suffixes) and path.name not in (INDEX_NAME, MANIFEST_NAME):
            shutil.copy2(path, dst / path.name)


@contextlib.contextmanager
def staged_output(out: Path, force: bool) -> Iterator[Path]:
    """A temporary sibling of OUT to write into. On success it is fsynced and renamed to OUT (an existing
    OUT, allowed by `force`, is moved aside first and removed after); on any error it is removed."""
    if out.exists() and not force:
        raise ShardstateError("output exists", out, "pass --force to replace it")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        dir_fd = os.open(tmp, os.O_RDONLY)
        os.fsync(dir_fd)
        os.close(dir_fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


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
    torch_dtype = resolve_dtype(dtype, config, src)
    specs = build_on_meta(config, TPGroup(0, tp_size), torch_dtype).shard_specs()
    scales = [OutTensor(n, torch.float32, ()) for n in vllm_scale_names(config.num_hidden_layers)]
    parts = split_into_parts([OutTensor(n, torch_dtype, s.local_shape()) for n, s in specs.items()] + scales,
                             max_part_bytes)
    with staged_output(out, force) as tmp, ReadAccount() as account:
        source: TensorSource = (
            ShardedSource(src, config, account) if (src / MANIFEST_NAME).is_file()
            else CheckpointSource(src, specs, account)
        )
        writers = [RankWriter(tmp, rank, parts, PP1_PATTERN) for rank in range(tp_size)]
        try:
            for name, spec in specs.items():
                sources = source.tensors_for(name, spec)
                for rank, writer in enumerate(writers):
                    writer.write(name, spec.take(rank, sources, torch_dtype))
            one = torch.ones((), dtype=torch.float32)
            for writer in writers:
                for scale in scales:
                    writer.write(scale.name, one)
                writer.close()
        finally:
            for writer in writers:
                writer.abort()
        manifest = Manifest(
            tp_size, config.architecture, config.fingerprint, DTYPE_NAMES[torch_dtype],
            [{"name": f.name, "size": f.stat().st_size} for f in source.files],
        )
        for rank, writer in enumerate(writers):
            manifest.files.update(writer.files)
            manifest.tensors[str(rank)] = {
                t.name: tensor_record(PP1_PATTERN.format(rank=rank, part=n), t, specs.get(t.name))
                for n, tensors in enumerate(parts)
                for t in tensors
            }
        copy_side_files(src, tmp)
        write_manifest(tmp, manifest)  # last: its presence says the directory is complete
    written = sum(f["size"] for f in manifest.files.values())
    return ConvertReport(time.perf_counter() - start, account.bytes_read, written, sorted(manifest.files))


def tensor_record(file: str, tensor: OutTensor, spec: ShardSpec | None) -> dict:
    """A tensor's manifest entry; `spec` None marks vLLM's constant scales."""
    return {
        "file": file,
        "dtype": DTYPE_NAMES[tensor.dtype],
        "shape": list(tensor.shape),
        "global_shape": global_shape(spec) if spec else [],
        "spec": dataclasses.asdict(spec) if spec else {"kind": "constant", "value": 1.0},
    }

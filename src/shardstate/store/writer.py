"""Writing a sharded-state directory, shared by `convert` (one process, every rank) and `save` (each
live worker its own rank): the plan of parts, the staged temporary directory, and the manifest last."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from shardstate.config import ModelConfig
from shardstate.errors import failing_as
from shardstate.format.checkpoint import INDEX_NAME, PICKLE_SUFFIXES
from shardstate.format.config_json import CONFIG_NAME
from shardstate.format.manifest import (
    MANIFEST_NAME,
    PENDING_STATE_ID,
    PP1_PATTERN,
    PP_PATTERN,
    QUANT_SCALES,
    Manifest,
    check_pattern,
    constant_spec,
    file_name,
    is_plain_name,
    rank_file_metadata,
    stage_pattern,
    state_id_of,
    write_manifest,
)
from shardstate.format.safetensors_header import DTYPE_NAMES
from shardstate.format.safetensors_writer import WRITE_TODO, OutTensor, RankWriter, split_into_parts
from shardstate.format.sharded_state import ShardedState, vllm_scale_names
from shardstate.format.strict_json import loads_strict
from shardstate.io.crc32 import crc32, crc32_combine
from shardstate.io.files import open_regular
from shardstate.quant.vllm import declares_quantization, kv_placeholders
from shardstate.spec import ShardSpec, spec_to_json

COPY_BLOCK = 1 << 20


@dataclass(frozen=True)
class StatePlan:
    """Which tensors each rank's files hold, in which order and which part (the same for every rank of a
    pipeline stage; at PP>1 each stage has its own plan)."""

    specs: dict[str, ShardSpec]
    dtype: torch.dtype  # the model's compute dtype (the manifest's `dtype`)
    parts: list[list[OutTensor]]
    constants: dict[str, tuple[OutTensor, float]]  # tensors vLLM's loader needs, each filled with a value
    config_json: bytes  # OUT's config.json (the source's, or with what vLLM needs for a quantized state)
    pattern: str
    quantization: str | None = None  # the method quantized weights were made with
    pp_size: int = 1

    @classmethod
    def make(
        cls, params: dict[str, torch.Tensor], dtype: torch.dtype, num_layers: int, max_part_bytes: int,
        config_json: bytes, pattern: str | None = None, quantization: str | None = None,
        layers: range | None = None, pp_size: int = 1,
    ) -> StatePlan:
        """`params`: a rank's parameters by name (live, or on the meta device), each carrying its `.spec`;
        each is written in its own dtype. A `config_json` with a quantization_config (`--for-vllm`) adds
        the KV-cache placeholders vLLM then expects. At PP>1, `layers` are the stage's (vLLM's scalars
        are written for those only) and `pattern` defaults to vLLM's PP pattern."""
        held = range(num_layers) if layers is None else layers

        def here(name: str) -> bool:  # model.layers.N...: a constant of one of the stage's layers
            return int(name.split(".")[2]) in held

        constants = {n: (OutTensor(n, torch.float32, ()), 1.0) for n in vllm_scale_names(num_layers) if here(n)}
        if declares_quantization(loads_strict(config_json)):
            constants |= {n: (OutTensor(n, t, (1,)), v) for n, t, v in kv_placeholders(num_layers, dtype) if here(n)}
        tensors = [OutTensor(n, p.dtype, p.spec.local_shape()) for n, p in params.items()]
        parts = split_into_parts(tensors + [t for t, _ in constants.values()], max_part_bytes)
        specs = {n: p.spec for n, p in params.items()}
        pattern = pattern or (PP1_PATTERN if pp_size == 1 else PP_PATTERN)
        return cls(specs, dtype, parts, constants, config_json, check_pattern(pattern, pp_size), quantization,
                   pp_size)

    @property
    def tp_size(self) -> int:
        return next(iter(self.specs.values())).tp_size

    def writer(self, directory: Path, rank: int) -> RankWriter:
        """World rank `rank`'s writer; its files say PENDING_STATE_ID until complete_state stamps the state's id."""
        return RankWriter(directory, rank, self.parts, stage_pattern(self.pattern, rank, self.tp_size),
                          lambda part: rank_file_metadata(PENDING_STATE_ID, rank, self.tp_size, part, self.pp_size))

    def finish(self, writer: RankWriter) -> None:
        """Write the constants (after the parameters, as planned) and close the rank's last part."""
        for tensor, value in self.constants.values():
            writer.write(tensor.name, torch.full(tensor.shape, value, dtype=tensor.dtype))
        writer.close()

    def tensor_records(self, rank: int, digests: dict[str, str]) -> dict[str, dict]:
        """The manifest's entries for one rank's tensors (with the digests its writer computed); constants are
        marked as such, with their value."""
        records = {}
        for part, tensors in enumerate(self.parts):
            for t in tensors:
                spec = self.specs.get(t.name)
                records[t.name] = {
                    "file": file_name(self.pattern, rank, part, self.tp_size),
                    "dtype": DTYPE_NAMES[t.dtype],
                    "shape": list(t.shape),
                    "global_shape": list(spec.global_shape()) if spec else list(t.shape),
                    "spec": spec_to_json(spec) if spec else constant_spec(self.constants[t.name][1]),
                    "xxh3_64": digests[t.name],
                }
        return records


def complete_state(
    directory: Path, src: Path, config: ModelConfig, plan: StatePlan | list[StatePlan], written: list[dict],
    source: list[dict],
) -> Manifest:
    """Copy SRC's side files (config.json as the plan has it), stamp every rank file with the state's id
    (format/manifest.py: state_id_of), then write the manifest (last: its presence says the directory is
    whole). `plan`: the plan, or at PP>1 each stage's; `written` holds each rank's RankWriter.result(), in
    world rank order; `source` is source_records()."""
    plans = plan if isinstance(plan, list) else [plan]
    plan, tp_size = plans[0], plans[0].tp_size
    files = {name: record for rank in written for name, record in rank["files"].items()}
    if len(plans) > 1:  # a PP file's record says its stage and TP rank too
        files = {name: {**r, "pp": r["rank"] // tp_size, "tp": r["rank"] % tp_size} for name, r in files.items()}
    side_files = sorted(p.name for p in src.iterdir() if is_side_file(p))
    for name in side_files:
        if name != CONFIG_NAME:
            copy_file(src / name, directory / name)
    write_file(directory / CONFIG_NAME, [plan.config_json])
    manifest = Manifest(
        PENDING_STATE_ID, tp_size, config.architecture, hashlib.sha256(plan.config_json).hexdigest(),
        DTYPE_NAMES[plan.dtype],
        source, side_files,
        files=files,
        tensors={str(rank): plans[rank // tp_size].tensor_records(rank, w["digests"])
                 for rank, w in enumerate(written)},
        pp_size=len(plans),
        pattern=plan.pattern,
        quantization=None if plan.quantization is None else {"method": plan.quantization, "scales": QUANT_SCALES},
    )
    manifest.state_id = state_id_of(manifest)
    for name, record in manifest.files.items():
        record["crc32"] = stamp_state_id(directory / name, manifest.state_id, record["crc32"], record["size"])
    write_manifest(directory, manifest)
    return manifest


def source_records(state: ShardedState | None, sizes: dict[str, int]) -> list[dict]:
    """The manifest's `source`: the checkpoint's files and sizes (`sizes`: those read). A state made from
    a sharded state (a reshard, a `save` after loading one) keeps that state's `source`, so that the same
    checkpoint at the same layout is the same state (the same id and bytes) whatever path made it."""
    if state is not None and state.manifest is not None:
        return state.manifest.source
    return [{"name": name, "size": size} for name, size in sizes.items()]


def stamp_state_id(path: Path, state_id: str, crc: int, size: int) -> int:
    """Replace PENDING_STATE_ID in the metadata of a rank file written by StatePlan.writer (the first
    entry of its header) with `state_id`, in place; return the file's crc32 after, from `crc` (of the
    `size` bytes before) without reading the data: the headers have the same length, so the crc32s of the
    whole files differ by their headers' difference carried across the data (io/crc32.py)."""
    pending, stamped = (f'"state":"{i}"'.encode() for i in (PENDING_STATE_ID, state_id))
    with failing_as("cannot write", path, WRITE_TODO), open(path, "r+b") as f:
        length = int.from_bytes(f.read(8), "little")
        old = f.read(min(length, size))
        new = old.replace(pending, stamped, 1)
        if len(old) != length or new == old:
            raise RuntimeError(f"{path.name}: no pending state id in its header")
        f.seek(8)
        f.write(new)
        f.flush()
        os.fsync(f.fileno())
    return crc32_combine(crc32(old) ^ crc32(new), crc, size - 8 - length)


def is_side_file(path: Path) -> bool:
    """config, generation config, tokenizer files...: every visible file but weights, indexes and a manifest."""
    return (path.is_file() and is_plain_name(path.name) and not path.name.endswith((".safetensors", *PICKLE_SUFFIXES))
            and path.name not in (INDEX_NAME, MANIFEST_NAME))


def copy_file(src: Path, dst: Path) -> None:
    """Copy one side file; a failure names the file it is about: the source when reading, the
    destination when writing (a full disk)."""
    with failing_as("cannot read", src, "check the file; nothing was published"):
        fd = open_regular(src)
    with os.fdopen(fd, "rb") as source:
        write_file(dst, _blocks(source, src))


def _blocks(source: BinaryIO, path: Path) -> Iterator[bytes]:
    while True:
        with failing_as("cannot read", path, "check the file; nothing was published"):
            block = source.read(COPY_BLOCK)
        if not block:
            return
        yield block


def write_file(dst: Path, blocks: Iterable[bytes]) -> None:
    """A new file (never replacing one), synced to disk."""
    with failing_as("cannot write", dst, WRITE_TODO):
        target = open(dst, "xb")  # noqa: SIM115 (closed below)
    with target:
        for block in blocks:
            with failing_as("cannot write", dst, WRITE_TODO):
                target.write(block)
        with failing_as("cannot write", dst, WRITE_TODO):
            target.flush()
            os.fsync(target.fileno())

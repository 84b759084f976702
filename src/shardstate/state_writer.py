"""Writing a sharded-state directory, shared by `convert` (one process, every rank) and `save` (each
live worker its own rank): the plan of parts, the staged temporary directory, and the manifest last."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from shardstate.config import ModelConfig
from shardstate.errors import ShardstateError
from shardstate.format.checkpoint import INDEX_NAME, PICKLE_SUFFIXES
from shardstate.format.manifest import MANIFEST_NAME, PP1_PATTERN, Manifest, write_manifest
from shardstate.format.safetensors_header import DTYPE_NAMES
from shardstate.format.safetensors_writer import OutTensor, RankWriter, split_into_parts
from shardstate.format.sharded_state import vllm_scale_names
from shardstate.fsops import fsync_dir, publish
from shardstate.spec import ShardSpec


def check_pattern(pattern: str) -> str:
    """A file-name pattern with {rank} and {part} that stays inside the directory."""
    try:
        name = pattern.format(rank=0, part=0)
    except (KeyError, IndexError, ValueError):
        name = ""
    if "{rank}" not in pattern or "{part}" not in pattern or Path(name).name != name or name.startswith("."):
        raise ShardstateError(
            f"file-name pattern {pattern!r} is not usable", None,
            f"use one with {{rank}} and {{part}} and no directory, like {PP1_PATTERN!r}",
        )
    if not name.endswith(".safetensors"):
        raise ShardstateError(f"file-name pattern {pattern!r} does not end in .safetensors", None, "add it")
    return pattern


@dataclass(frozen=True)
class StatePlan:
    """Which tensors each rank's files hold, in which order and which part (the same for every rank)."""

    specs: dict[str, ShardSpec]
    dtype: torch.dtype
    parts: list[list[OutTensor]]
    scales: list[OutTensor]
    pattern: str

    @classmethod
    def make(
        cls, specs: dict[str, ShardSpec], dtype: torch.dtype, num_layers: int, max_part_bytes: int,
        pattern: str = PP1_PATTERN,
    ) -> StatePlan:
        scales = [OutTensor(n, torch.float32, ()) for n in vllm_scale_names(num_layers)]
        params = [OutTensor(n, dtype, s.local_shape()) for n, s in specs.items()]
        return cls(specs, dtype, split_into_parts(params + scales, max_part_bytes), scales, check_pattern(pattern))

    def writer(self, directory: Path, rank: int) -> RankWriter:
        return RankWriter(directory, rank, self.parts, self.pattern)

    def finish(self, writer: RankWriter) -> None:
        """Write the constant scales (after the parameters, as planned) and close the rank's last part."""
        one = torch.ones((), dtype=torch.float32)
        for scale in self.scales:
            writer.write(scale.name, one)
        writer.close()

    def tensor_records(self, rank: int, digests: dict[str, str]) -> dict[str, dict]:
        """The manifest's entries for one rank's tensors (with the digests its writer computed); scales are
        marked constant."""
        records = {}
        for part, tensors in enumerate(self.parts):
            for t in tensors:
                spec = self.specs.get(t.name)
                records[t.name] = {
                    "file": self.pattern.format(rank=rank, part=part),
                    "dtype": DTYPE_NAMES[t.dtype],
                    "shape": list(t.shape),
                    "global_shape": [sum(p.shape[0] for p in spec.parts), *spec.parts[0].shape[1:]] if spec else [],
                    "spec": dataclasses.asdict(spec) if spec else {"kind": "constant", "value": 1.0},
                    "xxh3_64": digests[t.name],
                }
        return records


def remove_stale_temporaries(out: Path) -> None:
    """Temporary siblings of OUT left by writers that were killed (their pid no longer runs)."""
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:
            pass  # someone else's live process


@contextlib.contextmanager
def staged_output(out: Path, force: bool) -> Iterator[Path]:
    """A temporary sibling of OUT to write into. On success it is fsynced and published atomically
    (fsops.publish: OUT is never half-written, and with `force` never missing); on any error it is
    removed, and a write error (full disk, file too large) becomes one clear ShardstateError."""
    if out.exists() and not force:
        raise ShardstateError("output exists", out, "pass --force to replace it")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    remove_stale_temporaries(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        fsync_dir(tmp)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ShardstateError(f"cannot write ({exc.strerror})", exc.filename or tmp,
                              "check free space, file-size limits and permissions; nothing was published") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, out, replace=force)


def complete_state(
    directory: Path, src: Path, config: ModelConfig, plan: StatePlan, written: list[dict], source_files: list[Path],
) -> Manifest:
    """Copy SRC's side files, then write the manifest (last: its presence says the directory is whole).
    `written` holds each rank's RankWriter.result(), in rank order."""
    manifest = Manifest(
        len(written), config.architecture, config.fingerprint, DTYPE_NAMES[plan.dtype],
        [{"name": f.name, "size": f.stat().st_size} for f in source_files],
        files={name: record for rank in written for name, record in rank["files"].items()},
        tensors={str(rank): plan.tensor_records(rank, w["digests"]) for rank, w in enumerate(written)},
        pattern=plan.pattern,
    )
    skip_suffixes = (".safetensors", *PICKLE_SUFFIXES)
    for path in src.iterdir():  # config, generation config, tokenizer files...: all but weights and indexes
        if path.is_file() and not path.name.endswith(skip_suffixes) and path.name not in (INDEX_NAME, MANIFEST_NAME):
            shutil.copy2(path, directory / path.name)
    write_manifest(directory, manifest)
    return manifest

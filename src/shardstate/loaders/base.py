"""What every loader shares: the rank's target parameters, the checks of a checkpoint against the
specs before any weight is read, and the load report."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from shardstate.errors import ShardstateError
from shardstate.format.checkpoint import Checkpoint, TensorLocation, open_checkpoint
from shardstate.io.arena import Scratch
from shardstate.io.engine import Span, read_spans
from shardstate.io.reader import ReadAccount
from shardstate.spec import Copy, ShardSpec

# Tensors some checkpoints carry that the model recomputes or shares; read by `default`, never used.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class LoadReport:
    rank: int
    seconds: float
    bytes_read: int
    files: list[str]
    bytes_mapped: int = 0  # --io mmap: mapped, paged in on first use
    peak_rss: int = 0  # bytes, this rank's process after loading
    bytes_fetched: int = 0  # an s3:// state: bytes this rank downloaded into the node cache
    fetched_files: list[str] = field(default_factory=list)  # ...the files it downloaded
    cached_files: list[str] = field(default_factory=list)  # ...and those the cache held (checked)
    fetch_seconds: float = 0.0  # included in `seconds`
    resharded_from: int | None = None  # a state saved at this TP size, resharded while loading
    unverified_tensors: int = 0  # --verify on a reshard: saved tensors read only in part (no digest to check)
    resharded_from_pp: int | None = None  # ...and at this PP size
    bytes_prefaulted: int = 0  # load memory faulted in while the worker started, before `seconds` began

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class IOOptions:
    mode: str = "read"  # read | mmap | direct (io/engine.py)
    threads: int = 1
    device: str = "cpu"  # where the sharded loader puts parameters (cuda:N reads through pinned buffers)
    verify: bool = False  # sharded: check every tensor's xxh3-64 against the manifest (while reading)
    memory: Scratch | None = None  # sharded, read on the CPU: the rank's load memory, reserved (io/arena.py)


@dataclass(frozen=True)
class LoadTarget:
    """The rank's parameters (materialised, uninitialised) and the specs that say how to fill them.
    Loaders fill them in place, or (sharded) rebind them to views of the memory they read into."""

    rank: int  # in the TP group (what the specs cut for)
    params: dict[str, nn.Parameter]
    specs: dict[str, ShardSpec]
    io: IOOptions = IOOptions()
    # a state saved at another layout: each saved stage's parameters on meta, with their specs (reshard)
    saved: list[dict[str, torch.Tensor]] | None = None
    world_rank: int | None = None  # PP>1: pp_rank * tp_size + rank, whose files a sharded state has; None: rank
    pp_size: int = 1
    elsewhere: frozenset[str] = frozenset()  # PP>1: checkpoint tensors only other stages use

    @classmethod
    def of(cls, model: nn.Module, rank: int, io: IOOptions | None = None,
           saved: list[dict[str, torch.Tensor]] | None = None) -> LoadTarget:
        group = getattr(model, "group", None)
        world_rank, pp_size, elsewhere = None, 1, frozenset()
        if group is not None and group.pp_size > 1:
            world_rank, pp_size = group.pp_rank * group.size + rank, group.pp_size
            mine = {source for spec in model.shard_specs().values() for source in spec.sources()}
            elsewhere = frozenset(model.checkpoint_sources() - mine)
        return cls(rank, dict(model.named_parameters()), model.shard_specs(), io or IOOptions(), saved,
                   world_rank, pp_size, elsewhere)

    @property
    def file_rank(self) -> int:
        """The rank whose files a sharded state at this layout holds for this process (its world rank)."""
        return self.rank if self.world_rank is None else self.world_rank

    @property
    def stage(self) -> int:
        return self.file_rank // self.tp_size

    @property
    def tp_size(self) -> int:
        return next(iter(self.specs.values())).tp_size

    def zero_padding_and_plan(self) -> list[tuple[torch.Tensor, Copy]]:
        """Zero every parameter with elements no copy fills (vocab padding); return every (destination
        view, copy) pair, which together fill all other elements."""
        result = []
        for name, spec in self.specs.items():
            param = self.params[name]
            if not spec.covers_all(self.rank):
                param.zero_()
            result.extend((c.dest(param), c) for c in spec.copies(self.rank))
        return result


def open_checked(specs: dict[str, ShardSpec], model_dir: Path, account: ReadAccount,
                 elsewhere: frozenset[str] = frozenset()) -> Checkpoint:
    """Open the checkpoint and refuse it, naming file and tensor, unless it has exactly the tensors the
    specs need with exactly the shapes they need (extra tensors only from IGNORED_SUFFIXES, a tied head, or
    `elsewhere`: those other pipeline stages load)."""
    checkpoint = open_checkpoint(model_dir, account)
    for header in checkpoint.headers:
        account.note_header(header.path, header.data_start)
    needed = {source: shape for s in specs.values() for source, shape in s.sources().items()}
    for source, shape in needed.items():
        location = checkpoint.tensors.get(source)
        if location is None:
            files = ", ".join(h.path.name for h in checkpoint.headers)
            raise ShardstateError(
                f"tensor '{source}' is missing (files: {files})", model_dir,
                "the weights do not match config.json; re-create the checkpoint",
            )
        entry = location.entry
        if entry.shape != shape:
            raise ShardstateError(
                f"tensor '{source}' has shape {list(entry.shape)} but config.json implies {list(shape)}",
                location.file, "the weights do not match config.json; fix one of them",
            )
        if not entry.dtype.is_floating_point:
            raise ShardstateError(
                f"tensor '{source}' has dtype {entry.dtype}, not a float", location.file,
                "quantized checkpoints are not supported yet",
            )
    tied_head = "lm_head.weight" if "lm_head.weight" not in needed else None
    for name, location in checkpoint.tensors.items():
        if name not in needed and name not in elsewhere and name != tied_head and not name.endswith(IGNORED_SUFFIXES):
            raise ShardstateError(
                f"unexpected tensor '{name}'", location.file,
                "the weights do not match config.json's architecture; check the checkpoint",
            )
    return checkpoint


def read_entries(locations: list[TensorLocation], account: ReadAccount, scratch: Scratch) -> list[torch.Tensor]:
    """The tensors at `locations`, read together into `scratch` (valid until its next use)."""
    spans = [Span(loc.file, loc.entry.begin, loc.entry.end) for loc in locations]
    raw = read_spans(spans, "read", account, scratch=scratch)
    return [data.view(loc.entry.dtype).view(loc.entry.shape) for data, loc in zip(raw, locations, strict=True)]

"""HF checkpoint (or a sharded state at another layout) -> sharded state at TP x PP, offline in one process on
CPU.

Parameters are produced in the model's order: each one's source tensors are read whole, once (or merged
from every saved rank when resharding), and every rank's slice of it is appended to that rank's current
part file. Every output file is written front to back (large buffered writes, checksum on the fly), and
memory holds one parameter's sources at a time. At PP>1 each stage's ranks get the parameters of that
stage's model (its layers, and the embedding, norm and head where vLLM keeps them)."""

from __future__ import annotations

import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from shardstate.errors import ShardstateError, failing_as
from shardstate.format.safetensors_header import DTYPE_NAMES
from shardstate.io.janitor import Janitor
from shardstate.io.reader import ReadAccount
from shardstate.io.s3 import is_s3
from shardstate.models import build_on_meta, open_model, quantize_after_load
from shardstate.parallel.distributed import TPGroup
from shardstate.parallel.pipeline import layout_name
from shardstate.progress import Progress
from shardstate.quant.methods import method_named
from shardstate.sources import CheckpointSource, QuantizingSource, ShardedSource, TensorSource
from shardstate.store.model_dir import fetch_every_rank
from shardstate.store.output import staged_output
from shardstate.store.remote import node_cache_root
from shardstate.store.upload import check_destination, upload_state
from shardstate.store.writer import StatePlan, complete_state, source_records


@dataclass(frozen=True)
class ConvertReport:
    seconds: float
    bytes_read: int
    bytes_written: int
    files: list[str]


def convert(
    src: str | Path,  # a local directory, or s3://bucket/prefix (a sharded state)
    out: str | Path,  # a new local directory, or an empty s3://bucket/prefix
    tp_size: int,
    dtype: str | None = None,
    max_part_bytes: int = 5 << 30,
    force: bool = False,
    show_progress: bool | None = None,
    quantize: str | None = None,
    for_vllm: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    pp_size: int = 1,
) -> ConvertReport:
    """`show_progress` None: a progress line on stderr when it is a terminal. `quantize`: write the linear
    weights quantized (quant/), as `save --quantize` does; a quantized SRC stays quantized. `for_vllm`: a
    quantized state also gets what vLLM's loader needs (quant/vllm.py). An s3:// OUT is written to a
    local staging directory (under the node cache, `cache_dir`), then uploaded as `shardstate upload` does;
    an s3:// SRC is fetched into that cache."""
    if is_s3(out):
        if force:
            raise ShardstateError("--force does not replace objects in object storage", None,
                                  "convert to a new prefix")
        cache = node_cache_root(cache_dir)
        check_destination(str(out))  # before the work, not after
        staging = cache / f".shardstate-convert-{secrets.token_hex(8)}"
        janitor = Janitor(directory=staging)  # removes it if this process is killed: started before it exists
        try:
            with failing_as("cannot create a staging directory", staging, "free space in the cache directory"):
                staging.mkdir()
            report = convert(src, staging / "state", tp_size, dtype, max_part_bytes, False, show_progress, quantize,
                             for_vllm, cache_dir, pp_size)
            upload_state(staging / "state", str(out))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            janitor.dismiss()
        return report
    start = time.perf_counter()
    out = Path(out)
    model = open_model(src, dtype, cache_dir)
    fetch_every_rank(model.directory)  # an s3:// SRC: a reshard reads every rank
    src = model.directory.path  # absolute; an s3:// SRC's node cache
    config, torch_dtype, state = model.config, model.dtype, model.directory.state
    config.check_tp_size(tp_size)
    stages = [TPGroup(0, tp_size, pp_rank=stage, pp_size=pp_size) for stage in range(pp_size)]
    quantize = quantize_after_load(model, quantize)
    if model.quantization is not None and torch_dtype != state.dtype:
        raise ShardstateError(f"the state is quantized; its other tensors stay {DTYPE_NAMES[state.dtype]}", src,
                              "convert without --dtype, or from the unquantized checkpoint")
    quantization = model.quantization or quantize
    config_json = model.state_config_json(quantization, for_vllm)
    stage_params = [dict(build_on_meta(config, group, torch_dtype, quantization).named_parameters())
                    for group in stages]
    plans = [StatePlan.make(params, torch_dtype, config.num_hidden_layers, max_part_bytes, config_json,
                            quantization=quantization, layers=group.stage_layers(config.num_hidden_layers),
                            pp_size=pp_size)
             for params, group in zip(stage_params, stages, strict=True)]
    with staged_output(out, src, force) as tmp, ReadAccount(model.directory.remote_weights()) as account:
        source: TensorSource = (
            CheckpointSource(src, model.specs(tp_size), account) if state is None else ShardedSource(model, account)
        )
        if quantize is not None:
            method = method_named(quantize)
            quantized = {n for params in stage_params for n, p in params.items() if p.dtype == method.dtype}
            source = QuantizingSource(source, method, torch_dtype, quantized)
        writers = [plans[rank // tp_size].writer(tmp, rank) for rank in range(tp_size * pp_size)]
        source_sizes = account.sizes(source.files)
        progress = Progress(f"convert to {layout_name(tp_size, pp_size)}", sum(source_sizes.values()), show_progress)
        try:
            for stage, params in enumerate(stage_params):
                for name, param in params.items():
                    sources = source.tensors_for(name, param.spec)
                    for rank in range(tp_size):
                        writers[stage * tp_size + rank].write(name, param.spec.take(rank, sources, param.dtype))
                    progress.update(account.bytes_read)
            for rank, writer in enumerate(writers):
                plans[rank // tp_size].finish(writer)
        finally:
            progress.close()
            for writer in writers:
                writer.abort()
        manifest = complete_state(tmp, src, config, plans, [w.result() for w in writers],
                                  source_records(state, source_sizes))
    written = sum(f["size"] for f in manifest.files.values())
    return ConvertReport(time.perf_counter() - start, account.bytes_read, written, sorted(manifest.files))

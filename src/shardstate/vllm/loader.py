"""vLLM's `shardstate` load format (imported by the plugin, inside vLLM's processes only).

Three paths, named in one log line per rank:
- `state`: the given sharded state (local or s3://), each rank reading its own files into vLLM's parameters;
- hit: a complete cache entry for this exact configuration (vllm/key.py), read the same way;
- miss: vLLM's default loader, then, before post-processing (whose kernel layouts do not load back), each
  rank's parameters written into a new entry (vllm/fill.py). A damaged entry is a miss that rebuilds it.
Everything runs inside vLLM's own `load_model`, whose post-processing follows unchanged."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from torch import nn
from vllm import __version__ as vllm_version
from vllm.config import ModelConfig, VllmConfig, get_current_vllm_config
from vllm.config.load import LoadConfig
from vllm.distributed import get_pp_group, get_tp_group
from vllm.logger import init_logger
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.model_executor.model_loader.sharded_state_loader import ShardedStateLoader

from shardstate.errors import ShardstateError
from shardstate.format.config_json import read_config_json
from shardstate.format.manifest import FORMAT_VERSION
from shardstate.format.safetensors_header import DTYPE_NAMES
from shardstate.format.sharded_state import open_sharded_state
from shardstate.models import build_on_meta, parse_config
from shardstate.parallel.distributed import TPGroup
from shardstate.spec import ShardSpec
from shardstate.store.cache import CacheEntry, entry_name, touch
from shardstate.store.model_dir import open_model_dir
from shardstate.vllm.fill import Checkpoint, fill_entry
from shardstate.vllm.key import key_fields
from shardstate.vllm.options import LoaderOptions, parse_options
from shardstate.vllm.ranks import Ranks
from shardstate.vllm.state_reader import ReadReport, read_rank

logger = init_logger("vllm.shardstate")  # under "vllm": vLLM's handlers print it


class ShardstateModelLoader(BaseModelLoader):
    def __init__(self, load_config: LoadConfig) -> None:
        super().__init__(load_config)
        try:
            self.options: LoaderOptions = parse_options(load_config.model_loader_extra_config)
        except ShardstateError as exc:
            raise ValueError(f"error: {exc}") from None
        plain = copy.copy(load_config)
        plain.load_format, plain.model_loader_extra_config = "auto", {}
        self.default = DefaultModelLoader(plain)
        self._vllm_config: VllmConfig | None = None

    def download_model(self, model_config: ModelConfig) -> None:
        if self.options.state is None:
            self.default.download_model(model_config)

    def load_model(self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str = "") -> nn.Module:
        self._vllm_config = vllm_config  # the whole configuration, for the cache key
        return super().load_model(vllm_config, model_config, prefix)

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        params = ShardedStateLoader._filter_subtensors(model.state_dict())  # vLLM's own choice among aliases
        tp = get_tp_group()
        ranks = Ranks(tp.rank_in_group, tp.world_size, tp.cpu_group)
        try:
            if self.options.state is not None:
                self._load_state(params, ranks, model_config)
            elif self.options.cache == "off":
                self.default.load_weights(model, model_config)
            elif get_pp_group().world_size > 1:
                logger.warning("shardstate: the cache does not handle pipeline parallelism yet; loading the "
                               "default way, nothing cached")
                self.default.load_weights(model, model_config)
            else:
                self._load_cached(model, params, ranks, model_config)
        except ShardstateError as exc:
            raise ValueError(f"error: {exc}") from None

    def _load_state(self, params: dict[str, torch.Tensor], ranks: Ranks, model_config: ModelConfig) -> None:
        directory = open_model_dir(self.options.state)
        with directory.errors_named():
            state = directory.state
            if state is None or state.manifest is None:
                raise ShardstateError("is not a sharded state written by shardstate (no shardstate.json)",
                                      directory.path, "give the output of `shardstate convert` or `save`")
            if state.tp_size != ranks.size:
                raise ShardstateError(
                    f"saved for TP={state.tp_size}, running TP={ranks.size}", directory.path,
                    f"run with -tp {state.tp_size}, or `shardstate convert {self.options.state} OUT --tp "
                    f"{ranks.size}`")
            architecture = _architecture(model_config)
            if state.manifest.architecture != architecture:
                raise ShardstateError(f"holds {state.manifest.architecture}, the model is {architecture}",
                                      directory.path, "give the state of this model")
            report = read_rank(state, ranks.rank, params, self.options.verify, directory.remote)
        _log("state", self.options.state, ranks.rank, report)

    def _load_cached(self, model: nn.Module, params: dict[str, torch.Tensor], ranks: Ranks,
                     model_config: ModelConfig) -> None:
        directory = _model_dir(model_config)
        fields = self._key_fields(directory, model_config, ranks) if directory is not None else None
        if fields is None:
            logger.warning("shardstate: %s is not a local directory; loading the default way, nothing cached",
                           model_config.model)
            self.default.load_weights(model, model_config)
            return
        root = self.options.cache_root
        if root.resolve().is_relative_to(directory.resolve()):
            raise ShardstateError("cache_dir is inside the model directory", root,
                                  "give a cache_dir outside it: shardstate never writes into a model directory")
        root.mkdir(parents=True, exist_ok=True)
        entry = CacheEntry(root, entry_name(fields))
        ready = self.options.cache == "auto" and entry.holds(fields, ranks.rank)
        # an entry found here but not loaded (damaged, incomplete, or a refresh) is rebuilt; one that another
        # process publishes while this one loads is kept
        replace = entry.key() is not None
        if all(ranks.all_gather(ready)):
            outcome = _attempt_read(entry, ranks.rank, params, self.options.verify)
            outcomes = ranks.all_gather(outcome)
            if all(isinstance(o, ReadReport) for o in outcomes):
                _log("hit", entry.path, ranks.rank, outcome)
                touch(entry)
                return
            if ranks.rank == 0:
                problem = next(o for o in outcomes if not isinstance(o, ReadReport))
                logger.warning("shardstate: cache entry %s is damaged or incomplete (%s); loading the default "
                               "way and rebuilding it", entry.path, problem)
        start = time.perf_counter()
        self.default.load_weights(model, model_config)
        loaded = time.perf_counter() - start
        start = time.perf_counter()
        checkpoint = Checkpoint(directory, _architecture(model_config), model_config.dtype,
                                _shardstate_specs(directory, ranks.size, model_config))
        filled = fill_entry(entry, fields, params, ranks, checkpoint,
                            lambda line: logger.warning("shardstate: %s", line), replace)
        written = sum(p.numel() * p.element_size() for p in params.values())
        logger.info("shardstate: miss %s: rank %d loaded by vLLM's default loader in %.2f s, %s %d bytes in "
                    "%.2f s", entry.path, ranks.rank, loaded, "cached" if filled else "did not cache", written,
                    time.perf_counter() - start)

    def _key_fields(self, directory: Path, model_config: ModelConfig, ranks: Ranks) -> dict:
        vllm_config = self._vllm_config or get_current_vllm_config()
        speculative = vllm_config.speculative_config
        draft = speculative is not None and speculative.draft_model_config is model_config
        overrides = model_config.hf_overrides
        return key_fields(
            directory, architecture=_architecture(model_config), dtype=DTYPE_NAMES[model_config.dtype],
            quantization=model_config.quantization, tp_size=ranks.size, pp_size=get_pp_group().world_size,
            vllm_version=vllm_version, role="draft" if draft else "target", format_version=FORMAT_VERSION,
            overrides=overrides if isinstance(overrides, dict) else {"callable": repr(overrides)},
        )


def _attempt_read(entry: CacheEntry, rank: int, params: dict[str, torch.Tensor], verify: bool) -> object:
    """A ReadReport, or the problem as a line (shared with the other ranks, which then all fall back)."""
    try:
        return read_rank(open_sharded_state(entry.path), rank, params, verify)
    except (ShardstateError, OSError, RuntimeError, ValueError) as exc:
        return str(exc)


def _architecture(model_config: ModelConfig) -> str:
    architectures = getattr(model_config.hf_config, "architectures", None) or ["unknown"]
    return str(architectures[0])


def _model_dir(model_config: ModelConfig) -> Path | None:
    path = Path(model_config.model_weights or model_config.model)
    return path.absolute() if path.is_dir() else None


def _shardstate_specs(directory: Path, tp_size: int, model_config: ModelConfig) -> dict[str, ShardSpec] | None:
    """shardstate's layout of this model at `tp_size`, if shardstate knows the family (then the entry can be
    resharded and loaded by shardstate itself); None: the entry is opaque."""
    if model_config.quantization is not None:
        return None
    try:
        config = parse_config(*read_config_json(directory))
        return build_on_meta(config, TPGroup(0, tp_size), model_config.dtype).shard_specs()
    except ShardstateError:
        return None


def _log(path: str, where: object, rank: int, report: ReadReport) -> None:
    fetched = f", {report.bytes_fetched} of them fetched from object storage" if report.bytes_fetched else ""
    logger.info("shardstate: %s %s: rank %d read %d bytes in %d files in %.3f s (%.2f GB/s)%s", path, where, rank,
                report.bytes_read, len(report.files), report.seconds, report.gb_per_s, fetched)

"""TP model families, one file each, registered by their Hugging Face architecture name. A model built on
the meta device is the single source of truth for parameter names, rank-local shapes and ShardSpecs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from shardstate import memory
from shardstate.config import ConfigReader, ModelConfig, architecture_of
from shardstate.errors import ShardstateError, brief
from shardstate.format.config_json import read_config_json
from shardstate.models.decoder import DecoderForCausalLM
from shardstate.models.llama import LlamaForCausalLM
from shardstate.models.mistral import MistralForCausalLM
from shardstate.models.mixtral import MixtralForCausalLM
from shardstate.models.phi3 import Phi3ForCausalLM
from shardstate.models.qwen2 import Qwen2ForCausalLM
from shardstate.models.qwen2_moe import Qwen2MoeForCausalLM
from shardstate.models.qwen3 import Qwen3ForCausalLM
from shardstate.models.qwen3_moe import Qwen3MoeForCausalLM
from shardstate.parallel.distributed import TPGroup
from shardstate.quant.apply import declare_quantized
from shardstate.quant.methods import method_named
from shardstate.quant.vllm import QUANTIZATION_CONFIG, declares_quantization, with_quantization_config
from shardstate.spec import ShardSpec
from shardstate.store.model_dir import ModelDir, open_model_dir, resolve_dtype

FAMILIES: dict[str, type[DecoderForCausalLM]] = {
    family.__name__: family for family in (
        LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Phi3ForCausalLM,
        MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM,
    )
}


def parse_config(cfg: dict, raw: bytes, path: Path) -> ModelConfig:
    """config.json read by its family's parser; what that family cannot run is refused, with the reason."""
    architecture = architecture_of(cfg)
    if architecture not in FAMILIES:
        raise ShardstateError(f"unsupported architecture {brief(architecture)}", path,
                              f"shardstate supports {', '.join(FAMILIES)}")
    family = FAMILIES[architecture]
    return family.parse_config(ConfigReader(cfg, raw, path, family.DEFAULTS))


def load_config(model_dir: str | Path) -> ModelConfig:
    """MODEL/config.json alone, parsed (no other file is opened)."""
    return parse_config(*read_config_json(model_dir))


@dataclass(frozen=True)
class OpenedModel:
    """What every entry point needs from MODEL, found once (`open_model`) and passed down, to the workers
    too: the directory opened, its config parsed by its family, the dtype the model runs in."""

    directory: ModelDir
    config: ModelConfig
    dtype: torch.dtype  # the model's compute dtype (embeddings, norms, unquantized weights)
    quantization: str | None = None  # what MODEL's files hold: a quantized sharded state's method

    def build_on_meta(self, group: TPGroup) -> DecoderForCausalLM:
        return build_on_meta(self.config, group, self.dtype, self.quantization)

    def specs(self, tp_size: int) -> dict[str, ShardSpec]:
        """Parameter name -> spec at `tp_size` (the same for every rank)."""
        return self.build_on_meta(TPGroup(0, tp_size)).shard_specs()

    def saved_stages(self) -> list[TPGroup]:
        """A sharded state's layout, a TPGroup (rank 0) per pipeline stage, with the state's own layers per
        stage (read from its manifest: loading or resharding it does not depend on VLLM_PP_LAYER_PARTITION)."""
        state = self.directory.state
        assert state is not None
        return [TPGroup(0, state.tp_size, pp_rank=stage, pp_size=state.pp_size, partition=self.saved_partition())
                for stage in range(state.pp_size)]

    def state_specs(self) -> list[dict[str, ShardSpec]]:
        """A sharded state's specs as saved, for each stage."""
        return [self.build_on_meta(group).shard_specs() for group in self.saved_stages()]

    def saved_partition(self) -> tuple[int, ...] | None:
        """The layers per stage of a PP state, as its manifest lists them; None at PP=1 or without a state."""
        state = self.directory.state
        if state is None or state.pp_size == 1 or state.manifest is None:
            return None
        counts = []
        for stage in range(state.pp_size):
            names = state.manifest.tensors[str(stage * state.tp_size)]
            counts.append(len({n.split(".")[2] for n in names if n.startswith("model.layers.")}))
        if sum(counts) != self.config.num_hidden_layers or min(counts) < 1:
            raise ShardstateError(f"the state's stages hold {counts} layers, not {state.pp_size} stages of at least "
                                  f"one adding up to num_hidden_layers={self.config.num_hidden_layers}",
                                  state.manifest_path, "convert again")
        return tuple(counts)

    def saved_layout(self, tp_size: int, pp_size: int = 1) -> list[dict[str, torch.Tensor]] | None:
        """A sharded state saved at another layout than TP=`tp_size` x PP=`pp_size`, as saved: each stage's
        parameters on the meta device (names, shapes, dtypes and the specs the saved tensors were cut with:
        what a reshard on load reads from); None when MODEL is not a state at another layout."""
        state = self.directory.state
        if state is None or (state.tp_size, state.pp_size) == (tp_size, pp_size):
            return None
        return [dict(self.build_on_meta(group).named_parameters()) for group in self.saved_stages()]

    def stages(self, tp_size: int, pp_size: int = 1) -> list[TPGroup]:
        """The layout to run: a TPGroup (rank 0) per stage; a state's own layers per stage when it is run at
        its own layout, else as vLLM splits them."""
        state = self.directory.state
        same = state is not None and (state.tp_size, state.pp_size) == (tp_size, pp_size)
        partition = self.saved_partition() if same else None
        return [TPGroup(0, tp_size, pp_rank=stage, pp_size=pp_size, partition=partition) for stage in range(pp_size)]

    def state_config_json(self, quantization: str | None, for_vllm: bool) -> bytes:
        """config.json for a state made from MODEL: its own bytes, or with the quantization_config vLLM needs
        to load a quantized state (`for_vllm`; a state made so keeps it)."""
        config = self.directory.config
        if not for_vllm or declares_quantization(config):
            return self.directory.config_bytes
        if quantization is None:
            raise ShardstateError("--for-vllm is for quantized states (vLLM loads an unquantized one as it is)",
                                  self.directory.path, "add --quantize int8|fp8, or drop --for-vllm")
        return with_quantization_config(config, quantization, self.build_on_meta(TPGroup(0, 1)))


def quantize_after_load(model: OpenedModel, quantize: str | None) -> str | None:
    """The method to quantize with after load: `quantize`, unless MODEL's files are quantized already (the
    same method: nothing to do; another: refused)."""
    stored = model.quantization
    if stored is not None and quantize not in (None, stored):
        raise ShardstateError(f"the state is quantized with {stored}; --quantize {quantize} would quantize it twice",
                              model.directory.path, f"drop --quantize, or pass --quantize {stored}")
    return None if stored is not None or quantize is None else method_named(quantize).name


def open_model(
    model: str | Path | ModelDir, dtype: str | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> OpenedModel:
    """Open MODEL once: config.json (its family's parser), a sharded state's manifest, the dtype to run
    (`dtype`; else a sharded state's, config.json's or the weights'), a quantized state's method. An
    s3:// MODEL goes through the node cache under `cache_dir` (default: store/remote.py's)."""
    directory = model if isinstance(model, ModelDir) else open_model_dir(model, cache_dir)
    with directory.errors_named():
        return _opened(directory, dtype)


def _opened(directory: ModelDir, dtype: str | None) -> OpenedModel:
    config = parse_config(directory.config, directory.config_bytes, directory.config_path)
    manifest = directory.state.manifest if directory.state is not None else None
    stored = manifest.quantization["method"] if manifest is not None and manifest.quantization else None
    if declares_quantization(directory.config) and stored is None:  # a pre-quantized HF checkpoint
        method = directory.config[QUANTIZATION_CONFIG]
        method = method.get("quant_method") if isinstance(method, dict) else method
        raise ShardstateError(f"config.json declares a quantization_config ({brief(method)}): shardstate reads "
                              "unquantized checkpoints and its own quantized states", directory.config_path,
                              "use the unquantized checkpoint, with --quantize int8|fp8")
    return OpenedModel(directory, config, resolve_dtype(dtype, config.dtype, directory), stored)


def build_on_meta(config: ModelConfig, group: TPGroup, dtype: torch.dtype,
                  quantization: str | None = None) -> DecoderForCausalLM:
    """The rank's model with shapes and specs but no storage (nothing allocated, nothing initialised);
    with `quantization`, the parameters a quantized state holds (quant/)."""
    config.check_tp_size(group.size)
    with torch.device("meta"):
        model = FAMILIES[config.architecture](config, group, dtype)
    if quantization is not None:
        declare_quantized(model, method_named(quantization))
    return model


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def check_parameters_fit(model: DecoderForCausalLM, ranks_here: int) -> None:
    """Refuse, before any worker materialises parameters, a model (built on meta: its shapes are free)
    whose parameters for the `ranks_here` ranks on this host exceed its physical memory. CPU runs only
    (with CUDA the GPUs hold them)."""
    host = None if torch.cuda.is_available() else memory.physical_memory_bytes()
    if host is None:
        return
    config, tp_size, dtype = model.config, model.group.size, next(model.parameters()).dtype
    per_rank = sum(p.numel() * p.element_size() for p in model.parameters())  # a tied weight once
    if per_rank * ranks_here <= host:
        return
    if ranks_here == 1:
        here, todo = f"this host has {_gb(host)}", "use a larger --tp or a smaller --dtype"
    else:  # a larger TP size alone does not shrink what the ranks on one host hold together
        here = f"{_gb(per_rank * ranks_here)} for the {ranks_here} ranks on this host, which has {_gb(host)}"
        todo = "use a smaller --dtype, or a larger --tp over more hosts with torchrun"
    dtype_name = str(dtype).removeprefix("torch.")
    raise ShardstateError(f"the model needs {_gb(per_rank)} per rank at TP={tp_size} ({dtype_name}), {here}",
                          config.path, todo)


def check_generation_fits(
    config: ModelConfig, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, tp_size: int,
    dtype: torch.dtype, ranks_here: int,
) -> None:
    """Refuse, before any rank allocates its KV cache, a generation past the model's positions or (CPU
    runs) one whose KV caches for the `ranks_here` ranks on this host exceed its available memory."""
    longest = max(len(p) for p in prompt_ids)
    positions = longest + max_new_tokens
    if positions > config.max_position_embeddings:
        raise ShardstateError(
            f"prompt of {longest} tokens + --max-new-tokens {max_new_tokens} = {positions} positions, beyond "
            f"max_position_embeddings={config.max_position_embeddings}", config.path,
            "ask for fewer new tokens or a shorter prompt",
        )
    available = None if torch.cuda.is_available() else memory.available_memory_bytes()
    need = config.kv_cache_bytes(tp_size, len(prompt_ids), positions, dtype) * ranks_here
    if available is not None and need > available:
        raise ShardstateError(
            f"the KV cache for {len(prompt_ids)} prompt(s) x {positions} positions needs {_gb(need)} on this "
            f"host, which has {_gb(available)} available", config.path,
            "ask for fewer new tokens, or fewer or shorter prompts",
        )

"""A model directory opened once: its config.json (read once), what kind of directory it is, and for a
sharded state its parsed manifest (or vLLM's rank files). Every entry point opens MODEL with
`open_model_dir` and passes the result down, to the loaders and (pickled) to the workers, so nothing
reads or checks the manifest twice."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shardstate.config import read_config_json
from shardstate.format.sharded_state import ShardedState, is_sharded_state, open_sharded_state


@dataclass(frozen=True)
class ModelDir:
    path: Path  # absolute
    config: dict  # config.json, parsed
    config_bytes: bytes
    config_path: Path
    state: ShardedState | None  # a sharded state (manifest checked against config.json) or vLLM's rank files

    @property
    def kind(self) -> str:
        if self.state is None:
            return "hf"
        return "sharded" if self.state.manifest is not None else "vllm"


def open_model_dir(path: str | Path) -> ModelDir:
    """Read config.json and, for a sharded state, its manifest (refused if config.json is not the one its
    files were made for; a vLLM-written directory without one is accepted, strictly checked later)."""
    path = Path(path).absolute()
    config, raw, config_path = read_config_json(path)
    state = open_sharded_state(path, allow_legacy=True, config_bytes=raw) if is_sharded_state(path) else None
    return ModelDir(path, config, raw, config_path, state)

"""A model directory's config.json read as a file: its bytes, parsed strictly, one clear error for
anything else. What its keys mean is the families' (config.py, models/)."""

from __future__ import annotations

from pathlib import Path

from shardstate.errors import ShardstateError
from shardstate.format.strict_json import loads_strict
from shardstate.io.files import read_regular

CONFIG_NAME = "config.json"


def read_config_json(model_dir: str | Path) -> tuple[dict, bytes, Path]:
    """MODEL/config.json as a dict, its bytes and its path; one clear error for anything else."""
    if not Path(model_dir).is_dir():
        raise ShardstateError("not a directory", Path(model_dir), "pass a Hugging Face model directory")
    path = Path(model_dir) / CONFIG_NAME
    try:
        raw = read_regular(path)
    except FileNotFoundError:
        raise ShardstateError("config.json not found", Path(model_dir), "pass a Hugging Face model directory") from None
    except OSError as exc:
        raise ShardstateError(f"cannot read config.json ({exc.strerror})", path, "check permissions") from None
    try:
        cfg = loads_strict(raw)
    except ValueError as exc:
        raise ShardstateError(f"config.json is not valid JSON ({exc})", path, "repair the file") from None
    if not isinstance(cfg, dict):
        raise ShardstateError("config.json is not a JSON object", path, "repair the file")
    return cfg, raw, path

"""The `shardstate` load format's options, as vLLM hands them over (`--model-loader-extra-config`, a dict):
checked here, without vLLM, so that a typo is one line before anything loads."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from shardstate.errors import ShardstateError, brief

CACHE_MODES = ("auto", "off", "refresh")
CACHE_ENV = "SHARDSTATE_VLLM_CACHE_DIR"
WHERE = "--model-loader-extra-config"


def default_cache_dir() -> Path:
    """$SHARDSTATE_VLLM_CACHE_DIR, else ~/.cache/shardstate/vllm: never inside a model directory."""
    given = os.environ.get(CACHE_ENV)
    return Path(given) if given else Path.home() / ".cache" / "shardstate" / "vllm"


@dataclass(frozen=True)
class LoaderOptions:
    state: str | None = None  # a sharded state to load (a path or s3://): no cache then
    cache_dir: Path | None = None  # None: default_cache_dir()
    verify: bool = True  # every tensor's digest checked while it is read
    cache: str = "auto"  # auto: hit or fill; off: vLLM's default loader only; refresh: rebuild the entry

    @property
    def cache_root(self) -> Path:
        return (self.cache_dir or default_cache_dir()).absolute()


def parse_options(extra: object) -> LoaderOptions:
    """Refuse unknown keys and wrong types, each in one line naming the key."""
    extra = {} if extra is None else extra
    if not isinstance(extra, dict):
        raise ShardstateError(f"options are {brief(extra)}, not a JSON object", WHERE,
                              '\'{"state": ..., "cache_dir": ..., "verify": true, "cache": "auto"}\'')
    known = {"state", "cache_dir", "verify", "cache"}
    unknown = sorted(set(extra) - known)
    if unknown:
        raise ShardstateError(f"unknown option {brief(unknown[0])} of --load-format shardstate", WHERE,
                              f"use only {', '.join(sorted(known))}")
    state, cache_dir = extra.get("state"), extra.get("cache_dir")
    for name, value in (("state", state), ("cache_dir", cache_dir)):
        if value is not None and (not isinstance(value, str) or not value):
            raise ShardstateError(f"option {name} is {brief(value)}, not a path", WHERE, f"give {name} as a string")
    verify = extra.get("verify", True)
    if not isinstance(verify, bool):
        raise ShardstateError(f"option verify is {brief(verify)}, not true or false", WHERE, "use true or false")
    cache = extra.get("cache", "auto")
    if cache not in CACHE_MODES:
        raise ShardstateError(f"option cache is {brief(cache)}", WHERE, f"use one of {', '.join(CACHE_MODES)}")
    if state is not None and cache == "refresh":
        raise ShardstateError("options state and cache=refresh together: a given state is loaded, never cached",
                              WHERE, "drop one of them")
    return LoaderOptions(state, Path(cache_dir).expanduser() if cache_dir else None, verify, cache)

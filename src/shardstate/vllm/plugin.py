"""The entry point vLLM calls in each of its processes (group `vllm.general_plugins`): registers the
`shardstate` load format. vLLM is imported here, when vLLM calls it, never by `import shardstate`."""

from __future__ import annotations

LOAD_FORMAT = "shardstate"


def register() -> None:
    """Safe to call more than once (vLLM loads plugins in every process, sometimes twice)."""
    from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER, register_model_loader

    if LOAD_FORMAT in _LOAD_FORMAT_TO_MODEL_LOADER:
        return
    from shardstate.vllm.loader import ShardstateModelLoader

    register_model_loader(LOAD_FORMAT)(ShardstateModelLoader)

"""shardstate: load large language models into tensor-parallel workers fast."""

from shardstate.errors import ShardstateError

__all__ = ["LLM", "ShardstateError"]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """`shardstate.LLM` imports torch on first use only: the command catches Ctrl-C before that."""
    if name == "LLM":
        from shardstate.runtime.llm import LLM

        return LLM
    raise AttributeError(f"module 'shardstate' has no attribute {name!r}")

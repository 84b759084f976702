"""shardstate: load large language models into tensor-parallel workers fast."""

from shardstate.errors import ShardstateError
from shardstate.runtime.llm import LLM

__all__ = ["LLM", "ShardstateError"]
__version__ = "0.1.0"

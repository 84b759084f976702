"""Text <-> token ids with the checkpoint's tokenizer.json (needs the `tokenizers` package)."""

from __future__ import annotations

from pathlib import Path

from shardstate.errors import ShardstateError


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise ShardstateError(
                "text prompts need tokenizer.json, which is missing", Path(model_dir),
                "pass --prompt-ids instead, or add the tokenizer files",
            )
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise ShardstateError(
                "text prompts need the 'tokenizers' package", path,
                "pip install 'shardstate[hf]' or pass --prompt-ids",
            ) from None
        try:
            self._tokenizer = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises plain Exception on a bad file
            raise ShardstateError(f"cannot parse tokenizer.json ({exc})", path, "repair the file") from None

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

"""The one exception type the CLI turns into `error: <what> in <file>: <what to do>` and exit code 1."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


class ShardstateError(Exception):
    """Bad input or a failed check: a message for a person, never a traceback."""

    def __init__(self, what: str, where: str | os.PathLike[str] | None = None, todo: str | None = None):
        self.what = what
        self.where = None if where is None else os.fspath(where)
        self.todo = todo
        message = what
        if self.where:
            message += f" in {self.where}"
        if todo:
            message += f": {todo}"
        super().__init__(message)


def brief(value: object, limit: int = 40) -> str:
    """repr() cut to `limit` characters: a message quotes bad input without echoing megabytes of it."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def failing_as(what: str, where: str | os.PathLike[str], todo: str) -> Iterator[None]:
    """Turn an OSError in the block into ShardstateError(f"{what} ({strerror})", where, todo): the message
    names the file the operation was about and says whether it was a read or a write."""
    try:
        yield
    except OSError as exc:
        raise ShardstateError(f"{what} ({exc.strerror or exc})", where, todo) from None


@contextlib.contextmanager
def naming(directory: str | os.PathLike[str], name: str) -> Iterator[None]:
    """A ShardstateError in the block names `directory` (e.g. an s3:// model's copy in the node cache) as
    `name` (its s3:// location): the user knows the location, not where shardstate keeps a copy. Only
    around reads of the model: an error writing the cache must name the cache."""
    try:
        yield
    except ShardstateError as exc:
        local = os.fspath(directory)

        def shown(text: str | None) -> str | None:
            return text and text.replace(local + os.sep, name + "/").replace(local, name)

        raise ShardstateError(shown(exc.what) or "", shown(exc.where), shown(exc.todo)) from None

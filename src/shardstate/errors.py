"""The one exception type the CLI turns into `error: <what> in <file>: <what to do>` and exit code 1."""

from __future__ import annotations

import os


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

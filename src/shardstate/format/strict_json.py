"""JSON from files we did not write ourselves in this process: no duplicate keys (the standard parser keeps
the last silently), no unbounded nesting (the parser recurses), bytes that must be UTF-8."""

from __future__ import annotations

import json


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key[:60]!r}")
        result[key] = value
    return result


def loads_strict(raw: bytes) -> object:
    """Parse `raw`; ValueError with the reason for anything that is not plain, unambiguous JSON."""
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None

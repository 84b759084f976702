"""What people read: generation results and per-rank load tables."""

from __future__ import annotations

import json
from pathlib import Path

from shardstate.loaders import LoadReport
from shardstate.parallel.pipeline import layout_name
from shardstate.runtime.prompts import Output


def print_generation(outputs: list[Output], reports: list[LoadReport], as_json: bool) -> None:
    if as_json:
        doc = {"outputs": [o.to_json() for o in outputs], "load": [r.to_json() for r in reports]}
        print(json.dumps(doc))
        return
    for n, out in enumerate(outputs):
        print(f"prompt {n}: {out.prompt_token_ids}")
        print(f"  tokens: {out.token_ids}")
        if out.text is not None:
            print(f"  text:   {out.text!r}")
    print(load_table([("", r) for r in reports]))
    if reports and reports[0].resharded_from is not None:
        print(f"resharded on load from {layout_name(reports[0].resharded_from, reports[0].resharded_from_pp or 1)}")


def load_table(rows: list[tuple[str, LoadReport]]) -> str:
    """One line per (loader label, rank report): seconds, MB read, GB/s, files opened."""
    lines = [f"{'loader':<9} {'rank':>4} {'seconds':>8} {'MB read':>9} {'GB/s':>6}  files"]
    for label, r in rows:
        rate = r.bytes_read / r.seconds / 1e9 if r.seconds else 0.0
        files = ", ".join(Path(f).name for f in r.files)
        lines.append(f"{label:<9} {r.rank:>4} {r.seconds:>8.3f} {r.bytes_read / 1e6:>9.1f} {rate:>6.2f}  {files}")
    return "\n".join(lines)

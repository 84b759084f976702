"""`shardstate cache list|verify|rm`: the vLLM plugin's cache entries (store/cache.py), shardstate's own only."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from shardstate.errors import ShardstateError
from shardstate.format.sharded_state import open_sharded_state
from shardstate.state_info import check_file
from shardstate.store import cache
from shardstate.vllm.options import CACHE_ENV, default_cache_dir


def add_cache_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("cache", help="the vLLM plugin's cache entries: list, verify, rm")
    parser.add_argument("action", choices=["list", "verify", "rm"])
    parser.add_argument("entry", nargs="?", help="an entry's name (verify: default all; rm: this one, or --all)")
    parser.add_argument("--all", action="store_true", help="rm: every entry shardstate wrote")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"the plugin's cache_dir (default ${CACHE_ENV}, else ~/.cache/shardstate/vllm)")
    parser.add_argument("--json", action="store_true")


def run_cache(args: argparse.Namespace) -> None:
    root = (args.cache_dir or default_cache_dir()).absolute()
    if args.action == "rm" and (args.entry is None) == (not args.all):
        raise ShardstateError("cache rm needs an entry's name or --all (not both)", root, "see `shardstate cache list`")
    chosen = [cache.find(root, args.entry)] if args.entry is not None else cache.entries(root)
    if args.action == "list":
        _list([cache.describe(e) for e in chosen], root, args.json)
    elif args.action == "verify":
        _verify(chosen, root, args.json)
    else:
        for entry in chosen:
            cache.remove(entry)
            if not args.json:
                print(f"removed {entry.path}")
        if args.json:
            print(json.dumps({"removed": [e.name for e in chosen]}))


def _list(infos: list[cache.EntryInfo], root: Path, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"cache_dir": str(root), "entries": [i.to_json() for i in infos]}))
        return
    if not infos:
        print(f"{root}: no entries")
    for info in infos:
        fields = info.fields
        state = "complete" if info.complete else f"INCOMPLETE: {info.problem}"
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(info.last_used))
        print(f"{info.name}  {fields.get('architecture')} {fields.get('dtype')} TP={fields.get('tp_size')} "
              f"PP={fields.get('pp_size')} vLLM {fields.get('vllm')}, ranks {info.ranks}, "
              f"{info.bytes / 1e6:.1f} MB, last used {used}, {state}")


def _verify(entries: list[cache.CacheEntry], root: Path, as_json: bool) -> None:
    """Every file of the ranks each entry holds, checked as `shardstate verify` checks a state's."""
    results, bad = [], 0
    for entry in entries:
        info = cache.describe(entry)
        files: list[dict] = []
        try:
            manifest = open_sharded_state(entry.path).manifest
        except ShardstateError as exc:
            files.append({"name": "shardstate.json", "ok": False, "problem": exc.what})
        else:
            for rank in info.ranks:
                for name in manifest.rank_files(rank):
                    problem = check_file(entry.path, name, manifest)
                    files.append({"name": name, "ok": problem is None, "problem": problem})
        bad += sum(not f["ok"] for f in files)
        results.append({"name": entry.name, "ok": all(f["ok"] for f in files), "files": files})
        if not as_json:
            for f in files:
                print(f"{'ok ' if f['ok'] else 'BAD'} {entry.name}/{f['name']}"
                      + (f": {f['problem']}" if f["problem"] else ""))
    if as_json:
        print(json.dumps({"ok": bad == 0, "entries": results}))
    if bad:
        raise ShardstateError(f"{bad} file(s) failed verification", root,
                              "remove the entry (`shardstate cache rm NAME`): the next vLLM start rebuilds it")

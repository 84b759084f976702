"""The `shardstate` command. Exit codes: 0 ok, 1 bad input or failed check (`error: ...`), 2 usage."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from shardstate.cache_command import add_cache_command, run_cache
from shardstate.display import print_generation
from shardstate.errors import ShardstateError
from shardstate.io.engine import IO_MODES
from shardstate.io.s3 import is_s3
from shardstate.loaders import LOAD_FORMATS
from shardstate.models import OpenedModel
from shardstate.parallel.pipeline import MAX_PP, layout_name
from shardstate.quant.methods import METHODS
from shardstate.runtime.llm import IO_THREADS_RANGE, TIMEOUT_RANGE_S
from shardstate.spec import MAX_TP
from shardstate.stops import Stopped, raising_stops

if TYPE_CHECKING:
    from shardstate.runtime.llm import LLM


class _AppendPrompt(argparse.Action):
    """--prompt and --prompt-ids append to one list, so a batch keeps the order given."""

    def __call__(self, parser, namespace, value, option_string=None):
        if option_string == "--prompt-ids":
            try:
                value = [int(t) for t in value.split(",")]
            except ValueError:
                parser.error(f"--prompt-ids {value!r} is not a comma-separated list of integers")
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest) or []), value])


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30}
MAX_SIZE = 1 << 50  # 1 PiB: far above any part file; a larger size is a typo
MAX_NEW_TOKENS = 1 << 20  # prompt + new tokens must also fit the model's max_position_embeddings


def parse_size(text: str) -> int:
    """'300KB' -> 300000, '64MiB' -> 67108864; from 1 byte to MAX_SIZE."""
    number = text.rstrip("BbKkMmGgIi")
    unit = text[len(number):].upper()
    try:
        value = float(number) * SIZE_UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 300KB, 64MiB or 5GiB") from None
    if not 1 <= value <= MAX_SIZE:  # also refuses inf and nan
        raise argparse.ArgumentTypeError(f"{text!r} is not a size from 1 byte to 1PiB")
    return int(value)


def int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer from `low` to `high`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer from {low} to {high}")
        return value

    return parse


def location(text: str) -> str | Path:
    """An argparse type: s3://bucket/prefix as written (a Path would fold its "//"), else a path."""
    return text if is_s3(text) else Path(text)


def add_cache_option(parser: argparse.ArgumentParser) -> None:
    # as written, not a Path: Path("") is "." and would cache in the working directory (refused instead)
    parser.add_argument("--cache-dir", type=str, default=None, metavar="DIR",
                        help="s3:// models: this node's cache of fetched files (default $SHARDSTATE_CACHE_DIR or "
                             "~/.cache/shardstate/remote)")


tp_size = int_in(1, MAX_TP)
pp_size = int_in(1, MAX_PP)
new_tokens = int_in(0, MAX_NEW_TOKENS)


def run_convert(args: argparse.Namespace) -> None:
    from shardstate.convert import convert

    report = convert(args.src, args.out, args.tp, args.dtype, args.max_part_size, args.force,
                     show_progress=False if args.json else None, quantize=args.quantize, for_vllm=args.for_vllm,
                     cache_dir=args.cache_dir, pp_size=args.pp)
    if args.json:
        print(json.dumps(dataclasses.asdict(report)))
        return
    rate = (report.bytes_read + report.bytes_written) / report.seconds / 1e9
    print(f"converted {args.src} -> {args.out} at {layout_name(args.tp, args.pp)}: {len(report.files)} files, read "
          f"{report.bytes_read / 1e6:.1f} MB, wrote {report.bytes_written / 1e6:.1f} MB in "
          f"{report.seconds:.2f}s ({rate:.2f} GB/s read+write)")


def run_save(args: argparse.Namespace) -> None:
    from shardstate.store.output import check_output

    if is_s3(args.out):
        raise ShardstateError("save writes a local directory", None,
                              f"save to a directory, then `shardstate upload DIR {args.out}`")
    start = time.perf_counter()
    if not is_s3(args.src):  # before starting workers; checked again when publishing
        check_output(args.out, args.src, args.force)
    with start_llm(args.src, args) as llm:
        files = llm.save_sharded_state(args.out, max_size=args.max_part_size, force=args.force,
                                       for_vllm=args.for_vllm)
    print(f"saved {args.src} -> {args.out} at {layout_name(args.tp, args.pp)}: {len(files)} files in "
          f"{time.perf_counter() - start:.2f}s")


def run_upload(args: argparse.Namespace) -> None:
    from shardstate.store.upload import upload_state

    report = upload_state(args.dir, args.url, args.parallel)
    kept = f"; {len(report.kept)} already there from an unfinished upload, kept" if report.kept else ""
    print(f"uploaded {args.dir} -> {report.url}: {len(report.files)} files, {report.bytes_uploaded / 1e6:.1f} MB in "
          f"{report.seconds:.2f}s (manifest last{kept})")


def run_inspect(args: argparse.Namespace) -> None:
    from shardstate.state_info import inspect_location

    info = inspect_location(args.dir, args.cache_dir)
    if args.json:
        print(json.dumps(info))
    else:
        quantized = f" ({info['quantization']['method']} linear weights)" if info["quantization"] else ""
        print(f"{args.dir}: {info['format']}, {info['architecture']}, {info['dtype']}{quantized}, "
              f"TP={info['tp_size']} PP={info['pp_size']}, {info['total_bytes'] / 1e6:.1f} MB")
        for rank in info["ranks"]:
            print(f"  rank {rank['rank']}: {rank['tensors']} tensors, {rank['bytes'] / 1e6:.1f} MB")
            for file in rank["files"]:
                flag = f"  BAD: {file['problem']}" if file["problem"] else ""
                print(f"    {file['name']}  {file['size']} bytes{flag}")
    bad = [f["name"] for r in info["ranks"] for f in r["files"] if f["problem"]]
    if bad:
        raise ShardstateError(f"{len(bad)} rank file(s) would be refused by a load ({', '.join(bad)})", args.dir,
                              "run `shardstate verify` and re-create the sharded state")


def run_verify(args: argparse.Namespace) -> None:
    from shardstate.state_info import verify_location

    checks = verify_location(args.dir, args.cache_dir)
    bad = [c for c in checks if not c.ok]
    if args.json:
        print(json.dumps({"ok": not bad, "files": [c.to_json() for c in checks]}))
    else:
        for check in checks:
            print(f"{'ok ' if check.ok else 'BAD'} {check.name}" + (f": {check.problem}" if check.problem else ""))
    if bad:
        names = ", ".join(c.name for c in bad)
        raise ShardstateError(f"{len(bad)} of {len(checks)} files failed verification ({names})", args.dir,
                              "re-create the sharded state")


def timeout_seconds(text: str) -> float:
    """Finite seconds within the LLM's TIMEOUT_RANGE_S."""
    low, high = TIMEOUT_RANGE_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not low <= value <= high:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from {low} to {high}")
    return value


def add_worker_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--io", choices=IO_MODES, default="read",
                        help="sharded loads: read (default), mmap (alias the page cache), direct (O_DIRECT)")
    parser.add_argument("--io-threads", type=int_in(*IO_THREADS_RANGE), default=None, metavar="N",
                        help="parallel reads per rank (default: the rank's share of CPU cores, 2 to 8)")
    parser.add_argument("--verify", action="store_true", help="sharded loads: check every tensor's checksum")
    parser.add_argument("--timeout", type=timeout_seconds, default=120.0, metavar="SECONDS",
                        help="stop every rank when one lags this long behind the others (default 120)")


def start_llm(model: str | Path | OpenedModel, args: argparse.Namespace) -> LLM:
    """Workers for MODEL (a path, or a model already opened, which has its dtype)."""
    from shardstate.runtime.llm import LLM

    dtype = None if isinstance(model, OpenedModel) else args.dtype
    return LLM(model, args.tp, args.load_format, dtype, io=args.io, io_threads=args.io_threads,
               verify=args.verify, timeout=args.timeout, quantize=getattr(args, "quantize", None),
               cache_dir=getattr(args, "cache_dir", None), pipeline_parallel_size=getattr(args, "pp", 1))


def add_quantize_option(parser: argparse.ArgumentParser, for_vllm: bool = False) -> None:
    parser.add_argument("--quantize", choices=sorted(METHODS), default=None,
                        help="weight-only int8 or fp8 linear weights, per-output-channel fp32 scales (a quantized "
                             "state keeps its method)")
    if for_vllm:
        parser.add_argument("--for-vllm", action="store_true",
                            help="a quantized state also gets what vLLM's sharded_state loader needs: a "
                                 "compressed-tensors quantization_config in config.json (W8A8: vLLM also "
                                 "quantizes activations) and its KV-cache placeholder tensors")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardstate", description="Load LLMs into tensor-parallel workers fast.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="the main job on an embedded default model")
    demo.add_argument("--max-new-tokens", type=new_tokens, default=16)

    conv = commands.add_parser("convert", help="HF checkpoint -> sharded state (offline, one process, CPU)")
    conv.add_argument("src", type=location, help="a HF checkpoint or sharded state (s3://bucket/prefix too)")
    conv.add_argument("out", type=location, help="a new directory, or an empty s3://bucket/prefix")
    conv.add_argument("--tp", type=tp_size, required=True)
    conv.add_argument("--pp", type=pp_size, default=1,
                      help="pipeline stages (layers split as vLLM splits them; VLLM_PP_LAYER_PARTITION overrides)")
    conv.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: the checkpoint's)")
    conv.add_argument("--max-part-size", type=parse_size, default=5 << 30, metavar="SIZE",
                      help="roll over to a new part file past SIZE (e.g. 300KB, 64MiB, 5GiB; default 5GiB)")
    conv.add_argument("--force", action="store_true", help="replace OUT if it exists")
    add_quantize_option(conv, for_vllm=True)
    add_cache_option(conv)
    conv.add_argument("--json", action="store_true")

    save = commands.add_parser("save", help="load SRC on TP workers, then each rank writes its own live state")
    save.add_argument("src", type=location, help="a HF checkpoint or sharded state (s3://bucket/prefix too)")
    add_cache_option(save)
    save.add_argument("out", type=location)
    save.add_argument("--tp", type=tp_size, required=True)
    save.add_argument("--pp", type=pp_size, default=1, help="pipeline stages (vLLM's PP file names)")
    save.add_argument("--load-format", choices=LOAD_FORMATS, default="auto")
    save.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: the checkpoint's)")
    save.add_argument("--max-part-size", type=parse_size, default=5 << 30, metavar="SIZE")
    save.add_argument("--force", action="store_true", help="replace OUT if it exists")
    add_quantize_option(save, for_vllm=True)
    add_worker_options(save)

    checks = (("inspect", "what a sharded state holds"), ("verify", "check every file against the manifest"))
    for command, text in checks:
        sub = commands.add_parser(command, help=text)
        sub.add_argument("dir", type=location, help="a sharded state (s3://bucket/prefix too)")
        sub.add_argument("--json", action="store_true")
        add_cache_option(sub)

    upload = commands.add_parser("upload", help="a sharded state into S3-compatible storage, manifest last")
    upload.add_argument("dir", type=location, help="a sharded state's local directory")
    upload.add_argument("url", metavar="s3://bucket/prefix", help="empty, or holding an unfinished upload of the "
                                                                  "same state (resumed)")
    upload.add_argument("--parallel", type=int_in(1, 64), default=8, metavar="N",
                        help="requests in flight: whole files, or parts of $SHARDSTATE_S3_PART_MIB (default 16) "
                             "MiB (default 8)")

    add_cache_command(commands)

    bench = commands.add_parser("bench", help="load-time benchmark against peers (JSON, markdown, PNG)")
    bench.add_argument("--out", type=Path, default=Path("bench"), help="where results.{json,md,png} go")
    bench.add_argument("--cache-dir", type=Path, default=None, help="where the benchmark model lives")
    bench.add_argument("--tp", type=tp_size, nargs="+", default=None,
                       help="TP sizes (default 1 2 4; --families, --quantized: one, default 2)")
    bench.add_argument("--smoke", action="store_true", help="a tiny model: checks the harness, times nothing")
    bench.add_argument("--families", action="store_true",
                       help="instead: bytes per rank and load time of every model family (at the first --tp)")
    bench.add_argument("--quantized", action="store_true",
                       help="instead: bf16, int8 and fp8 states of the demo model (at its TP=3): bytes per rank, "
                            "load and generation time, peak RSS, greedy tokens equal to bf16; and of the benchmark "
                            "model (at --tp): bytes per rank, load time (warm, cold), peak RSS")
    bench.add_argument("--remote", action="store_true",
                       help="instead: the benchmark model's state from SeaweedFS on 127.0.0.1 (at --tp): shardstate's "
                            "per-rank fetch and load against plain boto3 downloads of the same bytes and of the "
                            "whole state")
    bench.add_argument("--vllm", action="store_true",
                       help="instead: vLLM starting the benchmark model with auto, sharded_state and shardstate's "
                            "load format (miss, hit, state=s3://) at --tp (default 1 2), warm and cold")
    bench.add_argument("--runai", action="store_true",
                       help="instead: Run:ai Model Streamer (make bench installs it) on the benchmark model's sharded "
                            "state at --tp (default 1 2): from local disk warm and cold, from SeaweedFS, and as "
                            "vLLM's runai_streamer_sharded, against shardstate on the same files (peers.{json,md})")
    bench.add_argument("--warm-path", action="store_true",
                       help="instead: the sharded read at --tp (default 1 2), warm and cold, with its load memory "
                            "reserved at start and huge pages each on and off, against the read limit and vLLM's "
                            "sharded_state (warm-path.{json,md})")
    bench.add_argument("--vllm-python", type=Path, default=None,
                       help="a Python with vLLM (default: .venv-vllm/bin/python when present)")

    gen = commands.add_parser("generate", help="load MODEL on TP workers and generate greedily")
    gen.add_argument("model", type=location, help="a Hugging Face model directory or a sharded state (local, or "
                                                   "s3://bucket/prefix)")
    add_cache_option(gen)
    gen.add_argument("--tp", type=tp_size, default=1,
                     help="tensor-parallel size (under torchrun: the world size over --pp)")
    gen.add_argument("--pp", type=pp_size, default=1, help="pipeline stages of --tp ranks each")
    gen.add_argument("--load-format", choices=LOAD_FORMATS, default="auto",
                     help="auto: sharded for a sharded state, else default")
    gen.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: the checkpoint's)")
    add_quantize_option(gen)
    gen.add_argument("--prompt", dest="prompts", action=_AppendPrompt, help="text prompt (repeatable)")
    gen.add_argument("--prompt-ids", dest="prompts", action=_AppendPrompt, metavar="1,2,3", help="token ids")
    add_worker_options(gen)
    gen.add_argument("--max-new-tokens", type=new_tokens, default=16)
    gen.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    gen.add_argument("--logprobs", type=int_in(1, MAX_NEW_TOKENS), default=None, metavar="K",
                     help="with --json: each new token's step also gives its K most likely tokens and their "
                          "log-probabilities")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def run_generate(args: argparse.Namespace) -> None:
    from shardstate.parallel.distributed import torchrun_env

    if torchrun_env() is not None:
        from shardstate.runtime.torchrun import generate_under_torchrun

        result = generate_under_torchrun(args)
        if result is not None:  # rank 0
            print_generation(*result, args.json)
        return
    from shardstate.runtime.prompts import prepare_prompts

    prepared = prepare_prompts(args.model, args.dtype, args.prompts, args.max_new_tokens, args.tp,
                               args.tp * args.pp, args.cache_dir)
    with start_llm(prepared.model, args) as llm:  # MODEL opened once, prompts checked before any worker starts
        outputs = llm.generate(args.prompts, args.max_new_tokens, args.ignore_eos, args.logprobs)
        print_generation(outputs, llm.load_reports, args.json)


def run_bench(args: argparse.Namespace) -> None:
    from shardstate.benchmark import run_bench as bench
    from shardstate.demo import cache_dir

    one_tp = args.tp[0] if args.tp else 2
    if args.remote:
        from shardstate.benchmark.remote import run_remote

        rows = run_remote(args.out, args.cache_dir or cache_dir() / "bench", one_tp, args.smoke)
        print(f"wrote {args.out}/remote.json, remote.md ({len(rows)} ways)")
        return
    if args.quantized:
        from shardstate.benchmark.quantized import run_quantized, run_quantized_loads

        rows = run_quantized(args.out, args.cache_dir or cache_dir())
        loads = run_quantized_loads(args.out, args.cache_dir or cache_dir() / "bench", one_tp, args.smoke)
        print(f"wrote {args.out}/quantized.json, quantized.md ({len(rows)} states), quantized-loads.json, "
              f"quantized-loads.md ({len(loads)} loads)")
        return
    vllm_python = args.vllm_python or Path(".venv-vllm/bin/python")
    if args.vllm:
        from shardstate.benchmark.vllm_plugin import run_vllm_plugin

        if not vllm_python.is_file():
            raise ShardstateError("no vLLM for --vllm", vllm_python, "run `make test-vllm` once, or pass --vllm-python")
        rows = run_vllm_plugin(args.out, args.cache_dir or cache_dir() / "bench", vllm_python,
                               tuple(args.tp or (1, 2)), args.smoke)
        print(f"wrote {args.out}/vllm-plugin.json, vllm-plugin.md ({len(rows)} rows)")
        return
    if args.warm_path:
        from shardstate.benchmark.warm_path import run_warm_path

        rows = run_warm_path(args.out, args.cache_dir or cache_dir() / "bench", tuple(args.tp or (1, 2)),
                             vllm_python if vllm_python.is_file() else None, args.smoke)
        print(f"wrote {args.out}/warm-path.json, warm-path.md ({len(rows)} rows)")
        return
    if args.runai:
        from shardstate.benchmark.runai_peer import available, run_runai

        if not available():
            raise ShardstateError("no Run:ai Model Streamer for --runai", Path(sys.executable),
                                  "run `make bench`, which installs it (pinned) into .venv")
        rows = run_runai(args.out, args.cache_dir or cache_dir() / "bench", tuple(args.tp or (1, 2)),
                         vllm_python if vllm_python.is_file() else None, args.smoke)
        print(f"wrote {args.out}/peers.json, peers.md ({len(rows)} rows)")
        return
    if args.families:
        from shardstate.benchmark.families import run_families

        rows = run_families(args.out, args.cache_dir or cache_dir() / "bench", one_tp, args.smoke)
        print(f"wrote {args.out}/families.json, families.md ({len(rows)} runs)")
        return
    results = bench(args.out, args.cache_dir or cache_dir() / "bench", args.smoke, tuple(args.tp or (1, 2, 4)),
                    vllm_python if vllm_python.is_file() else None)
    print(f"wrote {args.out}/results.json, results.md" + (", results.png" if (args.out / "results.png").exists()
                                                           else "") + f" ({len(results['runs'])} runs)")


def run_demo(args: argparse.Namespace) -> None:
    from shardstate.demo import run_demo

    run_demo(args.max_new_tokens)


COMMANDS = {
    "demo": run_demo,
    "bench": run_bench,
    "convert": run_convert,
    "save": run_save,
    "inspect": run_inspect,
    "upload": run_upload,
    "verify": run_verify,
    "cache": run_cache,
    "generate": run_generate,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "generate" and not args.prompts:
        parser.error("generate needs at least one --prompt or --prompt-ids")
    try:
        with raising_stops():
            COMMANDS[args.command](args)
    except ShardstateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. `shardstate ... | head`
        sys.stderr.close()
        return 0
    except Stopped as stop:  # every `with` and `finally` on the way here has stopped workers, removed temporaries
        print(stop.line, file=sys.stderr)
        return stop.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())

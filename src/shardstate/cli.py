"""The `shardstate` command. Exit codes: 0 ok, 1 bad input or failed check (`error: ...`), 2 usage."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from shardstate.display import print_generation
from shardstate.errors import ShardstateError
from shardstate.loaders import LOADERS


class _AppendPrompt(argparse.Action):
    """--prompt and --prompt-ids append to one list, so a batch keeps the order given."""

    def __call__(self, parser, namespace, value, option_string=None):
        if option_string == "--prompt-ids":
            try:
                value = [int(t) for t in value.split(",")]
            except ValueError:
                parser.error(f"--prompt-ids {value!r} is not a comma-separated list of integers")
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest) or []), value])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardstate", description="Load LLMs into tensor-parallel workers fast.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="the main job on an embedded default model")
    demo.add_argument("--max-new-tokens", type=int, default=16)

    gen = commands.add_parser("generate", help="load MODEL on TP workers and generate greedily")
    gen.add_argument("model", type=Path, help="Hugging Face model directory")
    gen.add_argument("--tp", type=int, default=1, help="tensor-parallel size (under torchrun: the world size)")
    gen.add_argument("--load-format", choices=sorted(LOADERS), default="default")
    gen.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: the checkpoint's)")
    gen.add_argument("--prompt", dest="prompts", action=_AppendPrompt, help="text prompt (repeatable)")
    gen.add_argument("--prompt-ids", dest="prompts", action=_AppendPrompt, metavar="1,2,3", help="token ids")
    gen.add_argument("--max-new-tokens", type=int, default=16)
    gen.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def run_generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from shardstate.runtime.distributed import torchrun_env

    if not args.prompts:
        parser.error("generate needs at least one --prompt or --prompt-ids")
    if torchrun_env() is not None:
        from shardstate.runtime.torchrun import generate_under_torchrun

        generate_under_torchrun(args)
        return
    from shardstate.runtime.llm import LLM

    with LLM(args.model, args.tp, args.load_format, args.dtype) as llm:
        outputs = llm.generate(args.prompts, args.max_new_tokens, args.ignore_eos)
        print_generation(outputs, llm.load_reports, args.json)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            run_generate(args, parser)
        elif args.command == "demo":
            from shardstate.demo import run_demo

            run_demo(args.max_new_tokens)
    except ShardstateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

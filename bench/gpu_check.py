"""The CUDA load path on a machine with a GPU: `PYTHONPATH=src python3 bench/gpu_check.py --out DIR`.

At TP=1 (one GPU), warm and cold page cache, every load path puts the weights on cuda:0. Checks that every
path's weights are bit-identical to the default loader's and its greedy tokens equal; times each load
against a yardstick (plain reads into a pinned buffer, copied to the GPU); and that `save --quantize` on the
GPU writes exactly what `convert --quantize` writes on the CPU. Writes DIR/gpu.json and prints a markdown
table. Without a GPU it runs the same on the CPU (a smoke check of the script)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file

from shardstate.benchmark import PROMPT, ensure_model, weight_files
from shardstate.benchmark.cache import evict
from shardstate.convert import convert
from shardstate.runtime.llm import LLM

RUNS = [  # (name, load format, io, verify, on the sharded state?)
    ("default", "default", "read", False, False),
    ("sliced", "sliced", "read", False, False),
    ("sharded read", "sharded", "read", False, True),
    ("sharded read + verify", "sharded", "read", True, True),
    ("sharded mmap", "sharded", "mmap", False, True),
    ("sharded direct", "sharded", "direct", False, True),
]


def pinned_copy_seconds(files: list[Path], device: torch.device, chunk: int = 64 << 20) -> float:
    """The yardstick: read every file once into a pinned host buffer and copy each chunk to the device."""
    cuda = device.type == "cuda"
    host = torch.empty(chunk, dtype=torch.uint8, pin_memory=cuda)
    dest = torch.empty(chunk, dtype=torch.uint8, device=device)
    start = time.perf_counter()
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while n := f.readinto(memoryview(host.numpy())):
                dest[:n].copy_(host[:n])
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def h2d_gb_per_s(nbytes: int, device: torch.device, chunk: int = 256 << 20) -> float:
    """Yardstick (a): pinned host memory copied to the device, `nbytes` in all (no reads)."""
    cuda = device.type == "cuda"
    host = torch.ones(chunk, dtype=torch.uint8, pin_memory=cuda)
    dest = torch.empty(chunk, dtype=torch.uint8, device=device)
    dest.copy_(host)  # warm-up (CUDA context, first touch)
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(max(1, nbytes // chunk)):
        dest.copy_(host, non_blocking=True)
    if cuda:
        torch.cuda.synchronize()
    return max(1, nbytes // chunk) * chunk / (time.perf_counter() - start) / 1e9


def threaded_read_gb_per_s(files: list[Path], threads: int, chunk: int = 16 << 20) -> float:
    """Yardstick (b): the node's multi-threaded page-cache read rate: `threads` threads `preadv` the files
    in `chunk` pieces into host memory faulted in beforehand (untimed)."""
    pieces = [(f, at, min(chunk, f.stat().st_size - at)) for f in files for at in range(0, f.stat().st_size, chunk)]
    stride = max((n for _, _, n in pieces), default=0)
    memory = torch.empty(stride * threads, dtype=torch.uint8)
    memory.zero_()
    fds = {f: os.open(f, os.O_RDONLY) for f in files}

    def read(index: int) -> int:
        path, at, n = pieces[index]
        slot = index % threads
        return os.preadv(fds[path], [memoryview(memory.numpy())[slot * stride : slot * stride + n]], at)

    try:
        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            done = sum(pool.map(read, range(len(pieces))))
        return done / (time.perf_counter() - start) / 1e9
    finally:
        for fd in fds.values():
            os.close(fd)


def quantized_save_matches_convert(source: Path, cache: Path) -> dict[str, bool]:
    """`save --quantize` (scales computed on the device) writes the tensors `convert --quantize` (on the CPU)
    writes, bit for bit, for each method."""
    same = {}
    for method in ("int8", "fp8"):
        saved, converted = cache / f"saved-{method}", cache / f"converted-{method}"
        with LLM(source, quantize=method) as llm:
            llm.save_sharded_state(saved, force=True)
        convert(source, converted, 1, force=True, quantize=method, show_progress=False)
        ours, theirs = rank_tensors(saved), rank_tensors(converted)
        same[method] = ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        print(f"save --quantize {method} == convert --quantize {method}: {same[method]}", flush=True)
    return same


def rank_tensors(state: Path) -> dict[str, torch.Tensor]:
    return {key: tensor for path in sorted(state.glob("model-rank-0-part-*.safetensors"))
            for key, tensor in load_file(path).items()}


def warm(files: list[Path]) -> None:
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while f.read(16 << 20):
                pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/shardstate-gpu-check"))
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    source = ensure_model(args.cache, args.smoke)
    sharded = args.cache / f"{source.name}-tp1-ids"
    report = convert(source, sharded, 1, force=True, show_progress=False)
    print(f"convert TP=1: {report.seconds:.2f}s", flush=True)
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                           "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"},
               "model_bytes": sum(f.stat().st_size for f in weight_files(source)), "runs": []}
    reference: dict[str, torch.Tensor] | None = None
    reference_tokens = None
    all_files = weight_files(source) + weight_files(sharded)
    for cache in ("warm", "cold"):
        for name, load_format, io, verify, on_sharded in RUNS:
            directory = sharded if on_sharded else source
            evict(all_files)
            if cache == "warm":
                warm(weight_files(directory))
            with LLM(directory, load_format=load_format, io=io, verify=verify) as llm:
                (output,) = llm.generate([PROMPT], max_new_tokens=8, ignore_eos=True)
                (load,) = llm.load_reports
                weights = llm.rank_state_dicts()[0] if cache == "warm" else None
            if reference is None:
                reference, reference_tokens = weights, output.token_ids
            identical = None if weights is None else (
                weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in weights))
            nbytes = load.bytes_read + load.bytes_mapped
            row = {"name": name, "cache": cache, "seconds": load.seconds, "bytes": nbytes,
                   "gb_per_s": nbytes / load.seconds / 1e9, "weights_identical": identical,
                   "tokens_equal": output.token_ids == reference_tokens, "tokens": output.token_ids}
            results["runs"].append(row)
            print(f"[{cache}] {name}: {load.seconds:.3f}s {row['gb_per_s']:.2f} GB/s "
                  f"weights identical={identical} tokens equal={row['tokens_equal']}", flush=True)
        evict(all_files)
        if cache == "warm":
            warm(weight_files(sharded))
        seconds = pinned_copy_seconds(weight_files(sharded), device)
        results["runs"].append({"name": "yardstick: read + copy to device", "cache": cache, "seconds": seconds,
                                "gb_per_s": results["model_bytes"] / seconds / 1e9})
        print(f"[{cache}] yardstick: {seconds:.3f}s", flush=True)
        if cache == "warm":  # the GPU path's goal: >= 0.8 x the slower of these two, measured here
            warm(weight_files(sharded))
            threads = min(16, os.cpu_count() or 1)
            results["yardsticks"] = {"pinned_h2d_gb_per_s": h2d_gb_per_s(results["model_bytes"], device),
                                     "threaded_read_gb_per_s": threaded_read_gb_per_s(weight_files(sharded), threads),
                                     "read_threads": threads}
            print(f"[warm] yardsticks: {results['yardsticks']}", flush=True)
    results["quantized_save_matches_convert"] = quantized_save_matches_convert(source, args.cache)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(results, indent=1))
    print(f"\n{results['machine']}\n\n| load path (TP=1, to {device}) | warm | cold |\n|---|---|---|")
    for name in [r[0] for r in RUNS] + ["yardstick: read + copy to device"]:
        cells = [next(r for r in results["runs"] if r["name"] == name and r["cache"] == c) for c in ("warm", "cold")]
        print(f"| {name} | " + " | ".join(f"{r['seconds']:.3f}s ({r['gb_per_s']:.2f} GB/s)" for r in cells) + " |")
    yardsticks = results["yardsticks"]
    bound = min(yardsticks["pinned_h2d_gb_per_s"], yardsticks["threaded_read_gb_per_s"])
    ours = next(r for r in results["runs"] if r["name"] == "sharded read" and r["cache"] == "warm")
    results["goal_sharded_read_vs_bound"] = ours["gb_per_s"] / bound
    print(f"\nyardsticks (warm): pinned H2D {yardsticks['pinned_h2d_gb_per_s']:.2f} GB/s, "
          f"{yardsticks['read_threads']}-thread page-cache read {yardsticks['threaded_read_gb_per_s']:.2f} GB/s; "
          f"sharded read / the slower (target >= 0.8): {results['goal_sharded_read_vs_bound']:.2f}")
    (args.out / "gpu.json").write_text(json.dumps(results, indent=1))
    bad = [r["name"] for r in results["runs"] if r.get("weights_identical") is False or r.get("tokens_equal") is False]
    bad += [f"save/convert --quantize {m}" for m, same in results["quantized_save_matches_convert"].items() if not same]
    if bad:
        raise SystemExit(f"error: weights or tokens differ for {bad}")


if __name__ == "__main__":
    main()

"""The same state, loaded and run again, gives bit-identical results (issue 21): every step's whole
next-token distribution (`generate(logprobs=vocab)`) and the first logits, for a dense and an MoE
family at TP=2 and TP=4, two prompts of different lengths batched (left padding) past EOS, from a state
in many small parts (each rank reads many spans into one arena, with several threads). The runs after
the first are hostile: every CPU busy, every allocation poisoned (MALLOC_PERTURB_: memory read before it
is written gives garbage, not zeros that look fine) and the kernel refusing to pre-fault pages (as
Linux < 5.14 does; the engine's fallback once corrupted a byte here and there, differently each run).
SHARDSTATE_DETERMINISM_RUNS=N repeats the hostile run N times (default 1) for a longer stress."""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import checkpoint_maker
from shardstate import LLM
from shardstate.convert import convert
from shardstate.io import engine
from shardstate.io.engine import Span, read_spans
from shardstate.io.reader import ReadAccount

FAMILIES = {  # 4 heads / 2 kv heads: at TP=4 each kv head is on two ranks; vocab 203 (padded per rank)
    "llama": ("LlamaForCausalLM", {}),
    "qwen3-moe": ("Qwen3MoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                          "head_dim": 16, "eos_token_id": 2}),
}
PROMPTS = [[5, 17, 100, 42, 160], [77, 160]]
STEPS = 8
RUNS = int(os.environ.get("SHARDSTATE_DETERMINISM_RUNS", "1"))
POISON = {"MALLOC_PERTURB_": "165", "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}  # every malloc from the heap, poisoned
NO_POPULATE = """import mmap


class _NoPopulate(mmap.mmap):  # a kernel without MADV_POPULATE_READ/WRITE (Linux < 5.14)
    def madvise(self, option, *args):
        if option in (22, 23):
            raise OSError(22, "Invalid argument")
        return super().madvise(option, *args)


mmap.mmap = _NoPopulate
"""


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    """`state(name, tp)`: the family's checkpoint converted at `tp`, in parts of at most 40 kB (each rank
    loads many files: many spans, read by several threads, in one arena)."""
    make = checkpoint_maker(tmp_path_factory, FAMILIES, seed=5)
    made: dict[tuple[str, int], Path] = {}

    def get(name: str, tp: int) -> Path:
        if (name, tp) not in made:
            made[name, tp] = tmp_path_factory.mktemp(f"{name}-tp{tp}") / "state"
            convert(make(name), made[name, tp], tp, max_part_bytes=40_000)
        return made[name, tp]

    return get


def results(llm: LLM) -> list:
    """Per prompt: new tokens, every step's log-probabilities of the whole vocabulary, first logits' bytes."""
    outputs = llm.generate(PROMPTS, max_new_tokens=STEPS, ignore_eos=True, logprobs=llm.config.vocab_size)
    return [(o.token_ids, o.logprobs, o.logits.numpy().tobytes()) for o in outputs]


def difference(got: list, reference: list) -> str | None:
    """Where `got` first differs from `reference` (both `results`), in words; None where bit-identical."""
    for row, (mine, ref) in enumerate(zip(got, reference, strict=True)):
        (tokens, steps, first), (ref_tokens, ref_steps, ref_first) = mine, ref
        for step, (top, ref_top) in enumerate(zip(steps, ref_steps, strict=True)):
            if top != ref_top:
                ref_values = dict(ref_top)
                most = max(abs(value - ref_values[token]) for token, value in top)
                return (f"prompt {row}, step {step}: log-probabilities differ by up to {most:.3g} "
                        f"(tokens {tokens}, first run {ref_tokens})")
        if (tokens, first) != (ref_tokens, ref_first):
            return f"prompt {row}: tokens {tokens} or first logits differ from the first run's ({ref_tokens})"
    return None


@contextlib.contextmanager
def busy_cpus() -> Iterator[None]:
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


@contextlib.contextmanager
def hostile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Workers started inside see every CPU busy, poisoned allocations and no MADV_POPULATE (a
    sitecustomize on their PYTHONPATH)."""
    (tmp_path / "sitecustomize.py").write_text(NO_POPULATE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    for key, value in POISON.items():
        monkeypatch.setenv(key, value)
    with busy_cpus():
        yield


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("name", FAMILIES)
def test_every_run_gives_the_same_logits(state, tmp_path, monkeypatch, name, tp):
    path = state(name, tp)
    with LLM(path, tensor_parallel_size=tp) as llm:
        reference = results(llm)
        assert (diff := difference(results(llm), reference)) is None, f"a second generate, same workers: {diff}"
    assert len({t for tokens, _, _ in reference for t in tokens}) > 3  # tokens vary: the comparison means something
    with hostile(tmp_path, monkeypatch):
        for run in range(RUNS):
            with LLM(path, tensor_parallel_size=tp, io_threads=4) as llm:
                assert (diff := difference(results(llm), reference)) is None, f"hostile run {run}: {diff}"


def test_generate_json_prints_the_apis_logprobs_exactly(state):
    path = state("llama", 2)
    with LLM(path, tensor_parallel_size=2) as llm:
        outputs = llm.generate(PROMPTS, max_new_tokens=3, ignore_eos=True, logprobs=4)
    assert all(step[0][0] == token for o in outputs for step, token in zip(o.logprobs, o.token_ids, strict=True))
    prompts = [arg for prompt in PROMPTS for arg in ("--prompt-ids", ",".join(map(str, prompt)))]
    result = subprocess.run([sys.executable, "-m", "shardstate.command", "generate", str(path), "--tp", "2", *prompts,
                             "--max-new-tokens", "3", "--ignore-eos", "--json", "--logprobs", "4"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)["outputs"]
    assert [o["logprobs"] for o in printed] == [[[list(pair) for pair in step] for step in o.logprobs] for o in outputs]


class NoPopulate(mmap.mmap):
    def madvise(self, *args: int) -> None:
        raise OSError(22, "Invalid argument")  # what Linux < 5.14 says to MADV_POPULATE_WRITE


@pytest.mark.parametrize("populate", ["madvise", "fallback"])
def test_read_spans_gives_the_file_bytes(tmp_path, monkeypatch, populate):
    """Several spans in one arena (regions 64-byte aligned: a page can hold the end of one and the start
    of the next), small chunks read by several threads. Pre-faulting a chunk's pages must not write into
    bytes that another chunk has read (the fallback once zeroed the first byte of such a page)."""
    if populate == "fallback":
        monkeypatch.setattr(engine.mmap, "mmap", NoPopulate)
    monkeypatch.setattr(engine, "CHUNK", 64 << 10)
    data = [os.urandom(size) for size in (300_001, 200_003, 250_007)]
    for n, content in enumerate(data):
        (tmp_path / f"f{n}").write_bytes(content)
    spans = [Span(tmp_path / f"f{n}", 5 + n, len(content) - 3) for n, content in enumerate(data)]
    for _ in range(3):
        with ReadAccount() as account:
            memory = read_spans(spans, "read", account, threads=4)
        for span, content, tensor in zip(spans, data, memory, strict=True):
            assert tensor.numpy().tobytes() == content[span.start : span.end], span.path.name

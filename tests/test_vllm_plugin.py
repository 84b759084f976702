"""vLLM's `--load-format shardstate` (run by `make test-vllm`; skipped where vLLM is not importable).

References, all vLLM's own: its greedy tokens with `load_format="auto"` on the same checkpoint, and its
parameters right after the default loader filled them (peers/vllm-dumppre). Every shardstate path (a miss,
a hit, a given state) must give those tokens, and what it put into vLLM's parameters (dumped before
post-processing by tests/vllm_plugins/shardstate_dumpafter) must equal the default loader's, key by key and
bit for bit. The cache entry a miss writes must hold exactly those tensors too."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from conftest import S3_BUCKET
from rank_files import rank_file_differences
from shardstate.convert import convert
from shardstate.synthetic import make_checkpoint
from test_vllm_interop import BASE, DUMPPRE, FAMILIES, PEER, TP, prompt_args
from test_vllm_quantized import compressed_tensors_checkpoint

pytestmark = pytest.mark.vllm
DUMPAFTER = Path(__file__).resolve().parent / "vllm_plugins"
BIN = Path(sys.executable).parent
CASES = {  # id: (architecture, config overrides)
    "llama-tied": FAMILIES["llama-tied"][:2],
    "qwen2-moe": FAMILIES["qwen2-moe"][:2],
    # not among shardstate's families: its entry is opaque (no specs), and still loads and verifies
    "gemma": ("GemmaForCausalLM", {"head_dim": 64}),
}
HIT = re.compile(r"shardstate: hit (\S+): rank (\d+) read (\d+) bytes in (\d+) files")
STATE = re.compile(r"shardstate: state (\S+): rank (\d+) read (\d+) bytes in (\d+) files"
                   r".*?(?:, (\d+) of them fetched|$)", re.MULTILINE)


def run_vllm(model: Path, *args: str, dump: Path | None = None, load_format: str = "shardstate_dumpafter",
             extra: dict | None = None, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """vllm_peer.py generate (one JSON line with the tokens), with shardstate's load format and the dump-after
    plugin, or `load_format="dumppre"` (vLLM's default loader, dumped)."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join(filter(None, [str(DUMPAFTER), str(DUMPPRE),
                                                                                     os.environ.get("PYTHONPATH")]))}
    env["VLLM_PLUGINS"] = "shardstate_dumpafter,vllm_dumppre"
    if dump is not None:
        env["DUMP_DIR"] = str(dump)
    command = [sys.executable, str(PEER), "generate", str(model), "--tp", str(TP), "--load-format", load_format,
               *prompt_args(), *args]
    if extra is not None:
        command += ["--extra-config", json.dumps(extra)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    if check:
        assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    return result


def tokens(result: subprocess.CompletedProcess) -> list[list[int]]:
    (line,) = [ln for ln in result.stdout.splitlines() if ln.startswith('{"')]
    return json.loads(line)["outputs"]


def logged(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


@pytest.fixture(scope="module", params=list(CASES))
def case(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, case) -> Path:
    architecture, overrides = CASES[case]
    return make_checkpoint(tmp_path_factory.mktemp(case) / "hf", architecture, seed=3, initializer_range=0.15,
                           **{**BASE, **overrides})


@pytest.fixture(scope="module")
def auto(checkpoint) -> tuple[list[list[int]], Path]:
    """vLLM's tokens with its default loader, and its parameters as that loader filled them."""
    dump = checkpoint.parent / "auto-dump"
    result = run_vllm(checkpoint, dump=dump, load_format="dumppre")
    assert len({t for seq in tokens(result) for t in seq}) > 3  # tokens vary: comparing them means something
    return tokens(result), dump


def only_entry(cache: Path) -> Path:
    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    return entry


def test_miss_then_hit_give_vllms_weights_and_tokens(auto, checkpoint, case):
    reference, auto_dump = auto
    cache = checkpoint.parent / "cache"
    miss = run_vllm(checkpoint, dump=checkpoint.parent / "miss-dump", extra={"cache_dir": str(cache)})
    assert tokens(miss) == reference
    assert "shardstate: miss" in logged(miss)
    assert rank_file_differences(checkpoint.parent / "miss-dump", auto_dump, TP) == []
    entry = only_entry(cache)
    assert rank_file_differences(entry, auto_dump, TP) == []  # the entry holds vLLM's pre-processing state
    verified = subprocess.run([BIN / "shardstate", "cache", "verify", "--cache-dir", cache], capture_output=True,
                              text=True, timeout=300)
    assert verified.returncode == 0, verified.stderr
    hit = run_vllm(checkpoint, dump=checkpoint.parent / "hit-dump", extra={"cache_dir": str(cache)})
    assert tokens(hit) == reference
    assert rank_file_differences(checkpoint.parent / "hit-dump", auto_dump, TP) == []
    reads = {int(m[2]): (m[1], int(m[3]), int(m[4])) for m in HIT.finditer(logged(hit))}
    assert sorted(reads) == list(range(TP)), logged(hit)[-3000:]
    for rank, (where, nbytes, files) in reads.items():  # each rank read its own files of the entry, nothing else
        own = sorted(entry.glob(f"model-rank-{rank}-part-*.safetensors"))
        assert (where, nbytes, files) == (str(entry), sum(p.stat().st_size for p in own), len(own))
    manifest = json.loads((entry / "shardstate.json").read_text())
    opaque = [n for n, r in manifest["tensors"]["0"].items() if r["spec"] is None]
    if case == "gemma":  # no specs: loadable by name in vLLM only
        assert opaque
    else:  # shardstate's own family: the entry is a state shardstate loads (and reshards) too
        assert opaque == []
        ours = subprocess.run([BIN / "shardstate", "generate", entry, "--tp", str(TP), "--ignore-eos", "--json",
                               "--max-new-tokens", "8", *prompt_args()], capture_output=True, text=True, timeout=300)
        assert ours.returncode == 0, ours.stderr
        assert [o["token_ids"] for o in json.loads(ours.stdout)["outputs"]] == reference


def test_a_damaged_entry_is_named_loaded_around_and_rebuilt(auto, checkpoint, case, tmp_path):
    if case != "llama-tied":
        pytest.skip("one family is enough")
    reference, auto_dump = auto
    cache = tmp_path / "cache"
    run_vllm(checkpoint, extra={"cache_dir": str(cache)}, load_format="shardstate")
    damaged = only_entry(cache) / "model-rank-1-part-0.safetensors"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x04
    damaged.write_bytes(bytes(data))
    again = run_vllm(checkpoint, dump=tmp_path / "dump", extra={"cache_dir": str(cache)})
    assert tokens(again) == reference
    assert rank_file_differences(tmp_path / "dump", auto_dump, TP) == []
    warnings = [ln for ln in logged(again).splitlines() if "is damaged or incomplete" in ln]
    assert len(warnings) == 1 and "does not match its checksum" in warnings[0], warnings
    verified = subprocess.run([BIN / "shardstate", "cache", "verify", "--cache-dir", cache], capture_output=True,
                              text=True, timeout=300)
    assert verified.returncode == 0, verified.stdout + verified.stderr  # rebuilt
    hit = run_vllm(checkpoint, extra={"cache_dir": str(cache)}, load_format="shardstate")
    assert tokens(hit) == reference and len(HIT.findall(logged(hit))) == TP


def test_two_servers_starting_together_on_an_empty_cache(auto, checkpoint, case, tmp_path):
    if case != "llama-tied":
        pytest.skip("one family is enough")
    reference, _ = auto
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(DUMPAFTER), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, str(PEER), "generate", str(checkpoint), "--tp", str(TP), "--load-format", "shardstate",
               *prompt_args(), "--extra-config", json.dumps({"cache_dir": str(cache)})]
    servers = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for _ in range(2)]
    results = [subprocess.CompletedProcess(command, s.wait(timeout=600), *s.communicate()) for s in servers]
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
        assert tokens(result) == reference
    only_entry(cache)
    assert [p.name for p in cache.iterdir() if ".building-" in p.name or ".probe-" in p.name] == []
    listed = subprocess.run([BIN / "shardstate", "cache", "list", "--json", "--cache-dir", cache],
                            capture_output=True, text=True, timeout=120)
    (info,) = json.loads(listed.stdout)["entries"]
    assert info["complete"], info
    assert subprocess.run([BIN / "shardstate", "cache", "verify", "--cache-dir", cache]).returncode == 0


def test_a_given_state_loads_and_one_at_another_tp_is_refused(auto, checkpoint, case, tmp_path):
    if case == "gemma":
        pytest.skip("shardstate cannot convert a model it has no family for")
    reference, auto_dump = auto
    convert(checkpoint, tmp_path / "tp2", TP)
    given = run_vllm(checkpoint, dump=tmp_path / "dump", extra={"state": str(tmp_path / "tp2")})
    assert tokens(given) == reference
    assert rank_file_differences(tmp_path / "dump", auto_dump, TP) == []
    assert f"shardstate: state {tmp_path / 'tp2'}: rank 1 read" in logged(given)
    convert(checkpoint, tmp_path / "tp1", 1)
    refused = run_vllm(checkpoint, extra={"state": str(tmp_path / "tp1")}, load_format="shardstate", check=False)
    assert refused.returncode != 0
    lines = [ln for ln in logged(refused).splitlines() if "error: saved for TP=1, running TP=2" in ln]
    assert lines and "shardstate convert" in lines[0], logged(refused)[-3000:]


def test_unknown_options_are_one_line(checkpoint, case):
    if case != "llama-tied":
        pytest.skip("one family is enough")
    refused = run_vllm(checkpoint, extra={"cache_dirr": "/tmp/x"}, load_format="shardstate", check=False)
    assert refused.returncode != 0
    assert "error: unknown option 'cache_dirr' of --load-format shardstate" in logged(refused)
    inside = run_vllm(checkpoint, extra={"cache_dir": str(checkpoint / "cache")}, load_format="shardstate",
                      check=False)
    assert inside.returncode != 0 and "error: cache_dir is inside the model directory" in logged(inside)
    assert not (checkpoint / "cache").exists()


def test_int8_compressed_tensors_miss_and_hit(tmp_path):
    """A quantized model in vLLM (compressed-tensors int8, W8A8 on the CPU build): the entry holds its int8
    weights and scales as vLLM's default loader filled them, and the hit gives its tokens."""
    architecture, overrides = FAMILIES["llama"][:2]
    source = make_checkpoint(tmp_path / "hf", architecture, seed=3, initializer_range=0.15, **{**BASE, **overrides})
    quantized = compressed_tensors_checkpoint(source, tmp_path / "int8", "int8")
    auto = run_vllm(quantized, "--dtype", "bfloat16", dump=tmp_path / "auto-dump", load_format="dumppre")
    cache = tmp_path / "cache"
    miss = run_vllm(quantized, "--dtype", "bfloat16", dump=tmp_path / "miss-dump", extra={"cache_dir": str(cache)})
    hit = run_vllm(quantized, "--dtype", "bfloat16", dump=tmp_path / "hit-dump", extra={"cache_dir": str(cache)})
    assert tokens(miss) == tokens(hit) == tokens(auto)
    assert len(HIT.findall(logged(hit))) == TP
    for dump in ("miss-dump", "hit-dump"):
        assert rank_file_differences(tmp_path / dump, tmp_path / "auto-dump", TP) == []
    manifest = json.loads((only_entry(cache) / "shardstate.json").read_text())
    assert {r["dtype"] for r in manifest["tensors"]["0"].values()} >= {"I8", "F32", "BF16"}


def test_a_state_in_s3_each_rank_fetching_its_own_files(auto, checkpoint, case, server, tmp_path):
    if case != "llama-tied":
        pytest.skip("one family is enough")
    reference, auto_dump = auto
    convert(checkpoint, tmp_path / "tp2", TP)
    url = f"s3://{S3_BUCKET}/plugin-{case}"
    env = {**server.env(), "SHARDSTATE_CACHE_DIR": str(tmp_path / "node-cache")}
    uploaded = subprocess.run([BIN / "shardstate", "upload", tmp_path / "tp2", url], capture_output=True, text=True,
                              timeout=300, env={**os.environ, **env})
    assert uploaded.returncode == 0, uploaded.stderr
    given = run_vllm(checkpoint, dump=tmp_path / "dump", extra={"state": url}, env=env)
    assert tokens(given) == reference
    assert rank_file_differences(tmp_path / "dump", auto_dump, TP) == []
    fetched = {int(m[2]): (m[1], int(m[5] or 0)) for m in STATE.finditer(logged(given))}
    assert sorted(fetched) == list(range(TP)), logged(given)[-3000:]
    for rank, (where, nbytes) in fetched.items():  # each rank fetched its own files, whole, and nothing else
        own = sorted((tmp_path / "tp2").glob(f"model-rank-{rank}-part-*.safetensors"))
        assert (where, nbytes) == (url, sum(p.stat().st_size for p in own))
    # vLLM's workers wrote them into the node cache in the background, and their exit waited for it
    (cached,) = (tmp_path / "node-cache").iterdir()
    assert not [p.name for p in cached.iterdir() if ".fetch-" in p.name]
    for path in (tmp_path / "tp2").glob("model-rank-*.safetensors"):
        assert (cached / path.name).read_bytes() == path.read_bytes(), path.name

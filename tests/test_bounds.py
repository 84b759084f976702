"""Bounded before allocating: an absurd number on the command line or in config.json is refused with one line
before a layer is built, a worker started or a KV cache allocated."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shardstate.cli import build_parser
from shardstate.errors import ShardstateError
from shardstate.models import build_on_meta, check_generation_fits, load_config
from shardstate.models.decoder import KVCache
from shardstate.parallel.distributed import TPGroup
from shardstate.runtime.llm import LLM
from shardstate.runtime.torchrun import generate_under_torchrun
from test_cli import edit_config

BIN = Path(sys.executable).parent

# Sizes every bound lets through whose parameters (~230 TB at fp32) no host holds.
HUGE_BUT_BOUNDED = {
    "vocab_size": 1 << 24, "hidden_size": 1 << 16, "intermediate_size": 1 << 20, "num_hidden_layers": 256,
    "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 1024,
}


def shardstate(*args: str) -> subprocess.CompletedProcess:
    """The installed command on the CPU (the host-memory bounds are CPU-only); a hang fails."""
    return subprocess.run([str(BIN / "shardstate"), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


# Runs `shardstate.cli.main` on each argument list in one process (each `shardstate` run mostly imports torch)
# and prints [[exit code, stderr], ...]; an exception main lets out is recorded with its traceback.
CASE_RUNNER = """
import contextlib, io, json, sys, traceback
from shardstate.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
        except BaseException:
            code, err = None, io.StringIO(traceback.format_exc())
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def run_cases(argvs: list[list[str]]) -> list[tuple[int | None, str]]:
    """(exit code, stderr) of the CLI on each argument list; a hang fails."""
    done = subprocess.run([sys.executable, "-c", CASE_RUNNER, json.dumps(argvs)], capture_output=True, text=True,
                          timeout=60, check=True)
    return [tuple(r) for r in json.loads(done.stdout)]


USAGE_CASES = [  # (arguments, the one usage error line expected)
    (["convert", "src", "out", "--tp", "0"], "convert: error: argument --tp: '0' is not an integer from 1 to 1024"),
    (["convert", "src", "out", "--tp", "1000000000"], "argument --tp: '1000000000' is not an integer from 1"),
    (["convert", "src", "out", "--tp", "2", "--max-part-size", "inf"], "argument --max-part-size: 'inf' is not"),
    (["convert", "src", "out", "--tp", "2", "--max-part-size", "nan"], "argument --max-part-size: 'nan' is not"),
    (["convert", "src", "out", "--tp", "2", "--max-part-size", "0"], "argument --max-part-size: '0' is not"),
    (["convert", "src", "out", "--tp", "2", "--max-part-size=-5MB"], "argument --max-part-size: '-5MB' is not"),
    (["convert", "src", "out", "--tp", "2", "--max-part-size", "2000000GiB"], "from 1 byte to 1PiB"),
    (["save", "src", "out", "--tp", "0"], "save: error: argument --tp: '0' is not an integer from 1 to 1024"),
    (["save", "src", "out", "--tp", "2", "--io-threads", "65"], "argument --io-threads: '65' is not an integer"),
    (["generate", "m", "--prompt-ids", "1", "--tp", "1000000000"], "generate: error: argument --tp: '1000000000'"),
    (["generate", "m", "--prompt-ids", "1", "--timeout", "1e12"], "argument --timeout: '1e12' is not a number of "
                                                                  "seconds from 1 to 86400"),
    (["generate", "m", "--prompt-ids", "1", "--timeout", "inf"], "argument --timeout: 'inf' is not"),
    (["generate", "m", "--prompt-ids", "1", "--timeout", "0.001"], "argument --timeout: '0.001' is not"),
    (["generate", "m", "--prompt-ids", "1", "--io-threads", "0"], "argument --io-threads: '0' is not an integer "
                                                                  "from 1 to 64"),
    (["generate", "m", "--prompt-ids", "1", "--io-threads", "-1"], "argument --io-threads: '-1' is not"),
    (["generate", "m", "--prompt-ids", "1", "--io-threads", "1000000"], "argument --io-threads: '1000000' is not"),
    (["generate", "m", "--prompt-ids", "1", "--max-new-tokens", "-1"], "argument --max-new-tokens: '-1' is not an "
                                                                       "integer from 0 to 1048576"),
    (["generate", "m", "--prompt-ids", "1", "--max-new-tokens", "1000000000000"], "argument --max-new-tokens: "),
    (["demo", "--max-new-tokens", "-1"], "demo: error: argument --max-new-tokens: '-1' is not"),
    (["demo", "--max-new-tokens", "1000000000000"], "demo: error: argument --max-new-tokens: '1000000000000'"),
    (["bench", "--tp", "1", "0"], "bench: error: argument --tp: '0' is not an integer from 1 to 1024"),
]


@pytest.fixture(scope="module")
def usage_results() -> list[tuple[int | None, str]]:
    return run_cases([args for args, _ in USAGE_CASES])


@pytest.mark.parametrize("case", range(len(USAGE_CASES)), ids=[" ".join(a) for a, _ in USAGE_CASES])
def test_bad_number_is_a_usage_error(usage_results, case):
    args, expected = USAGE_CASES[case]
    code, stderr = usage_results[case]
    assert code == 2, stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert errors == [stderr.strip().splitlines()[-1]]
    assert errors[0].startswith(f"shardstate {args[0]}: error: ") and expected in errors[0], errors[0]
    assert "Traceback" not in stderr


def test_usage_error_from_the_installed_command():
    result = shardstate("convert", "src", "out", "--tp", "2", "--max-part-size", "inf")  # was an OverflowError
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "shardstate convert: error: argument --max-part-size: 'inf' is not a size from 1 byte to 1PiB")
    assert "Traceback" not in result.stderr


CONFIG_CASES = [  # (config.json changes, the start of the error after "error: ")
    ({"num_hidden_layers": 10**9}, "'num_hidden_layers' is 1000000000, above shardstate's limit of 4096"),
    ({"hidden_size": 10**12}, "'hidden_size' is 1000000000000, above shardstate's limit of 131072"),
    ({"intermediate_size": 10**9}, "'intermediate_size' is 1000000000, above"),
    ({"vocab_size": 10**9}, "'vocab_size' is 1000000000, above"),
    ({"vocab_size": None}, "'vocab_size' is missing"),
    ({"num_attention_heads": 10**6}, "'num_attention_heads' is 1000000, above"),
    ({"num_key_value_heads": -2}, "'num_key_value_heads' is -2, not a positive integer"),
    ({"num_key_value_heads": 1.5}, "'num_key_value_heads' is 1.5, not a positive integer"),
    ({"head_dim": 10**6}, "'head_dim' is 1000000, above"),
    ({"head_dim": 15}, "'head_dim' is 15, not even"),
    ({"max_position_embeddings": 0}, "'max_position_embeddings' is 0, not a positive integer"),
    ({"rms_norm_eps": "x"}, "'rms_norm_eps' is 'x', not a finite positive number"),
    ({"rms_norm_eps": True}, "'rms_norm_eps' is True, not a finite positive number"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}}, "'rope_theta' is -1.0, not a finite"),
    ({"eos_token_id": "a"}, "'eos_token_id' is 'a', not a token id or a list of them in [0, 203)"),
    ({"eos_token_id": [2, 10**6]}, "'eos_token_id' is [2, 1000000], not a token id"),
    ({"tie_word_embeddings": "yes"}, "'tie_word_embeddings' is 'yes', not true or false"),
    ({"attention_bias": "false"}, "'attention_bias' is 'false', not true or false"),
    ({"dtype": "float8_e4m3fn"}, "'dtype' is 'float8_e4m3fn', not float32, float16 or bfloat16"),  # not ignored
    ({"dtype": None, "torch_dtype": 16}, "'torch_dtype' is 16, not float32"),
]


@pytest.fixture(scope="module")
def config_results(checkpoints, tmp_path_factory) -> list[tuple[int | None, str]]:
    root = tmp_path_factory.mktemp("bad-configs")
    dirs = [edit_config(checkpoints["gqa_untied"], root / str(n), **changes)
            for n, (changes, _) in enumerate(CONFIG_CASES)]
    return run_cases([["generate", str(d), "--tp", "1", "--prompt-ids", "1,2"] for d in dirs])


@pytest.mark.parametrize("case", range(len(CONFIG_CASES)), ids=[json.dumps(c) for c, _ in CONFIG_CASES])
def test_absurd_config_is_one_error_line(config_results, case):
    code, stderr = config_results[case]
    assert code == 1, stderr
    (line,) = stderr.strip().splitlines()
    assert line.startswith("error: " + CONFIG_CASES[case][1]), line
    assert line.endswith("config.json: repair config.json"), line


def test_prompt_past_max_positions_is_refused(checkpoints):
    result = shardstate("generate", str(checkpoints["gqa_untied"]), "--tp", "1", "--prompt-ids", "1,2,3,4,5,6,7,8,9",
                        "--max-new-tokens", "1000000")
    assert result.returncode == 1, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: prompt of 9 tokens + --max-new-tokens 1000000 = 1000009 positions, beyond "
                           "max_position_embeddings=256 in "), line
    assert line.endswith("config.json: ask for fewer new tokens or a shorter prompt"), line


@pytest.fixture(scope="module")
def huge_model(checkpoints, tmp_path_factory) -> Path:
    return edit_config(checkpoints["gqa_untied"], tmp_path_factory.mktemp("huge") / "m", **HUGE_BUT_BOUNDED)


def test_model_larger_than_the_host_is_refused_before_workers_start(huge_model, monkeypatch):
    result = shardstate("generate", str(huge_model), "--tp", "1", "--prompt-ids", "1,2")
    assert result.returncode == 1, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: the model needs 229798.1 GB per rank at TP=1 (float32), this host has "), line
    assert line.endswith("config.json: use a larger --tp or a smaller --dtype"), line

    def no_workers(*args, **kwargs):
        raise AssertionError("a worker was started")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(multiprocessing, "get_context", no_workers)
    with pytest.raises(ShardstateError, match=r"114899.1 GB per rank at TP=2 \(float32\), 229798.2 GB for the 2 "
                                              r"ranks on this host, which has"):
        LLM(huge_model, tensor_parallel_size=2)


def test_real_model_sizes_fit_the_bounds(tmp_path):
    models = {  # config.json sizes of released models, as Llama-family configs
        "llama-3.1-405b": {"vocab_size": 128256, "hidden_size": 16384, "intermediate_size": 53248,
                           "num_hidden_layers": 126, "num_attention_heads": 128, "num_key_value_heads": 8,
                           "max_position_embeddings": 131072, "rope_theta": 500000.0,
                           "eos_token_id": [128001, 128008, 128009]},
        "qwen2.5-72b": {"vocab_size": 152064, "hidden_size": 8192, "intermediate_size": 29568,
                        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                        "max_position_embeddings": 131072, "rope_theta": 1000000.0, "eos_token_id": 151645},
        "mixtral-8x22b": {"vocab_size": 32768, "hidden_size": 6144, "intermediate_size": 16384,
                          "num_hidden_layers": 56, "num_attention_heads": 48, "num_key_value_heads": 8,
                          "max_position_embeddings": 65536},
    }
    for name, sizes in models.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], **sizes}))
        config = load_config(tmp_path / name)
        assert (config.num_hidden_layers, config.max_position_embeddings) == (
            sizes["num_hidden_layers"], sizes["max_position_embeddings"])
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text(json.dumps(
        {"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
         "num_hidden_layers": 1, "num_attention_heads": 2}))
    assert load_config(tmp_path / "bare").max_position_embeddings == 2048  # transformers' default


@pytest.mark.parametrize("tp", [1, 2, 4])  # 4 > num_key_value_heads=2: kv heads are replicated
def test_kv_cache_estimate_is_what_the_model_allocates(checkpoints, tp):
    config = load_config(checkpoints["gqa_untied"])
    model = build_on_meta(config, TPGroup(0, tp), torch.bfloat16)
    cache = KVCache.allocate(model, 3, 77)
    allocated = sum(t.numel() * t.element_size() for t in cache.keys + cache.values)
    assert config.kv_cache_bytes(tp, 3, 77, torch.bfloat16) == allocated


def test_kv_cache_beyond_available_memory_is_refused(checkpoints, tmp_path, monkeypatch):
    config = load_config(edit_config(checkpoints["gqa_untied"], tmp_path / "m", max_position_embeddings=1 << 20))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("shardstate.memory.available_memory_bytes", lambda: 1 << 30)
    prompts = [[1, 2, 3]] * 4
    check_generation_fits(config, prompts, 1000, 2, torch.float32, ranks_here=2)  # 4 x 1003 positions: 2 MB
    with pytest.raises(ShardstateError, match=r"KV cache for 4 prompt\(s\) x 1000003 positions needs 2.0 GB on "
                                              r"this host, which has 1.1 GB available in .*config.json: ask for"):
        check_generation_fits(config, prompts, 1_000_000, 2, torch.float32, ranks_here=2)


def test_torchrun_rank_refuses_before_joining_the_group(checkpoints, huge_model, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("WORLD_SIZE", "1")
    too_long = ["generate", str(checkpoints["gqa_untied"]), "--prompt-ids", "1,2", "--max-new-tokens", "300"]
    with pytest.raises(ShardstateError, match=r"prompt of 2 tokens \+ --max-new-tokens 300 = 302 positions"):
        generate_under_torchrun(build_parser().parse_args(too_long))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ShardstateError, match=r"229798\.2 GB for the 2 ranks on this host"):
        generate_under_torchrun(build_parser().parse_args(["generate", str(huge_model), "--prompt-ids", "1"]))


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        ({"tensor_parallel_size": 4 * (os.cpu_count() or 1) + 1}, "ranks per CPU core on this host"),
        ({"io_threads": 0}, "io_threads=0 is not an integer from 1 to 64"),
        ({"io_threads": 65}, "io_threads=65 is not an integer from 1 to 64"),
        ({"io_threads": "4"}, "io_threads='4' is not an integer"),
        ({"timeout": 0}, "timeout 0 is not a positive number of seconds from 1 to 86400"),
        ({"timeout": 0.5}, "timeout 0.5 is not a positive number of seconds"),
        ({"timeout": float("inf")}, "timeout inf is not"),
        ({"timeout": float("nan")}, "timeout nan is not"),
        ({"timeout": 1e12}, "timeout 1000000000000.0 is not"),
    ],
)
def test_library_gets_the_cli_bounds(checkpoints, monkeypatch, kwargs, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ShardstateError, match=expected.replace("(", r"\(")):
        LLM(checkpoints["gqa_untied"], **kwargs)


def test_more_ranks_than_gpus_is_refused(checkpoints, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ShardstateError, match="TP size 4 needs 4 GPUs, this host has 2: use --tp 2 or less"):
        LLM(checkpoints["gqa_untied"], tensor_parallel_size=4)

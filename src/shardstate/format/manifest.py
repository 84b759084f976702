"""shardstate.json: what a sharded-state directory holds, written last so that its presence means the
directory is complete.

The manifest is read against an explicit schema: every field's type and range, the keys required and
no others, cross-checks (each file's name is the pattern at its rank and part; every rank 0..tp*pp-1 has
parts 0..n-1; each tensor lies in a file of its own rank; specs parse and give the recorded shape). A
wrong field is one ShardstateError naming it, found before anything is allocated from its values.

At PP>1 a file's `rank` is its world rank, pp * tp_size + tp (vLLM's order), and its record also holds
`pp` and `tp`; its name is vLLM's PP pattern. A PP=1 manifest is exactly what it was before PP."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import string
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from shardstate.errors import ShardstateError, brief
from shardstate.format.safetensors_header import DTYPES
from shardstate.format.strict_json import loads_strict
from shardstate.io.files import read_regular
from shardstate.parallel.pipeline import MAX_PP
from shardstate.spec import MAX_TP, ShardSpec, spec_from_json

MANIFEST_NAME = "shardstate.json"
FORMAT_NAME = "shardstate"
FORMAT_VERSION = 2  # written; 1 is still read (specs joined on dim 0, no regions or experts)
READ_VERSIONS = (1, 2)
PP1_PATTERN = "model-rank-{rank}-part-{part}.safetensors"  # vLLM's, so vLLM can load the files
PP_PATTERN = "model-pp-{pp}-tp-{tp}-part-{part}.safetensors"  # vLLM's at PP>1 (its {pp_rank}, {tp_rank})
CHECKSUM = "crc32"
CONSTANT_KIND = "constant"  # a tensor vLLM's loader needs, every element `value` (its F32 scale scalars)
CONSTANT_SHAPES = ([], [1])
WRITER = "shardstate"
QUANT_WEIGHT_DTYPES = {"int8": "I8", "fp8": "F8_E4M3"}  # quantization method -> its weights' dtype
QUANT_SCALES = "per-output-channel"  # F32 `<weight>_scale` [..., N, 1] over each whole row

MAX_MANIFEST_BYTES = 64 << 20
MAX_PARTS_PER_RANK = 1 << 16
MAX_FILE_BYTES = 1 << 50
MAX_LIST = 1 << 16  # source files, side files
MAX_PATTERN = 200
HEX32 = re.compile(r"[0-9a-f]{32}")
HEX64 = re.compile(r"[0-9a-f]{64}")
HEX16 = re.compile(r"[0-9a-f]{16}")
FIELDS = ("format", "version", "checksum", "state_id", "tp_size", "pp_size", "pattern", "architecture",
          "config_sha256", "dtype", "quantization", "source", "side_files", "files", "tensors")
FILE_FIELDS = {"rank", "part", "size", "crc32"}
PP_FILE_FIELDS = FILE_FIELDS | {"pp", "tp"}
TENSOR_FIELDS = {"file", "dtype", "shape", "global_shape", "spec", "xxh3_64"}
TODO = "re-create the sharded state (shardstate convert or save)"


@dataclass
class Manifest:
    state_id: str  # state_id_of(this manifest), also in every rank file's metadata (older states: random)
    tp_size: int
    architecture: str
    config_sha256: str
    dtype: str
    source: list[dict]  # [{"name", "size"}] of the checkpoint converted from
    side_files: list[str]  # copied unchanged from the source (config.json, tokenizer files...)
    files: dict[str, dict]  # name -> {"rank", "part", "size", "crc32"}
    tensors: dict[str, dict[str, dict]]  # rank -> name -> {"file", "dtype", "shape", "global_shape", ...}
    pp_size: int = 1
    pattern: str = PP1_PATTERN
    quantization: dict | None = None  # {"method": "int8" | "fp8", "scales": QUANT_SCALES}
    version: int = FORMAT_VERSION  # as read (a state written by an older shardstate keeps its version)
    # rank -> name -> the parameter's spec, as parsed when the manifest was read (not written: `tensors` holds it)
    specs: dict[str, dict[str, ShardSpec]] = field(default_factory=dict, repr=False, compare=False)

    def to_json(self) -> dict:
        return {
            "format": FORMAT_NAME, "version": self.version, "checksum": CHECKSUM, "state_id": self.state_id,
            "tp_size": self.tp_size, "pp_size": self.pp_size, "pattern": self.pattern,
            "architecture": self.architecture, "config_sha256": self.config_sha256, "dtype": self.dtype,
            "quantization": self.quantization, "source": self.source, "side_files": self.side_files,
            "files": self.files, "tensors": self.tensors,
        }

    @property
    def world_size(self) -> int:
        """Ranks (each with its own files): tp_size * pp_size."""
        return self.tp_size * self.pp_size

    def rank_files(self, rank: int) -> list[str]:
        """Rank `rank`'s file names in part order."""
        return self._by_rank.get(rank, [])

    @functools.cached_property
    def _by_rank(self) -> dict[int, list[str]]:
        by_rank: dict[int, list[str]] = {}
        for name in sorted(self.files, key=lambda n: self.files[n]["part"]):
            by_rank.setdefault(self.files[name]["rank"], []).append(name)
        return by_rank

    def names_written(self) -> set[str]:
        """Every entry of the directory that shardstate wrote: what `--force` may replace."""
        return {MANIFEST_NAME, *self.files, *self.side_files}


PENDING_STATE_ID = "0" * 32  # in a rank file's metadata until the state is complete and its id is known


def state_id_of(manifest: Manifest) -> str:
    """The id of the state a manifest describes: a digest of everything it says (format version, layout,
    architecture, config.json's digest, dtype, quantization, the checkpoint the state was made from, every
    file's size and every tensor's place, spec and xxh3 digest of its bytes) but the id itself and the
    files' crc32s (they cover the id, which is in every rank file's metadata). So the same inputs give a
    byte-identical directory whichever way it was made (`convert`, `save`, a reshard there and back), and
    two states share an id only when their rank files hold the same tensors in the same places: a file
    of another state is still refused (other weights change the digests, another TP size the layout).

    The digests are of the tensors' content as written, known only once every rank has written its
    files; the files are therefore written with PENDING_STATE_ID (same length) and stamped in place
    afterwards (store/writer.py), which costs a header rewrite per file, not a second pass over the
    data, as hashing the source up front would."""
    doc = manifest.to_json()
    doc["state_id"] = ""
    doc["files"] = {name: {k: v for k, v in record.items() if k != "crc32"} for name, record in doc["files"].items()}
    return hashlib.sha256(json.dumps(doc, separators=(",", ":")).encode()).hexdigest()[:32]


def rank_file_metadata(state_id: str, rank: int, tp_size: int, part: int, pp_size: int = 1) -> dict[str, str]:
    """What every rank file says of itself in its safetensors metadata: which state, rank, TP size and part
    it belongs to (so a file from another state or rank is refused even when the manifest was edited), and
    at PP>1 the PP size (`rank` is then the world rank). "writer" tells shardstate's files from vLLM's,
    which carry none of this."""
    metadata = {"format": "pt", "writer": WRITER, "state": state_id, "rank": str(rank), "tp_size": str(tp_size),
                "part": str(part)}
    return metadata | ({"pp_size": str(pp_size)} if pp_size > 1 else {})


def file_name(pattern: str, rank: int, part: int, tp_size: int) -> str:
    """World rank `rank`'s part `part` named by `pattern` (PP=1: {rank}; PP>1: {pp} and {tp})."""
    return pattern.format(rank=rank, pp=rank // tp_size, tp=rank % tp_size, part=part)


def stage_pattern(pattern: str, rank: int, tp_size: int) -> str:
    """`pattern` with world rank `rank`'s {pp} and {tp} filled in, its {part} left (what RankWriter
    formats, with {rank}, for each part)."""
    return pattern.replace("{pp}", str(rank // tp_size)).replace("{tp}", str(rank % tp_size))


def check_pattern(pattern: str, pp_size: int = 1) -> str:
    """A file-name pattern: literal text and bare {rank} and {part} fields only ({pp}, {tp} and {part} at
    PP>1; no format specs, no indexing: a pattern is formatted for every file), naming a file inside the
    directory."""
    try:
        fields = [(field, spec, conversion) for _, field, spec, conversion in string.Formatter().parse(
            pattern[:MAX_PATTERN]) if field is not None]
    except ValueError:  # unbalanced braces
        fields = []
    names = ("part", "rank") if pp_size == 1 else ("part", "pp", "tp")
    bare = sorted(fields) == [(name, "", None) for name in names]
    if len(pattern) > MAX_PATTERN or not bare or not is_plain_name(
            pattern.format(rank=MAX_TP, pp=MAX_PP, tp=MAX_TP, part=MAX_PARTS_PER_RANK)):
        example = PP1_PATTERN if pp_size == 1 else PP_PATTERN
        raise ShardstateError(
            f"file-name pattern {brief(pattern)} is not usable", None,
            f"use one with {' and '.join(f'{{{n}}}' for n in reversed(names))} and no directory, like {example!r}",
        )
    if not pattern.endswith(".safetensors"):
        raise ShardstateError(f"file-name pattern {brief(pattern)} does not end in .safetensors", None, "add it")
    return pattern


def is_printable(text: str) -> bool:
    """No control, format or line-separator characters: safe to show on one line."""
    return not any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in text)


def is_plain_name(name: object) -> bool:
    """A visible file name inside the directory, printable on one line: no separator, not hidden, not '.'
    or '..', at most NAME_MAX bytes, no control characters."""
    if not isinstance(name, str) or not name or name.startswith(".") or Path(name).name != name:
        return False
    try:
        size = len(name.encode())
    except UnicodeEncodeError:  # lone surrogates
        return False
    return size <= 255 and is_printable(name)


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Write atomically (temp file, fsync, rename) so that a reader never sees half a manifest."""
    tmp = directory / f".{MANIFEST_NAME}.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest.to_json(), f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST_NAME)


def read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST_NAME
    try:
        doc = loads_strict(read_regular(path, MAX_MANIFEST_BYTES))
    except FileNotFoundError:
        raise ShardstateError(
            "no shardstate.json (the directory is incomplete or not a sharded state)", directory,
            "re-run `shardstate convert`",
        ) from None
    except OSError as exc:
        raise ShardstateError(f"unreadable manifest ({exc.strerror})", path, TODO) from None
    except ValueError as exc:
        raise ShardstateError(f"manifest is not valid JSON ({exc})", path, TODO) from None
    return parse_manifest(doc, path)


class _Reader:
    """Field checks that raise one ShardstateError naming the manifest field."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, field: str, problem: str) -> ShardstateError:
        return ShardstateError(f"manifest field {field} {problem}", self.path, TODO)

    def integer(self, field: str, value: object, low: int, high: int) -> int:
        if type(value) is not int or not low <= value <= high:
            raise self.fail(field, f"is {brief(value)}, not an integer in [{low}, {high}]")
        return value

    def text(self, field: str, value: object, pattern: re.Pattern | None = None, limit: int = 256) -> str:
        if (not isinstance(value, str) or not 0 < len(value) <= limit or (pattern and not pattern.fullmatch(value))
                or not is_printable(value)):
            raise self.fail(field, f"is {brief(value)}, not " + (f"matching {pattern.pattern}" if pattern else
                                                                  f"a string of 1 to {limit} characters"))
        return value

    def name(self, field: str, value: object) -> str:
        if not is_plain_name(value):
            raise self.fail(field, f"names {brief(value)}, not a plain file name inside the directory")
        return value

    def obj(self, field: str, value: object, keys: set[str] | None = None) -> dict:
        if not isinstance(value, dict):
            raise self.fail(field, f"is {brief(value)}, not an object")
        if keys is not None and set(value) != keys:
            missing, extra = sorted(keys - set(value)), sorted(set(value) - keys)
            raise self.fail(field, f"lacks {missing}" if missing else f"has unknown keys {brief(extra)}")
        return value

    def items(self, field: str, value: object, limit: int) -> list:
        if not isinstance(value, list) or len(value) > limit:
            raise self.fail(field, f"is {brief(value)}, not a list of at most {limit} entries")
        return value

    def shape(self, field: str, value: object) -> list[int]:
        if not isinstance(value, list) or len(value) > 8 or not all(type(d) is int and 0 <= d < 1 << 40 for d in value):
            raise self.fail(field, f"is {brief(value)}, not a shape (at most 8 sizes)")
        return value


def parse_manifest(doc: object, path: Path) -> Manifest:
    """Check a parsed shardstate.json against the schema; the Manifest it describes."""
    r = _Reader(path)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise ShardstateError("not a shardstate manifest (no \"format\": \"shardstate\")", path, TODO)
    version = doc.get("version")
    if type(version) is not int or version not in READ_VERSIONS:
        raise ShardstateError(f"manifest version {brief(version)}, this shardstate reads versions "
                              f"{', '.join(map(str, READ_VERSIONS))}", path,
                              "convert again with this shardstate, or upgrade it")
    missing, extra = [k for k in FIELDS if k not in doc], sorted(set(doc) - set(FIELDS))
    if missing:
        raise ShardstateError(f"manifest lacks field '{missing[0]}' (written by an older shardstate?)", path, TODO)
    if extra:
        raise r.fail(brief(extra[0]), "is unknown to this shardstate")
    if doc["checksum"] != CHECKSUM:
        raise r.fail("'checksum'", f"is {brief(doc['checksum'])}, not {CHECKSUM!r}")
    tp_size = r.integer("'tp_size'", doc["tp_size"], 1, MAX_TP)
    pp_size = r.integer("'pp_size'", doc["pp_size"], 1, MAX_PP)
    if pp_size > 1 and version == 1:
        raise r.fail("'pp_size'", f"is {pp_size}: version 1 states are never pipeline-parallel")
    try:
        pattern = check_pattern(doc["pattern"], pp_size) if isinstance(doc["pattern"], str) else None
    except ShardstateError:
        pattern = None
    if pattern is None:
        fields = "{rank} and {part}" if pp_size == 1 else "{pp}, {tp} and {part}"
        raise r.fail("'pattern'", f"is {brief(doc['pattern'])}, not a file-name pattern with {fields}")
    quantization = doc["quantization"]
    if quantization is not None and version == 1:
        raise r.fail("'quantization'", f"is {brief(quantization)}: version 1 states are never quantized")
    if quantization is not None:
        r.obj("'quantization'", quantization, {"method", "scales"})
        if quantization["method"] not in QUANT_WEIGHT_DTYPES or quantization["scales"] != QUANT_SCALES:
            methods = ", ".join(QUANT_WEIGHT_DTYPES)
            raise r.fail("'quantization'", f"is {brief(quantization)}, not one of {methods} with {QUANT_SCALES} scales")
    dtype = r.text("'dtype'", doc["dtype"])
    if dtype not in DTYPES:
        raise r.fail("'dtype'", f"is {brief(dtype)}, not one of {', '.join(DTYPES)}")
    manifest = Manifest(
        state_id=r.text("'state_id'", doc["state_id"], HEX32),
        tp_size=tp_size,
        architecture=r.text("'architecture'", doc["architecture"]),
        config_sha256=r.text("'config_sha256'", doc["config_sha256"], HEX64),
        dtype=dtype,
        source=_source(r, doc["source"]),
        side_files=_side_files(r, doc["side_files"]),
        files=_files(r, doc["files"], tp_size, pp_size, pattern),
        tensors={},
        pp_size=pp_size,
        pattern=pattern,
        quantization=quantization,
        version=version,
    )
    manifest.tensors = _tensors(r, doc["tensors"], manifest)
    return manifest


def _source(r: _Reader, value: object) -> list[dict]:
    for n, entry in enumerate(r.items("'source'", value, MAX_LIST)):
        r.obj(f"source[{n}]", entry, {"name", "size"})
        r.name(f"source[{n}].name", entry["name"])
        r.integer(f"source[{n}].size", entry["size"], 0, MAX_FILE_BYTES)
    return value  # type: ignore[return-value]


def _side_files(r: _Reader, value: object) -> list[str]:
    names = r.items("'side_files'", value, MAX_LIST)
    for n, name in enumerate(names):
        r.name(f"side_files[{n}]", name)
    if len(set(names)) != len(names) or MANIFEST_NAME in names:
        raise r.fail("'side_files'", "lists a name twice, or the manifest itself")
    return names


def _files(r: _Reader, value: object, tp_size: int, pp_size: int, pattern: str) -> dict[str, dict]:
    files = r.obj("'files'", value)
    parts: dict[int, set[int]] = {}
    for name, record in files.items():
        r.name("'files'", name)
        field = f"files[{name!r}]"
        r.obj(field, record, FILE_FIELDS if pp_size == 1 else PP_FILE_FIELDS)
        rank = r.integer(f"{field}.rank", record["rank"], 0, tp_size * pp_size - 1)
        part = r.integer(f"{field}.part", record["part"], 0, MAX_PARTS_PER_RANK - 1)
        r.integer(f"{field}.size", record["size"], 8, MAX_FILE_BYTES)
        r.integer(f"{field}.crc32", record["crc32"], 0, (1 << 32) - 1)
        if pp_size > 1 and (record["pp"], record["tp"]) != (rank // tp_size, rank % tp_size):
            raise r.fail(field, f"says pp {brief(record['pp'])} tp {brief(record['tp'])}, but rank {rank} is pp "
                                f"{rank // tp_size} tp {rank % tp_size} (tp_size {tp_size})")
        if name != file_name(pattern, rank, part, tp_size):
            raise r.fail(field, f"says rank {rank} part {part}, but that file would be named "
                                f"{file_name(pattern, rank, part, tp_size)}")
        parts.setdefault(rank, set()).add(part)
    for rank in range(tp_size * pp_size):
        found = parts.get(rank, set())
        if found != set(range(len(found))) or not found:
            raise r.fail("'files'", f"has parts {sorted(found)[:8]} for rank {rank}, not 0..n-1 (tp_size is "
                                    f"{tp_size}" + (f", pp_size {pp_size})" if pp_size > 1 else ")"))
    return files


def _tensors(r: _Reader, value: object, manifest: Manifest) -> dict[str, dict[str, dict]]:
    ranks = r.obj("'tensors'", value)
    if set(ranks) != {str(rank) for rank in range(manifest.world_size)}:
        raise r.fail("'tensors'", f"has ranks {brief(sorted(ranks))}, not 0..{manifest.world_size - 1}")
    used: set[str] = set()
    for rank, tensors in ranks.items():
        specs = manifest.specs[rank] = {}
        for name, record in r.obj(f"tensors[{rank}]", tensors).items():
            field = f"tensors[{rank}][{brief(name, 160)}]"
            r.obj(field, record, TENSOR_FIELDS)
            r.text(f"{field}.file", record["file"])
            if manifest.files.get(record["file"], {}).get("rank") != int(rank):
                raise r.fail(f"{field}.file", f"is {brief(record['file'])}, not a file of rank {rank}")
            used.add(record["file"])
            if not isinstance(record["dtype"], str) or record["dtype"] not in DTYPES:
                raise r.fail(f"{field}.dtype", f"is {brief(record['dtype'])}, not one of {', '.join(DTYPES)}")
            shape = r.shape(f"{field}.shape", record["shape"])
            r.shape(f"{field}.global_shape", record["global_shape"])
            r.text(f"{field}.xxh3_64", record["xxh3_64"], HEX16)
            spec = _checked_spec(r, field, record, shape, manifest)
            if spec is not None:
                specs[name] = spec
    unused = sorted(set(manifest.files) - used)
    if unused:
        raise r.fail("'files'", f"lists {unused[0]}, which holds no tensor")
    return ranks


def constant_spec(value: float) -> dict:
    return {"kind": CONSTANT_KIND, "value": float(value)}


def is_constant(spec: object) -> bool:
    return isinstance(spec, dict) and spec.get("kind") == CONSTANT_KIND and set(spec) == {"kind", "value"}


def _checked_spec(r: _Reader, field: str, record: dict, shape: list[int], manifest: Manifest) -> ShardSpec | None:
    """A parameter's spec: it parses, is for this TP size, gives the recorded shapes and has the state's
    dtype. None for a constant: [] or [1], F32 or the state's dtype, the same on every rank; and for an
    opaque tensor (spec null: written inside vLLM for a model shardstate has no specs for, loadable only at
    its own layout, by name), of any dtype, its global shape its own."""
    if record["spec"] is None:
        if record["global_shape"] != shape:
            raise r.fail(field, "has no spec (opaque) but a global shape other than its own")
        return None
    if is_constant(record["spec"]):
        value = record["spec"].get("value")
        if (shape not in CONSTANT_SHAPES or record["global_shape"] not in ([], shape)
                or record["dtype"] not in ("F32", manifest.dtype) or type(value) is not float):
            raise r.fail(field, "is a constant but not an F32 or state-dtype scalar [] or [1] with a float value")
        return None
    try:
        spec = spec_from_json(record["spec"], f"{field}.spec", manifest.version)
    except ValueError as exc:
        raise ShardstateError(f"manifest field {exc}", r.path, TODO) from None
    if spec.tp_size != manifest.tp_size:
        raise r.fail(f"{field}.spec.tp_size", f"is {spec.tp_size}, the state's tp_size is {manifest.tp_size}")
    if list(spec.local_shape()) != shape or list(spec.global_shape()) != record["global_shape"]:
        raise r.fail(field, f"has shape {brief(shape)}, its spec gives {list(spec.local_shape())}")
    allowed = {manifest.dtype}
    if manifest.quantization is not None:  # quantized weights and their F32 scales
        allowed |= {QUANT_WEIGHT_DTYPES[manifest.quantization["method"]], "F32"}
    if record["dtype"] not in allowed:
        raise r.fail(f"{field}.dtype", f"is {record['dtype']}, not one of the state's dtypes {sorted(allowed)}")
    return spec

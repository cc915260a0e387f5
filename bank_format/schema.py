"""Bank metadata and the Arrow schema of the ``gradients`` table (docs/bank-format.md, 3 and 4).

The dataclasses validate themselves on construction, so a ``BankMeta`` that exists is one that
could be written; ``BankMeta.from_json`` is the single door through which stored metadata comes
back, and it refuses anything it does not understand.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

from .errors import BankFormatError

FORMAT_VERSION = "1.2"
FORMAT_MAJOR = 1
FORMAT_MINOR = 2

# Order is the codec id written in byte 6 of every blob: append only, never reorder.
CODECS = ("fp32", "fp16", "int8", "int4", "int8g", "int4s")
CODEC_IDS = {name: i for i, name in enumerate(CODECS)}
# The format minor version that introduced each codec: a bank using one is at least that version.
CODEC_MINOR = {"fp32": 0, "fp16": 0, "int8": 0, "int4": 0, "int8g": 1, "int4s": 1}
# Codecs whose blobs record codec.group_size in the header (the others record 0).
GROUPED_CODECS = ("int4", "int8g", "int4s")
# Format 1.2, metadata key row_norm: the normalisation every stored row already carries.
# "doc": each row is g / ||g||, the norm taken over the learner's whole gradient (stored and
# omitted tensors), so a reader must not normalise the stored part again.
ROW_NORMS = ("doc",)

META_KEY = "regrad.bank"
TABLE_NAME = "gradients"

MAX_NDIM = 32
MAX_DIM = 2**32 - 1
ZSTD_LEVEL_MIN, ZSTD_LEVEL_MAX = 1, 22
GROUP_SIZE_MIN, GROUP_SIZE_MAX = 2, 65536

_VERSION_RE = re.compile(r"^(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})$")


def _is_int(x: Any) -> bool:
    # bool is an int subclass; a JSON `true` where a size belongs is corruption, not 1.
    return isinstance(x, int) and not isinstance(x, bool)


def parse_version(version: Any) -> tuple[int, int]:
    """``"MAJOR.MINOR"`` -> (major, minor); BankFormatError for anything else."""
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise BankFormatError(f"format_version must be a string 'MAJOR.MINOR', got {version!r}")
    major, minor = version.split(".")
    return int(major), int(minor)


def check_version(version: Any) -> tuple[int, int]:
    """Refuse a format this code cannot read; return (major, minor) otherwise."""
    major, minor = parse_version(version)
    if major > FORMAT_MAJOR:
        raise BankFormatError(
            f"bank format {version} is newer than this regrad understands "
            f"({FORMAT_MAJOR}.x); upgrade regrad to read it"
        )
    if major < FORMAT_MAJOR:
        raise BankFormatError(
            f"bank format {version} is not a known format version (this regrad reads "
            f"{FORMAT_MAJOR}.x)"
        )
    return major, minor


def unknown_codec_message(name: Any, version: str | None = None) -> str:
    if version is not None and parse_version(version)[1] > FORMAT_MINOR:
        return (
            f"bank format {version} uses codec {name!r}, which this regrad (bank format "
            f"{FORMAT_VERSION}: {', '.join(CODECS)}) cannot decode; upgrade regrad to read it"
        )
    return (
        f"unknown codec {name!r}: this regrad knows {', '.join(CODECS)}; the bank may have been "
        f"written by a newer regrad (upgrade regrad) or its metadata is corrupt"
    )


def min_version(codec: "CodecSpec", omitted: Sequence[Any], row_norm: str | None = None) -> str:
    """The oldest format version that can hold a bank with this codec, omitted tensors and
    row normalisation."""
    minor = max(CODEC_MINOR[codec.name], 1 if omitted else 0, 2 if row_norm is not None else 0)
    return f"{FORMAT_MAJOR}.{minor}"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the layout: a name and a shape (numpy order, outermost axis first)."""

    name: str
    shape: tuple[int, ...]

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise BankFormatError(f"tensor name must be a non-empty string, got {self.name!r}")
        shape = self.shape
        if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
            raise BankFormatError(f"tensor {self.name!r}: shape must be a sequence, got {shape!r}")
        if len(shape) > MAX_NDIM:
            raise BankFormatError(
                f"tensor {self.name!r}: {len(shape)} dimensions, at most {MAX_NDIM} allowed"
            )
        for d in shape:
            if not _is_int(d) or not 0 <= d <= MAX_DIM:
                raise BankFormatError(
                    f"tensor {self.name!r}: dimension {d!r} is not an integer in [0, {MAX_DIM}]"
                )
        object.__setattr__(self, "shape", tuple(int(d) for d in shape))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape)}


@dataclass(frozen=True)
class CodecSpec:
    """How blobs are encoded: codec name, zstd level, and the int4 group size."""

    name: str = "int8"
    zstd_level: int = 3
    group_size: int = 64

    def __post_init__(self):
        if self.name not in CODECS:
            raise BankFormatError(unknown_codec_message(self.name))
        if not _is_int(self.zstd_level) or not ZSTD_LEVEL_MIN <= self.zstd_level <= ZSTD_LEVEL_MAX:
            raise BankFormatError(
                f"codec zstd_level must be an integer in [{ZSTD_LEVEL_MIN}, {ZSTD_LEVEL_MAX}], "
                f"got {self.zstd_level!r}"
            )
        g = self.group_size
        if not _is_int(g) or not GROUP_SIZE_MIN <= g <= GROUP_SIZE_MAX or g % 2:
            # Even, so that every int4 group fills whole bytes (two values per byte).
            raise BankFormatError(
                f"codec group_size must be an even integer in [{GROUP_SIZE_MIN}, "
                f"{GROUP_SIZE_MAX}], got {g!r}"
            )

    def to_dict(self) -> dict:
        return {"name": self.name, "zstd_level": self.zstd_level, "group_size": self.group_size}


def coerce_tensor_spec(x: Any) -> TensorSpec:
    """TensorSpec from a TensorSpec, a {"name", "shape"} mapping or a (name, shape) pair."""
    if isinstance(x, TensorSpec):
        return x
    if isinstance(x, Mapping):
        if set(x) != {"name", "shape"}:
            raise BankFormatError(f"layout entry must have exactly 'name' and 'shape', got {x!r}")
        return TensorSpec(x["name"], x["shape"])
    if isinstance(x, Sequence) and not isinstance(x, (str, bytes)) and len(x) == 2:
        return TensorSpec(x[0], x[1])
    raise BankFormatError(f"layout entry must be a TensorSpec, got {x!r}")


def coerce_layout(layout: Any) -> list[TensorSpec]:
    if isinstance(layout, (str, bytes, Mapping)) or not isinstance(layout, Sequence):
        raise BankFormatError(f"layout must be a list of tensor specs, got {type(layout).__name__}")
    out = [coerce_tensor_spec(t) for t in layout]
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise BankFormatError(f"layout tensor names must be unique; repeated: {dup}")
    return out


def coerce_codec(codec: Any) -> CodecSpec:
    if isinstance(codec, CodecSpec):
        return codec
    if isinstance(codec, Mapping):
        unknown = set(codec) - {"name", "zstd_level", "group_size"}
        if unknown:
            raise BankFormatError(f"codec has unknown keys {sorted(unknown)}")
        if "name" not in codec:
            raise BankFormatError("codec has no 'name'")
        return CodecSpec(**codec)
    raise BankFormatError(f"codec must be a CodecSpec, got {type(codec).__name__}")


def _check_json_object(what: str, value: Any) -> dict:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise BankFormatError(f"{what} must be a JSON object (dict with string keys), got {value!r}")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:
        raise BankFormatError(f"{what} is not plain JSON (no NaN/Infinity, no objects): {e}") from None
    return value


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_created_at(value: Any) -> str:
    if not isinstance(value, str):
        raise BankFormatError(f"created_at must be an ISO 8601 string, got {value!r}")
    text = value[:-1] + "+00:00" if value.endswith("Z") else value  # 3.10 lacks 'Z' parsing
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise BankFormatError(f"created_at {value!r} is not an ISO 8601 time") from None
    if t.utcoffset() is None or t.utcoffset().total_seconds() != 0:
        raise BankFormatError(f"created_at {value!r} must be in UTC (end with 'Z' or '+00:00')")
    return value


@dataclass(kw_only=True)
class BankMeta:
    """Everything that describes a bank as a whole (docs/bank-format.md, section 3)."""

    format_version: str = FORMAT_VERSION
    producer: str
    model: dict
    learner: dict
    embedder: dict
    layout: list[TensorSpec]
    codec: CodecSpec = field(default_factory=CodecSpec)
    created_at: str = field(default_factory=utc_now_iso)
    # Format 1.1: the learner's tensors this bank does not store (their step is taken as zero),
    # so that a reader knows the whole gradient the stored layout is part of. Written only when
    # non-empty.
    omitted: list[TensorSpec] = field(default_factory=list)
    # Format 1.2: the normalisation the rows already carry (one of ROW_NORMS), or None for raw
    # gradients. Written only when set.
    row_norm: str | None = None

    def __post_init__(self):
        _, minor = check_version(self.format_version)
        if not isinstance(self.producer, str) or not self.producer:
            raise BankFormatError(f"producer must be a non-empty string, got {self.producer!r}")
        _check_json_object("model", self.model)
        if not isinstance(self.model.get("id"), str):
            raise BankFormatError(f"model must have a string 'id', got {self.model!r}")
        _check_json_object("learner", self.learner)
        _check_json_object("embedder", self.embedder)
        if not isinstance(self.embedder.get("id"), str):
            raise BankFormatError(f"embedder must have a string 'id', got {self.embedder!r}")
        dim = self.embedder.get("dim")
        if not _is_int(dim) or not 1 <= dim <= 2**31 - 1:
            raise BankFormatError(f"embedder 'dim' must be a positive integer, got {dim!r}")
        self.layout = coerce_layout(self.layout)
        if not self.layout:
            raise BankFormatError("layout must have at least one tensor")
        self.codec = coerce_codec(self.codec)
        _check_created_at(self.created_at)
        self.omitted = coerce_layout(self.omitted)
        clash = sorted({t.name for t in self.omitted} & {t.name for t in self.layout})
        if clash:
            raise BankFormatError(f"omitted tensors {clash} are also in the layout")
        if self.row_norm is not None and self.row_norm not in ROW_NORMS:
            raise BankFormatError(
                f"row_norm must be one of {', '.join(ROW_NORMS)} (or absent), got {self.row_norm!r}")
        need = min_version(self.codec, self.omitted, self.row_norm)
        if minor < parse_version(need)[1]:
            if CODEC_MINOR[self.codec.name] > minor:
                what = f"codec {self.codec.name!r}"
            elif self.omitted and minor < 1:
                what = "omitted tensors"
            else:
                what = "row_norm"
            raise BankFormatError(f"bank format {self.format_version} cannot hold {what}: needs format {need}")

    @property
    def full_layout_values(self) -> int:
        """Values of the learner's whole gradient: the stored layout plus the omitted tensors."""
        return sum(t.numel for t in self.layout) + sum(t.numel for t in self.omitted)

    @property
    def dim(self) -> int:
        return self.embedder["dim"]

    @property
    def version_tuple(self) -> tuple[int, int]:
        return parse_version(self.format_version)

    @property
    def is_newer_minor(self) -> bool:
        """True when written by a newer 1.x: readable, but this code must not write to it."""
        return self.version_tuple[1] > FORMAT_MINOR

    def to_dict(self) -> dict:
        return {
            "format_version": self.format_version,
            "producer": self.producer,
            "model": self.model,
            "learner": self.learner,
            "embedder": self.embedder,
            "layout": [t.to_dict() for t in self.layout],
            "codec": self.codec.to_dict(),
            "created_at": self.created_at,
            **({"omitted": [t.to_dict() for t in self.omitted]} if self.omitted else {}),
            **({"row_norm": self.row_norm} if self.row_norm is not None else {}),
        }

    def to_json(self) -> str:
        # Sorted keys and ASCII: the stored bytes do not depend on dict order or locale.
        return json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> "BankMeta":
        """Parse stored metadata, refusing anything malformed or from an unknown version."""
        if isinstance(text, (bytes, bytearray, memoryview)):
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError:
                raise BankFormatError("bank metadata is not UTF-8") from None
        if not isinstance(text, str):
            raise BankFormatError(f"bank metadata must be a JSON string, got {type(text).__name__}")

        def _no_constants(name):
            raise ValueError(f"{name} is not allowed")

        try:
            data = json.loads(text, parse_constant=_no_constants)
        except (ValueError, RecursionError) as e:
            raise BankFormatError(f"bank metadata is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise BankFormatError("bank metadata must be a JSON object")
        if "format_version" not in data:
            raise BankFormatError("bank metadata has no format_version")
        _, minor = check_version(data["format_version"])
        # A newer minor may only add keys; an older reader ignores them. In our own or an older
        # minor, an unknown key means corruption or a bug, so it is refused.
        lenient = minor > FORMAT_MINOR

        known = {f.name for f in dataclasses.fields(cls)}
        optional = {"omitted", "row_norm"}  # keys of formats 1.1 and 1.2, absent before
        if minor < 1 and "omitted" in data:
            raise BankFormatError(f"bank metadata of format {data['format_version']} has key 'omitted' (a 1.1 key)")
        if minor < 2 and "row_norm" in data:
            raise BankFormatError(f"bank metadata of format {data['format_version']} has key 'row_norm' (a 1.2 key)")
        if "row_norm" in data and data["row_norm"] is None:
            raise BankFormatError("row_norm is written only when set; found null")
        missing = sorted(known - optional - set(data))
        if missing:
            raise BankFormatError(f"bank metadata is missing {', '.join(missing)}")
        unknown = sorted(set(data) - known)
        if unknown and not lenient:
            raise BankFormatError(f"bank metadata has unknown keys {unknown}")

        codec = data["codec"]
        if not isinstance(codec, dict):
            raise BankFormatError(f"codec must be an object, got {codec!r}")
        if "name" in codec and codec["name"] not in CODECS:
            raise BankFormatError(unknown_codec_message(codec["name"], data["format_version"]))
        if lenient:
            codec = {k: v for k, v in codec.items() if k in ("name", "zstd_level", "group_size")}
        if set(codec) != {"name", "zstd_level", "group_size"}:
            raise BankFormatError(
                f"codec must have exactly name, zstd_level and group_size, got {sorted(codec)}"
            )
        layout = data["layout"]
        if not isinstance(layout, list):
            raise BankFormatError(f"layout must be a list, got {type(layout).__name__}")
        if lenient:
            layout = [
                {k: v for k, v in t.items() if k in ("name", "shape")} if isinstance(t, dict) else t
                for t in layout
            ]
        for t in layout:
            if not isinstance(t, dict):
                raise BankFormatError(f"layout entries must be objects, got {t!r}")
        omitted = data.get("omitted", [])
        if not isinstance(omitted, list) or not all(isinstance(t, dict) for t in omitted):
            raise BankFormatError(f"omitted must be a list of objects, got {omitted!r}")
        if lenient:
            omitted = [{k: v for k, v in t.items() if k in ("name", "shape")} for t in omitted]
        if "omitted" in data and not omitted:
            raise BankFormatError("omitted is written only when non-empty; found an empty list")
        return cls(**{k: data[k] for k in known if k not in ("codec", "layout", "omitted") and k in data},
                   codec=coerce_codec(codec), layout=coerce_layout(layout),
                   omitted=coerce_layout(omitted))

    def differences(self, expect: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
        """(field, expected, found) for every expected fingerprint value that differs."""
        if not isinstance(expect, Mapping):
            raise BankFormatError(f"expect must be a mapping, got {type(expect).__name__}")
        allowed = ("model", "learner", "embedder", "layout", "codec")
        unknown = sorted(set(expect) - set(allowed))
        if unknown:
            raise BankFormatError(f"expect has unknown keys {unknown}; allowed: {list(allowed)}")
        diffs: list[tuple[str, Any, Any]] = []
        missing = object()
        for key in ("model", "learner", "embedder"):
            if key not in expect or expect[key] is None:
                continue
            want = expect[key]
            if not isinstance(want, Mapping):
                raise BankFormatError(f"expect[{key!r}] must be a mapping, got {want!r}")
            have = getattr(self, key)
            for k, v in want.items():
                found = have.get(k, missing)
                if found is missing:
                    diffs.append((f"{key}.{k}", v, "<absent>"))
                elif _json_norm(found) != _json_norm(v):
                    diffs.append((f"{key}.{k}", v, found))
        if expect.get("layout") is not None:
            want = [(t.name, t.shape) for t in coerce_layout(expect["layout"])]
            have = [(t.name, t.shape) for t in self.layout]
            if want != have:
                diffs.append(("layout", _layout_str(want), _layout_str(have)))
        if expect.get("codec") is not None:
            c = expect["codec"]
            want = c.to_dict() if isinstance(c, CodecSpec) else dict(c) if isinstance(c, Mapping) else c
            if not isinstance(want, dict):
                raise BankFormatError(f"expect['codec'] must be a CodecSpec or mapping, got {c!r}")
            have = self.codec.to_dict()
            for k, v in want.items():
                if k not in have:
                    raise BankFormatError(f"expect['codec'] has unknown key {k!r}")
                if have[k] != v:
                    diffs.append((f"codec.{k}", v, have[k]))
        return diffs


def _json_norm(x: Any) -> Any:
    # Stored metadata went through JSON: tuples came back as lists. Compare in that form.
    try:
        return json.loads(json.dumps(x, sort_keys=True))
    except (TypeError, ValueError, RecursionError):
        return x


def _layout_str(layout: list[tuple[str, tuple[int, ...]]]) -> str:
    return "[" + ", ".join(f"{n}{list(s)}" for n, s in layout) + "]"


# The table schema, as data: docs/bank-format.md section 4 lists the same rows, and a test parses
# that table and compares it with arrow_schema(). `dim` stands for embedder.dim.
COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("doc_id", "string", False),
    ("content_hash", "string", False),
    ("source", "string", True),
    ("embedding", "fixed_size_list<float32>[dim]", False),
    ("blob", "large_binary", False),
    ("codec", "string", False),
    ("n_tokens", "int32", False),
    ("checksum", "string", False),
    ("created_at", "timestamp[us, tz=UTC]", False),
)


def _arrow_type(kind: str, dim: int):
    import pyarrow as pa

    simple = {
        "string": pa.string(),
        "large_binary": pa.large_binary(),
        "int32": pa.int32(),
        "timestamp[us, tz=UTC]": pa.timestamp("us", tz="UTC"),
    }
    if kind == "fixed_size_list<float32>[dim]":
        return pa.list_(pa.float32(), dim)
    return simple[kind]


def arrow_schema(dim: int, meta: BankMeta | None = None):
    """The Arrow schema of ``gradients`` for embedding size ``dim``, with the metadata if given."""
    import pyarrow as pa

    fields = [pa.field(n, _arrow_type(k, dim), nullable=nullable) for n, k, nullable in COLUMNS]
    metadata = {META_KEY: meta.to_json()} if meta is not None else None
    return pa.schema(fields, metadata=metadata)


def check_table_schema(schema, meta: BankMeta, where: str) -> None:
    """Refuse a table whose columns do not match the spec (extra columns only from a newer minor)."""
    expected = arrow_schema(meta.dim)
    names = set(schema.names)
    for f in expected:
        if f.name not in names:
            raise BankFormatError(f"{where}: column {f.name!r} is missing; not a format 1.x bank")
        got = schema.field(f.name)
        if got.type != f.type or got.nullable != f.nullable:
            raise BankFormatError(
                f"{where}: column {f.name!r} is {got.type}{'' if got.nullable else ' not null'}, "
                f"the spec says {f.type}{'' if f.nullable else ' not null'}"
            )
    extra = sorted(names - set(expected.names))
    if extra and not meta.is_newer_minor:
        raise BankFormatError(f"{where}: unexpected columns {extra} for format {meta.format_version}")

"""Workspace and its ``regrad.toml``.

A workspace is one directory (default ``./.regrad``, or ``--workspace`` / ``REGRAD_WORKSPACE``)
holding everything a corpus needs: the LanceDB ``documents`` table, gradient banks (one per learner
checkpoint), learner checkpoints, and ``regrad.toml``. The toml is written on first use and read by
every later command, so ``regrad query`` uses the same model and embedder as ``regrad ingest``.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from regrad_cli.errors import ConfigError, RegradError
from regrad_cli.files import atomic_write_text, read_at_most, read_bounded
from regrad_cli.lm.models import BUNDLED_EMBEDDER, BUNDLED_MODEL
from regrad_cli.versions import Migrations, Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger("regrad")

DEFAULT_WORKSPACE = ".regrad"
BUNDLED_CHECKPOINT = "bundled"

# regrad.toml's top-level format_version. A file without one predates versioning (0.0). A newer
# major is refused; a newer minor is read, ignoring (with a warning) the keys it added. Older
# files are upgraded in memory by CONFIG_MIGRATIONS (below) and written back only by save().
CONFIG_VERSION = Version(1, 2)
CONFIG_MIGRATIONS = Migrations("workspace config")
# A regrad.toml is a few hundred bytes; anything past this is not one.
MAX_CONFIG_BYTES = 1 << 20


@dataclass
class ModelConfig:
    id: str = BUNDLED_MODEL
    device: str = "cpu"
    dtype: str = "float32"


@dataclass
class EmbedderConfig:
    id: str = BUNDLED_EMBEDDER
    batch_size: int = 32


@dataclass
class ChunkingConfig:
    # 256 tokens: SmolLM2 documents' gradients are computed on whole chunks, and the meta-learner
    # was trained on passages truncated to 256 tokens.
    max_tokens: int = 256
    overlap: int = 32


@dataclass
class LoraConfig:
    """LoRA settings used when a learner is initialised here (the bundled checkpoint has its own)."""

    # "auto": by model size (lora.default_lora, method.md §1.1; 8 and 16 for SmolLM2-135M), the
    # same rule meta-training uses.
    rank: int | str = "auto"
    lora_alpha: float | str = "auto"
    # "upper-half", "all" or an explicit list of layer indices.
    layers: str | list[int] = "upper-half"
    # Short module names inside a decoder block ("mlp.c_fc"); empty: the model family's table
    # (regrad_cli/learner/targets.py: gate/up/down_proj for Llama, Qwen2, Mistral...; c_fc/c_proj for GPT-2).
    modules: list[str] = field(default_factory=list)
    # Regular expressions over full module names ('model\.layers\.1[0-9]\.mlp\.fc1', a TOML
    # literal string); when set they replace layers and modules.
    target_patterns: list[str] = field(default_factory=list)
    init_b_std: float = 1e-3
    # Meta-training's starting step size too (MetaTrainConfig keeps it unless --alpha-init is given),
    # so the 'init' learner is exactly where meta-training starts. The reference code starts at 0.01;
    # at that size alpha barely moves over a few hundred CPU steps.
    alpha_init: float = 1.0
    per_element_alpha: bool = False
    seed: int = 0


@dataclass
class LearnerConfig:
    # "bundled" (the shipped meta-trained checkpoint for the default model), "init" (untrained,
    # seeded init from [lora]) or a checkpoint directory.
    checkpoint: str = BUNDLED_CHECKPOINT


@dataclass
class BankConfig:
    # int4 (group-wise absmax, 64 values per group). Measured on the 108 demo questions
    # (docs/performance.md, docs/benchmarks/tensor_subset_demo.json): 8.8x smaller than fp32 with
    # every tensor stored, 2 of 108 answers changed against fp32; no codec that reaches 16x
    # (int4s, int4/g128, both with the energy subset) kept answer changes within 2 %, so the
    # default stays. int4s (format 1.1) is 11 % smaller than int4 at the same group size.
    codec: str = "int4"
    zstd_level: int = 3
    group_size: int = 64
    # Documents per forward/backward pass: 1 measured fastest on a 2-core CPU at 1 and 2 threads
    # (docs/benchmarks/build_throughput-quick.json: batch 4 was 0.73x the bare loop at 2 threads,
    # batch 1 0.95x, and 0.8 GB less memory).
    batch_size: int = 1
    max_doc_tokens: int = 256
    # Precision of the forward/backward passes that compute the gradients: "auto" (bf16 autocast
    # for a float32 model where bf16 products are native: a CPU with AVX512-BF16/AMX or a CUDA
    # GPU; float32 elsewhere), "float32" or "bfloat16". Gradients are stored float32, then
    # encoded by the codec (docs/performance.md: speed and answers changed).
    compute_dtype: str = "auto"
    # Where banks live: "" = WORKSPACE/banks; or a directory or an object-store URI such as
    # "s3://bucket/prefix" (one bank per learner checkpoint below it, as bank-<id>).
    # $REGRAD_BANK_URI overrides it.
    uri: str = ""
    # LanceDB/Lance storage options for an object-store uri (aws_endpoint, aws_region,
    # allow_http, ...); credentials are best left to the environment (AWS_ACCESS_KEY_ID, ...).
    # REGRAD_BANK_STORAGE_OPTIONS (a JSON object) is merged over this table.
    storage_options: dict = field(default_factory=dict)


# The mode the shipped learner answers best in the committed results (docs/results.md: demo F1
# 0.687 and NQ-Open 0.345 for param+context, against 0.068 and 0.139 for param alone).
DEFAULT_MODE = "param+context"


@dataclass
class QueryConfig:
    # The answering mode when none is given (`regrad query --mode`, the server's "mode" field).
    mode: str = DEFAULT_MODE
    top_k: int = 3
    gamma: float = 1.0
    # "" = what the learner was meta-trained with (its learner.json); or sum, mean, score.
    combine: str = ""
    retriever: str = "dense"
    max_new_tokens: int = 20

    def request_options(self, *, mode: str | None = None, top_k: int | None = None, gamma: float | None = None,
                        combine: str | None = None, retriever: str | None = None,
                        max_new_tokens: int | None = None) -> dict:
        """The answering options of one request: each one given, else this [query] default
        (combine None: what the learner was meta-trained with)."""
        return {"mode": mode or self.mode, "top_k": self.top_k if top_k is None else top_k, "gamma": self.gamma if gamma is None else gamma,
                "combine": combine or self.combine or None, "retriever": retriever or self.retriever,
                "max_new_tokens": max_new_tokens or self.max_new_tokens}


@dataclass
class RegradConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    chunking: ChunkingConfig = field(default_factory=ChunkingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    query: QueryConfig = field(default_factory=QueryConfig)

    def to_dict(self) -> dict:
        return {"format_version": str(CONFIG_VERSION), **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "RegradConfig":
        """Parse (and upgrade: ``upgrade``) a regrad.toml's data; unknown keys are errors."""
        data, _, newer = upgrade(data, source)
        cfg = cls()
        for section in fields(cls):
            values = data.get(section.name, {})
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: [{section.name}] must be a table")
            target = getattr(cfg, section.name)
            known = {f.name for f in fields(target)}
            for key, value in values.items():
                if key not in known and newer:
                    log.warning("%s: ignoring %s.%s (added by a newer regrad)", source, section.name, key)
                    continue
                if key not in known:
                    raise ConfigError(
                        f"{source}: unknown key {section.name}.{key} (known: {', '.join(sorted(known))})"
                    )
                setattr(target, key, value)
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown and newer:
            log.warning("%s: ignoring section(s) %s (added by a newer regrad)", source, ", ".join(sorted(unknown)))
        elif unknown:
            raise ConfigError(f"{source}: unknown section(s) {', '.join(sorted(unknown))}")
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        """ConfigError naming the field and its allowed range unless every setting has an
        allowed type and value (the schema: regrad_cli/workspace/config_schema.py)."""
        from regrad_cli.workspace.config_schema import validate

        validate(asdict(self), source)


def upgrade(data: dict, source: str = "config") -> tuple[dict, list[str], bool]:
    """(data at CONFIG_VERSION without its version key, migrations applied, written by a newer
    minor?) for a regrad.toml's parsed data. A newer major is a ConfigError."""
    import copy

    data = copy.deepcopy(data)
    raw = data.pop("format_version", None)
    try:
        found = Version(0, 0) if raw is None else Version.parse(raw, source)
        data, applied = CONFIG_MIGRATIONS.upgrade(data, found, CONFIG_VERSION, source)
    except ConfigError:
        raise
    except RegradError as exc:
        raise ConfigError(str(exc)) from None
    if applied:
        log.info("%s: upgraded from format %s (%s)", source, found, ", ".join(applied))
    return data, applied, found > CONFIG_VERSION


@CONFIG_MIGRATIONS.register(Version(1, 0))
def m001_lora_modules_by_family(data: dict) -> dict:
    """Before 1.0 [lora] modules defaulted to Llama's names and every workspace wrote them out;
    1.0 looks the targets up by model family when the list is empty. The old default list becomes
    the empty one: the same targets for Llama-family models, working ones for the others."""
    lora = data.get("lora")
    if isinstance(lora, dict) and lora.get("modules") == ["gate_proj", "up_proj", "down_proj"]:
        lora["modules"] = []
    return data


@CONFIG_MIGRATIONS.register(Version(1, 1))
def m002_query_combine_from_learner(data: dict) -> dict:
    """Before 1.1 every workspace wrote [query] combine = "sum" and nothing read it (queries used
    the learner's trained combination). 1.1 reads it; "" means the learner's choice, so the old
    never-read default becomes "" and behaviour stays the same."""
    query = data.get("query")
    if isinstance(query, dict) and query.get("combine") == "sum":
        query["combine"] = ""
    return data


@CONFIG_MIGRATIONS.register(Version(1, 2))
def m003_query_mode(data: dict) -> dict:
    """1.2 records the default answering mode, [query] mode. Before, it was "param" for every
    workspace; 1.2's default is the mode the shipped learner answers best (DEFAULT_MODE), and
    older workspaces get it too (their answers were the weakest of the retrieval modes)."""
    query = data.setdefault("query", {})
    if isinstance(query, dict):
        query.setdefault("mode", DEFAULT_MODE)
    return data


def resolve_workspace(path: str | os.PathLike | None = None) -> Path:
    """The workspace directory: explicit path, else $REGRAD_WORKSPACE, else ./.regrad."""
    if path is None:
        path = os.environ.get("REGRAD_WORKSPACE") or DEFAULT_WORKSPACE
    return Path(path).expanduser().absolute()


class Workspace:
    """A regrad workspace directory and its configuration."""

    CONFIG_NAME = "regrad.toml"
    # False for throwaway workspaces (eval, benchmarks): they must never write to the bank
    # location a user set in $REGRAD_BANK_URI.
    use_bank_env = True

    def __init__(self, root: Path, config: RegradConfig):
        self.root = root
        self.config = config

    # Layout -------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.root / self.CONFIG_NAME

    @property
    def db_path(self) -> Path:
        """LanceDB database holding the ``documents`` table."""
        return self.root / "db"

    @property
    def banks_dir(self) -> Path:
        return self.root / "banks"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def banks_location(self) -> "Path | str":
        """Where this workspace's banks live: WORKSPACE/banks, or [bank] uri (a directory or an
        object-store URI, kept as a string)."""
        from bank_format.location import location

        env = os.environ.get("REGRAD_BANK_URI") if self.use_bank_env else None
        uri = (env or self.config.bank.uri or "").strip()
        if not uri:
            return self.banks_dir
        loc = location(uri)  # a remote URI string, or a local Path (file:// stripped)
        if isinstance(loc, str):
            from regrad_cli.workspace import endpoints

            endpoints.use(f"remote bank location {loc}", "REGRAD_BANK_URI" if env else str(self.config_path),
                          from_config=not env)
            return loc
        loc = loc.expanduser()
        return loc if loc.is_absolute() else self.root / loc

    @property
    def banks_remote(self) -> bool:
        return isinstance(self.banks_location, str)

    def bank_path(self, checkpoint_id: str) -> "Path | str":
        # One bank per learner checkpoint: gradients depend on phi, so a bank made with one
        # checkpoint must never be mixed with another (method.md §1.4). Under a location other
        # than WORKSPACE/banks (which other workspaces may share), one bank per workspace too:
        # a build removes rows of documents its workspace no longer has, so two workspaces must
        # never write one bank.
        loc = self.banks_location
        name = f"bank-{checkpoint_id[:16]}"
        if loc != self.banks_dir:
            name = f"ws-{self.workspace_id}/{name}"
        return f"{loc}/{name}" if isinstance(loc, str) else loc / name

    @property
    def workspace_id(self) -> str:
        """A random id made on first use and kept in WORKSPACE/workspace-id (a copy of the whole
        workspace directory is the same workspace, and shares its banks)."""
        import re
        import uuid

        path = self.root / "workspace-id"
        try:
            wid = read_bounded(path, 4096).decode("ascii").strip()  # a link to /dev/zero: refused
        except (OSError, UnicodeDecodeError):
            wid = ""
        if re.fullmatch(r"[0-9a-f]{16}", wid):
            return wid
        wid = uuid.uuid4().hex[:16]
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"workspace-id.{os.getpid()}.tmp")
            if os.path.lexists(tmp):  # never write through a planted link
                tmp.unlink()
            tmp.write_text(wid + "\n", encoding="ascii")
            try:
                os.link(tmp, path)  # fails if another process made it first: use theirs
            except FileExistsError:
                try:
                    wid = read_bounded(path, 4096).decode("ascii").strip()
                except (OSError, UnicodeDecodeError):
                    wid = ""
            finally:
                tmp.unlink()
        except OSError as exc:
            raise ConfigError(f"cannot write {path}: {exc}") from exc
        if not re.fullmatch(r"[0-9a-f]{16}", wid):
            raise ConfigError(f"{path} holds no valid workspace id: delete it (a new one is made)")
        return wid

    def bank_storage_options(self) -> dict:
        """Storage options for object-store banks: [bank] storage_options, then the JSON object in
        $REGRAD_BANK_STORAGE_OPTIONS over it. Values are strings, as Lance wants them."""
        import json

        opts = self.config.bank.storage_options or {}
        if not isinstance(opts, dict):
            raise ConfigError(f"{self.config_path}: [bank] storage_options must be a table")
        opts = dict(opts)
        from regrad_cli.workspace import endpoints

        for key, value in endpoints.endpoint_options(opts).items():
            endpoints.use(f"object-store {key} = {value}", str(self.config_path), from_config=True)
        raw = os.environ.get("REGRAD_BANK_STORAGE_OPTIONS")
        if raw:
            try:
                extra = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"REGRAD_BANK_STORAGE_OPTIONS is not valid JSON: {exc}") from None
            if not isinstance(extra, dict):
                raise ConfigError("REGRAD_BANK_STORAGE_OPTIONS must be a JSON object")
            for key, value in endpoints.endpoint_options(extra).items():
                endpoints.use(f"object-store {key} = {value}", "REGRAD_BANK_STORAGE_OPTIONS", from_config=False)
            opts.update(extra)
        return {str(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in opts.items()}

    # Creation -----------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | os.PathLike | None = None,
        *,
        create: bool = True,
        overrides: dict | None = None,
        check=None,
    ) -> "Workspace":
        """Open (and on first use create) a workspace.

        ``overrides`` maps "section.key" to a value given on the command line; on first use they
        are written into regrad.toml, later they apply to this run only. ``check(config)``, when
        given, runs on a new workspace's configuration before regrad.toml is written (say, loading
        the model and embedder it names): a setting that does not work is never saved.
        """
        root = resolve_workspace(path)
        cfg_path = root / cls.CONFIG_NAME
        overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        if cfg_path.exists():
            raw = read_at_most(cfg_path, MAX_CONFIG_BYTES, str(cfg_path), ConfigError)  # not a FIFO or device either
            try:
                data = tomllib.loads(raw.decode("utf-8"))
            except (OSError, ValueError) as exc:  # not UTF-8, not TOML, an int of over 4300 digits
                why = "a number has more than 4300 digits" if "integer string conversion" in str(exc) else exc
                raise ConfigError(f"cannot read {cfg_path}: {why}") from None
            except RecursionError:
                raise ConfigError(f"cannot read {cfg_path}: nested too deeply") from None
            config = RegradConfig.from_dict(data, source=str(cfg_path))
            if overrides:
                _apply_overrides(config, overrides)
                config.validate(f"{cfg_path} with the command-line options")
                _check_sources(overrides)
            return cls(root, config)
        if not create:
            raise ConfigError(
                f"no regrad workspace at {root} (run `regrad ingest PATH` first, or pass --workspace)"
            )
        config = RegradConfig()
        _apply_overrides(config, overrides)
        config.validate("the command-line options")  # instant: before any model is loaded
        if check is not None:
            check(config)
        ws = cls(root, config)
        ws.save()
        return ws

    def save(self) -> None:
        import tomli_w

        try:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.config_path, tomli_w.dumps(self.config.to_dict()))
        except OSError as exc:
            raise ConfigError(f"cannot write workspace config {self.config_path}: {exc}") from exc


def _check_sources(overrides: dict) -> None:
    """A --model or --embedder given for an existing workspace (this run only) gets the same
    fail-fast check as a new workspace's: a missing directory or an unreachable hub id is one
    line at once, not an error after the other model has loaded."""
    from regrad_cli.lm.models import check_source

    for key, what in (("model.id", "model"), ("embedder.id", "embedder")):
        if overrides.get(key):
            check_source(str(overrides[key]), what)


def _apply_overrides(config: RegradConfig, overrides: dict) -> None:
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        target = getattr(config, section, None)
        if target is None or not hasattr(target, key):
            raise ConfigError(f"unknown setting {dotted}")
        setattr(target, key, value)

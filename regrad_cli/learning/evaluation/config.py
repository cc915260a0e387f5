"""What `regrad eval` runs: the systems (each a mode of the one answering pipeline), the options.

The CLI reads ``EvalConfig``'s defaults from this file's source (without importing it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from regrad_cli.learning.cpt import CPTConfig
from regrad_cli.errors import ConfigError


@dataclass(frozen=True)
class System:
    mode: str  # a pipeline.MODES name
    docs: str | None  # whose documents: "retrieved" (the pipeline retrieves), "gold", "shifted", "random", None
    model: str = "base"  # "base" (the model the learner is attached to) or "cpt" (the CPT-trained copy)


# Every system answers through pipeline.answer_many; only the request differs.
SYSTEMS_TABLE: dict[str, System] = {
    "closed-book": System("closed-book", None),
    "closed-book+phi": System("closed-book+phi", None),
    "rag": System("context", "retrieved"),
    "rag+phi": System("rag+phi", "retrieved"),
    "cpt": System("closed-book", None, "cpt"),
    "cpt+rag": System("context", "retrieved", "cpt"),
    "regrad": System("param", "retrieved"),
    "regrad+context": System("param+context", "retrieved"),
    "oracle": System("param", "gold"),  # the gold document's gradient only: the injection upper bound
    "shifted": System("param", "shifted"),  # question i gets question i+1's retrieved documents
    "random": System("param", "random"),  # k random documents of the workspace
}
SYSTEMS = tuple(SYSTEMS_TABLE)
# Systems that take a gradient step (their deployed weights are base + phi').
REGRAD_SYSTEMS = tuple(n for n, s in SYSTEMS_TABLE.items() if s.mode in ("param", "param+context"))
CPT_SYSTEMS = tuple(n for n, s in SYSTEMS_TABLE.items() if s.model == "cpt")
# Every system is compared with these (paired bootstrap over questions).
REFERENCES = ("regrad", "regrad+context")
POOLS = ("split", "questions")


@dataclass
class EvalConfig:
    datasets: list[str]
    out: str = "runs/eval"
    limit: int | None = None
    top_k: int = 3
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    workspace: str | None = None
    checkpoint: str | None = None
    continual: int = 1
    seed: int = 0
    max_new_tokens: int = 16
    batch_size: int = 8
    gamma: float = 1.0
    retriever: str = "dense"
    bootstrap: int = 1000
    device: str | None = None
    # Model and embedder (ids, directories or fake:...) when no --workspace names them.
    model: str | None = None
    embedder: str | None = None
    # Tokens of the shipped general text used for perplexity (about 3.3k for SmolLM2: all of it).
    ppl_max_tokens: int = 4096
    # Retrieval pool: "split" = every supporting document of the evaluated split (hard retrieval),
    # "questions" = only the evaluated questions' own documents (the easy, oracle-like setting).
    pool: str = "split"
    # Extra distractors: folders, JSONL files or dataset specs (their supporting documents).
    corpus: list[str] = field(default_factory=list)
    # Content-keyed eval workspaces (documents + bank), reused by later runs on the same data.
    cache: str = "runs/eval-cache"
    # Questions whose step is applied to measure the deployed model's perplexity (per system).
    drift_steps: int = 8
    # {system: minimum F1}: `regrad eval --fail-under SYSTEM=F1`.
    fail_under: dict = field(default_factory=dict)
    baseline: str | None = None
    cpt: CPTConfig = field(default_factory=CPTConfig)
    # Keep the systems already answered in --out (same run key) and run only the others.
    resume: bool = False


# What must be equal for `--resume` to keep an earlier run's answers: every option that can change
# an answer, a score, the drift or the bootstrap (not --out, --cache, --systems, --fail-under, ...).
RUN_KEY_FIELDS = ("top_k", "continual", "seed", "max_new_tokens", "batch_size", "gamma", "retriever",
                  "bootstrap", "device", "ppl_max_tokens", "pool", "corpus", "drift_steps", "cpt")


def parse_systems(text: str | None) -> list[str]:
    """'all' / None -> every system; else a comma-separated list, checked."""
    if text is None or text.strip() in ("", "all"):
        return list(SYSTEMS)
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in SYSTEMS]
    if bad:
        raise ConfigError(f"unknown system(s) {', '.join(bad)} (use {', '.join(SYSTEMS)})")
    return list(dict.fromkeys(names))


def parse_fail_under(values: list[str] | None) -> dict[str, float]:
    """['regrad=0.3', ...] -> {'regrad': 0.3}; ConfigError naming the bad value."""
    out: dict[str, float] = {}
    for v in values or []:
        name, sep, num = v.partition("=")
        name = name.strip()
        if not sep or name not in SYSTEMS:
            raise ConfigError(f"--fail-under {v!r}: expected SYSTEM=F1 with SYSTEM one of {', '.join(SYSTEMS)}")
        try:
            out[name] = float(num)
        except ValueError:
            raise ConfigError(f"--fail-under {v!r}: {num!r} is not a number") from None
        if not 0.0 <= out[name] <= 1.0:
            raise ConfigError(f"--fail-under {v!r}: F1 thresholds lie between 0 and 1")
    return out


def check_config(cfg: EvalConfig) -> None:
    cfg.systems = parse_systems(",".join(cfg.systems)) if cfg.systems else list(SYSTEMS)
    if not cfg.datasets:
        raise ConfigError("give at least one --dataset FORMAT:PATH[@split] (or --dataset demo)")
    if cfg.top_k < 1:
        raise ConfigError("--top-k must be at least 1")
    if cfg.batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    if cfg.drift_steps < 0:
        raise ConfigError("--drift-steps must be 0 or more")
    if cfg.pool not in POOLS:
        raise ConfigError(f"--pool must be one of {', '.join(POOLS)}, got {cfg.pool!r}")
    if cfg.workspace and cfg.continual > 1:
        raise ConfigError("--continual feeds the corpus batch by batch into a fresh workspace: drop --workspace")
    if cfg.workspace and (cfg.model or cfg.embedder):
        raise ConfigError("--model and --embedder choose the eval workspace's models; with --workspace, "
                          "its regrad.toml names them")
    if cfg.workspace and cfg.corpus:
        raise ConfigError("--corpus adds distractors to the eval workspace; with --workspace, ingest them there")
    missing = [s for s in cfg.fail_under if s not in cfg.systems]
    if missing:
        raise ConfigError(f"--fail-under names {', '.join(missing)}, which --systems does not run")

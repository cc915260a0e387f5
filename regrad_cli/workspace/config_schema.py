"""The validated schema of ``regrad.toml``: types and ranges of every setting (pydantic).

``RegradConfig`` (regrad_cli/workspace/config.py) keeps the defaults and the comments on what each setting
means; this module only says what values are allowed. Every configuration is checked here when
it is read and after command-line overrides (``validate``), so a hostile or mistyped file ends
in one ``ConfigError`` naming the field, the value and the allowed range, never in a traceback
or an allocation the size of a typo. The sizes that bound memory are capped: LoRA rank, layers
and target lists, batch sizes, token limits, top_k and generated tokens.

Imported only when a configuration is checked (pydantic is not needed for ``regrad --help``).
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from bank_format.schema import CODECS, GROUP_SIZE_MAX, GROUP_SIZE_MIN, ZSTD_LEVEL_MAX, ZSTD_LEVEL_MIN
from regrad_cli.errors import ConfigError

# Upper bounds that keep one command's memory within what a user's limits mean.
MAX_TOKENS = 8192  # chunk and document tokens (the models' context lengths are about this)
MAX_RANK = 256  # LoRA rank: A and B of every target grow with it
MAX_LAYERS = 1024
MAX_TARGETS = 64  # entries of lora.modules and lora.target_patterns
MAX_EMBED_BATCH = 1024
MAX_BUILD_BATCH = 256
MAX_TOP_K = 64  # as regrad_cli.pipeline.MAX_TOP_K
MAX_NEW_TOKENS = 512  # as regrad_cli.pipeline.MAX_NEW_TOKENS
MAX_STORAGE_OPTIONS = 64
_TEXT = 4096  # longest id, path or URI

_Strict = ConfigDict(strict=True, extra="forbid")


def _int(lo: int, hi: int, what: str = "an integer"):
    return Annotated[int, Field(ge=lo, le=hi, description=f"{what} from {lo} to {hi}")]


def _float(lo: float, hi: float, *, gt: bool = False):
    bound = {"gt": lo} if gt else {"ge": lo}
    return Annotated[float, Field(le=hi, allow_inf_nan=False, **bound,
                                  description=f"a finite number {'above' if gt else 'from'} {lo} "
                                              f"{'and at most' if gt else 'to'} {hi}")]


def _text(min_length: int = 0, max_length: int = _TEXT):
    return Annotated[str, Field(min_length=min_length, max_length=max_length,
                                description=f"a string of {min_length} to {max_length} characters")]


class _Model(BaseModel):
    model_config = _Strict
    id: _text(1)
    device: Annotated[str, Field(pattern=r"^(cpu|cuda(:[0-9]{1,3})?|mps)$",
                                 description="cpu, cuda, cuda:N or mps")]
    dtype: Annotated[Literal["float32", "fp32", "bfloat16", "bf16", "float16", "fp16"],
                     Field(description="float32, bfloat16 or float16")]


class _Embedder(BaseModel):
    model_config = _Strict
    id: _text(1)
    batch_size: _int(1, MAX_EMBED_BATCH)


class _Chunking(BaseModel):
    model_config = _Strict
    max_tokens: _int(1, MAX_TOKENS)
    overlap: _int(0, MAX_TOKENS - 1)

    @field_validator("overlap")
    @classmethod
    def _overlap_below_max(cls, v: int, info: ValidationInfo) -> int:
        top = info.data.get("max_tokens")
        if top is not None and v >= top:
            raise ValueError(f"must be below max_tokens ({top})")
        return v


class _Lora(BaseModel):
    model_config = _Strict
    rank: Annotated[Union[Literal["auto"], _int(1, MAX_RANK)],
                    Field(description=f'"auto" or an integer from 1 to {MAX_RANK}')]
    lora_alpha: Annotated[Union[Literal["auto"], _float(0.0, 1e6, gt=True)],
                          Field(description='"auto" or a finite number above 0 and at most 1e6')]
    layers: Annotated[Union[Literal["upper-half", "upper", "all"],
                            Annotated[list[_int(0, MAX_LAYERS - 1)], Field(max_length=MAX_LAYERS)]],
                      Field(description=f'"upper-half", "all" or a list of at most {MAX_LAYERS} '
                                        f'layer indices from 0 to {MAX_LAYERS - 1}')]
    modules: Annotated[list[_text(1, 200)], Field(max_length=MAX_TARGETS,
                                                  description=f"at most {MAX_TARGETS} module names")]
    target_patterns: Annotated[list[_text(1, 1000)], Field(max_length=MAX_TARGETS,
                                                           description=f"at most {MAX_TARGETS} patterns")]
    init_b_std: _float(0.0, 10.0)
    alpha_init: _float(0.0, 1e6, gt=True)
    per_element_alpha: Annotated[bool, Field(description="true or false")]
    seed: _int(0, 2**63 - 1)


class _Learner(BaseModel):
    model_config = _Strict
    checkpoint: _text(1)


class _Bank(BaseModel):
    model_config = _Strict
    codec: Annotated[Literal[CODECS], Field(description=", ".join(CODECS))]  # type: ignore[valid-type]
    zstd_level: _int(ZSTD_LEVEL_MIN, ZSTD_LEVEL_MAX)
    group_size: _int(GROUP_SIZE_MIN, GROUP_SIZE_MAX, "an even integer")
    batch_size: _int(1, MAX_BUILD_BATCH)
    max_doc_tokens: _int(1, MAX_TOKENS)
    compute_dtype: Annotated[Literal["auto", "float32", "bfloat16"], Field(description="auto, float32 or bfloat16")]
    uri: _text()
    storage_options: Annotated[dict[_text(1, 200), Union[_text(), bool, int, float]],
                               Field(max_length=MAX_STORAGE_OPTIONS,
                                     description=f"a table of at most {MAX_STORAGE_OPTIONS} "
                                                 f"strings, numbers or booleans")]

    @field_validator("group_size")
    @classmethod
    def _even_group(cls, v: int) -> int:
        if v % 2:
            raise ValueError("must be even")
        return v


class _Query(BaseModel):
    model_config = _Strict
    mode: Annotated[Literal["param", "param+context", "context", "rag+phi", "closed-book", "closed-book+phi"],
                    Field(description="param, param+context, context, rag+phi, closed-book or closed-book+phi")]
    top_k: _int(0, MAX_TOP_K)
    gamma: _float(-100.0, 100.0)  # as the server's request limit
    combine: Annotated[Literal["", "sum", "mean", "score"], Field(description='"", sum, mean or score')]
    retriever: Annotated[Literal["dense", "bm25", "hybrid"], Field(description="dense, bm25 or hybrid")]
    max_new_tokens: _int(1, MAX_NEW_TOKENS)


class RegradSchema(BaseModel):
    model_config = _Strict
    model: _Model
    embedder: _Embedder
    chunking: _Chunking
    lora: _Lora
    learner: _Learner
    bank: _Bank
    query: _Query


def _allowed(loc: tuple) -> str | None:
    """The description of the field at ``loc`` (its allowed values), if it has one."""
    model: type[BaseModel] | None = RegradSchema
    info = None
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            break
        info = model.model_fields[part]
        ann = info.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    if info is None:
        return None
    if info.description:
        return info.description
    for m in info.metadata:
        if getattr(m, "description", None):
            return m.description
    return None


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_SPECIFIC = ("greater_than", "less_than", "too_long", "too_short", "string_pattern_mismatch",
             "value_error", "finite_number", "missing", "extra_forbidden")


def validate(data: dict, source: str) -> None:
    """ConfigError (one line: source, field, value, allowed range) unless ``data`` (a complete
    configuration, as ``RegradConfig.to_dict`` gives it without its version) fits the schema."""
    try:
        RegradSchema.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]["loc"][:2]
        same = [e for e in errors if e["loc"][:2] == first]
        # A union ("auto" or an integer) reports one error per member: the range one says most.
        err = next((e for e in same if e["type"].startswith(_SPECIFIC)), same[0])
        loc = err["loc"]
        field = ".".join(str(p) for p in loc[:2]) or "(top level)"
        keys = [p for p in loc[2:] if isinstance(p, int)]
        if field == "bank.storage_options" and len(loc) > 2 and isinstance(loc[2], str):
            keys = [loc[2]]
        rest = "".join(f"[{k!r}]" for k in keys)
        allowed = _allowed(tuple(loc[:2]))
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{source}: {field}{rest} = {_show(err.get('input'))} is invalid: {msg}"
                          + (f" (allowed: {allowed})" if allowed else "")) from None

"""Learner checkpoints on disk: two files, a format version, named migrations.

A checkpoint directory holds

* ``learner.safetensors``: ``phi.<module>.A`` [r, in] and ``phi.<module>.B`` [out, r] for every
  target module, ``log_alpha.<same names>`` (a scalar each, or the tensor's shape with
  per-element step sizes) and ``combine.log_temp`` (the temperature of score-weighted
  combination), all float32;
* ``learner.json``: ``format`` ("regrad-learner/MAJOR.MINOR"), ``checkpoint_id`` (sha256 over the
  spec and every tensor, ``Learner.checkpoint_id``), ``spec`` (``LearnerSpec.to_dict``), ``names``
  (tensor order) and whatever the trainer recorded (``combine``, ``norm``, ``energy``...).

Versions: 1.0 (the first; the tag was written "regrad-learner/1"), 1.1 (``spec.target_patterns``
when set; ``combine.log_temp`` always present), 1.2 (optional ``transform.<module>.K`` [r, in] and
``transform.<module>.V`` [r, out]: a document key map, regrad_cli.learner.transform; part of the
content id when present), 1.3 (optional ``doc_loss`` in learner.json, one of
``doc_loss.DOC_LOSSES``, absent meaning ``plain`` and hashed into the content id only when it is
not; optional ``transform.<module>.u`` [in] and ``transform.<module>.b`` [] with a key map: its
learned per-token weights, stored only when enabled). A reader refuses a newer major, reads a newer
minor, and brings an older file to LEARNER_VERSION in memory through LEARNER_MIGRATIONS; files
are never rewritten (the shipped checkpoint is read-only). safetensors holds no code, so loading
a checkpoint cannot run any.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from regrad_cli.errors import RegradError
from regrad_cli.files import atomic_path, read_at_most
from regrad_cli.versions import Migrations, Version

CHECKPOINT_TENSORS = "learner.safetensors"
CHECKPOINT_CONFIG = "learner.json"
CHECKPOINT_FORMAT = "regrad-learner"
LEARNER_VERSION = Version(1, 3)
LEARNER_MIGRATIONS = Migrations("learner checkpoint")
# Keys of learner.json that are the format's own; everything else is the learner's ``meta``.
_OWN_KEYS = ("format", "checkpoint_id", "spec", "names")


def save_learner(learner, directory: str | Path, extra: dict | None = None) -> str:
    """Write ``learner`` (atomically: temporary files, then renames); returns its content id."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for n in learner.names:
        tensors["phi." + n] = learner.tensor(n).detach().cpu().contiguous()
        tensors["log_alpha." + n] = learner.log_alpha_of(n).detach().cpu().contiguous()
    tensors["combine.log_temp"] = learner.log_temp.detach().cpu().reshape(())
    if learner.transform is not None:
        tensors.update({n: t.detach().cpu().contiguous() for n, t in learner.transform.tensors().items()})
    cid = learner.checkpoint_id()
    meta = {"format": f"{CHECKPOINT_FORMAT}/{LEARNER_VERSION}", "checkpoint_id": cid,
            "spec": learner.spec.to_dict(), "names": learner.names, **learner.meta, **(extra or {})}
    # The tensors are renamed into place first, then learner.json (the inner block ends first).
    with atomic_path(directory / CHECKPOINT_CONFIG) as tmp_c, atomic_path(directory / CHECKPOINT_TENSORS) as tmp_t:
        save_file(tensors, str(tmp_t))
        tmp_c.write_text(json.dumps(meta, indent=2))
    return cid


def load_learner(directory: str | Path, cls, spec_cls, expect_values=None):
    """The learner saved in ``directory``, made as ``cls(spec_cls(**spec), shapes)`` (``Learner.load``
    passes lora.Learner and lora.LearnerSpec), checked against its recorded content id.

    ``expect_values(spec)``, when given (the learner is loaded for a model), is how many values
    phi holds for that spec on the model: a tensors file larger than such a learner can be (phi,
    per-element step sizes and a key map, in float32) is refused before it is read. A sparse file
    of terabytes with a well-formed header was otherwise read whole, then found not to fit."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = read_config(directory / CHECKPOINT_CONFIG)
    if expect_values is not None:
        _check_size(directory, meta, spec_cls, expect_values)
    try:
        tensors = load_file(str(directory / CHECKPOINT_TENSORS))
    except (OSError, ValueError, SafetensorError) as exc:  # missing, truncated, damaged header
        raise RegradError(f"cannot read learner checkpoint {directory / CHECKPOINT_TENSORS}: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    meta, tensors = upgrade(meta, tensors, directory)
    try:
        spec = spec_cls(**meta["spec"])
        _check_spec(spec, directory)
        shapes = {n: tuple(tensors["phi." + n].shape) for n in meta["names"]}
        learner = cls(spec, shapes)
        with torch.no_grad():
            for n in learner.names:
                learner.tensor(n).copy_(tensors["phi." + n])
                learner.log_alpha_of(n).copy_(tensors["log_alpha." + n])
            learner.log_temp.copy_(tensors["combine.log_temp"])
        from regrad_cli.learner.transform import KeyMap

        learner.transform = KeyMap.from_tensors(tensors)
        if learner.transform is not None:
            learner.transform.check_fits(learner)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as exc:
        raise RegradError(f"learner checkpoint {directory} is malformed ({type(exc).__name__}: {exc})") from exc
    learner.meta = {k: v for k, v in meta.items() if k not in _OWN_KEYS}
    _check_doc_loss(learner.meta, directory)
    if meta.get("checkpoint_id") and meta["checkpoint_id"] != learner.checkpoint_id():
        raise RegradError(
            f"learner checkpoint {directory} is corrupt: content id {learner.checkpoint_id()[:16]} "
            f"!= recorded {str(meta['checkpoint_id'])[:16]}"  # any JSON value: never subscript it as given
        )
    return learner


def _check_doc_loss(meta: dict, directory: Path) -> None:
    """RegradError unless the recorded document loss (if any) is one this regrad computes: a
    gradient of another loss would silently be the wrong one."""
    from regrad_cli.learner.doc_loss import DOC_LOSSES

    if "doc_loss" in meta and meta["doc_loss"] not in DOC_LOSSES:
        shown = repr(meta["doc_loss"])
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise RegradError(f"learner checkpoint {directory} takes document gradients of the loss {shown}, which this "
                          f"regrad does not know (it knows {', '.join(DOC_LOSSES)}): upgrade regrad")


def _check_spec(spec, directory: Path) -> None:
    """RegradError unless every field of a checkpoint's spec has its type: learner.json may come
    from someone else, and a string where a number goes failed only later, in the maths (a
    TypeError traceback from ``lora_alpha / rank``)."""
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def strings(v) -> bool:
        return isinstance(v, list) and all(isinstance(x, str) for x in v)

    checks = {
        "rank": (isinstance(spec.rank, int) and not isinstance(spec.rank, bool) and 1 <= spec.rank <= MAX_RANK,
                 f"an integer from 1 to {MAX_RANK}"),
        "lora_alpha": (number(spec.lora_alpha) and spec.lora_alpha > 0, "a finite number above 0"),
        "layers": (isinstance(spec.layers, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in spec.layers),
                   "a list of layer indices"),
        "modules": (strings(spec.modules), "a list of module names"),
        "per_element_alpha": (isinstance(spec.per_element_alpha, bool), "true or false"),
        "target_patterns": (strings(spec.target_patterns), "a list of patterns"),
    }
    for name, (ok, what) in checks.items():
        if not ok:
            shown = repr(getattr(spec, name))
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise RegradError(f"learner checkpoint {directory} is malformed: spec.{name} = {shown} is not {what}")


def _check_size(directory: Path, meta: dict, spec_cls, expect_values) -> None:
    """RegradError when learner.safetensors is larger than a learner of its spec can be on the
    model (``load_learner``). A spec that cannot be read is left to the full load to report."""
    try:
        spec = spec_cls(**meta["spec"])
    except (KeyError, TypeError):
        return
    _check_spec(spec, directory)
    try:
        values = int(expect_values(spec))
    except (RegradError, KeyError, TypeError, ValueError, AttributeError, IndexError):
        return  # the spec does not fit the model: check_fits says so after the (bounded) load
    bound = 3 * 4 * values + MAX_CONFIG_BYTES  # phi, per-element step sizes, a key map; a header
    try:
        size = (directory / CHECKPOINT_TENSORS).stat().st_size
    except OSError:
        return  # missing: the load says so
    if size > bound:
        raise RegradError(f"learner checkpoint {directory / CHECKPOINT_TENSORS} holds {size} bytes, more than a "
                          f"learner of its spec can on this model ({bound}): refused before reading it")


# learner.json holds a spec, names and a few records: far below this.
MAX_CONFIG_BYTES = 16 << 20
# Far above any LoRA rank regrad makes ([lora] rank is at most 256): a bound for hostile specs.
MAX_RANK = 4096


def read_config(path: Path) -> dict:
    """A checkpoint's learner.json as a dict; RegradError (one line) when it is missing, too large,
    not JSON, nested too deeply for the parser, or not an object."""
    raw = read_at_most(path, MAX_CONFIG_BYTES, f"learner checkpoint config {path}", RegradError)
    try:
        meta = json.loads(raw)
    except RecursionError:
        raise RegradError(f"learner checkpoint config {path} is nested too deeply: refused") from None
    except ValueError as exc:  # not UTF-8, not JSON
        raise RegradError(f"learner checkpoint config {path} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise RegradError(f"learner checkpoint config {path} is not a JSON object")
    return meta


# Formats whose upgrade to LEARNER_VERSION leaves the content id as recorded (m002, m003 add nothing;
# m001 adds the temperature, which the id covers, so 1.0 files are not among them).
ID_STABLE_FORMATS = (f"{CHECKPOINT_FORMAT}/1.1", f"{CHECKPOINT_FORMAT}/1.2", f"{CHECKPOINT_FORMAT}/1.3")


def recorded_checkpoint_id(directory: str | Path) -> str | None:
    """The content id ``learner.json`` records, read without torch, when the checkpoint looks
    whole: a format that keeps its id through the upgrade on load (``ID_STABLE_FORMATS``), a
    well-formed spec and names, and a tensors file whose header accounts for its exact size. Else
    None, and the caller loads the learner, whose errors then say what is wrong."""
    import re

    directory = Path(directory)
    try:
        meta = read_config(directory / CHECKPOINT_CONFIG)
    except RegradError:
        return None
    cid = meta.get("checkpoint_id")
    names, spec = meta.get("names"), meta.get("spec")
    if not (meta.get("format") in ID_STABLE_FORMATS and isinstance(cid, str) and re.fullmatch(r"[0-9a-f]{64}", cid)
            and isinstance(names, list) and names and all(isinstance(n, str) for n in names)
            and isinstance(spec, dict) and isinstance(spec.get("rank"), int) and not isinstance(spec.get("rank"), bool)):
        return None
    return cid if _tensors_file_whole(directory / CHECKPOINT_TENSORS) else None


def _tensors_file_whole(path: Path) -> bool:
    """A safetensors file whose JSON header is sane and whose tensors end exactly at the file's end
    (a truncated or padded file, an oversized header or a missing file is not whole)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n < 2 or n > min(size - 8, 16 << 20):
                return False
            header = json.loads(fh.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        return bool(ends) and 8 + n + max(ends) == size
    except (OSError, ValueError, RecursionError, TypeError, KeyError, IndexError, AttributeError):
        return False


def upgrade(meta: dict, tensors: dict, directory: Path) -> tuple[dict, dict]:
    """Check learner.json's format tag; bring an older checkpoint to LEARNER_VERSION in memory."""
    tag = meta.get("format") if isinstance(meta, dict) else None
    prefix, _, version = str(tag).partition("/")
    if prefix != CHECKPOINT_FORMAT or not version:
        raise RegradError(f"{directory / CHECKPOINT_CONFIG} is not a regrad learner checkpoint "
                          f"(format {tag!r}, expected {CHECKPOINT_FORMAT}/MAJOR.MINOR)")
    found = Version.parse(version, str(directory / CHECKPOINT_CONFIG))
    data, _ = LEARNER_MIGRATIONS.upgrade({"meta": meta, "tensors": tensors}, found, LEARNER_VERSION,
                                         str(directory))
    return data["meta"], data["tensors"]


# Migrations: append only, never edit (versions.py) ------------------------------------------------
@LEARNER_MIGRATIONS.register(Version(1, 1))
def m001_combine_temperature(data: dict) -> dict:
    """Format 1.0 checkpoints written before score-weighted combination have no temperature: they
    get the initial one (0.05), which is what such a learner used."""
    import torch

    data["tensors"].setdefault("combine.log_temp", torch.tensor(math.log(0.05)))
    return data


@LEARNER_MIGRATIONS.register(Version(1, 2))
def m002_document_transform(data: dict) -> dict:
    """Format 1.2 may hold a document key map (``transform.<module>.K`` and ``.V``); an older
    checkpoint has none, which is the paper's plain document gradient: nothing to change."""
    return data


@LEARNER_MIGRATIONS.register(Version(1, 3))
def m003_document_loss_and_token_weights(data: dict) -> dict:
    """Format 1.3 may record ``doc_loss`` and hold a key map's per-token weights
    (``transform.<module>.u`` and ``.b``); an older checkpoint has neither: the plain loss and an
    unweighted map, which is what it computed. Nothing to change."""
    return data

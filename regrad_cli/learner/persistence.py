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
content id when present). A reader refuses a newer major, reads a newer
minor, and brings an older file to LEARNER_VERSION in memory through LEARNER_MIGRATIONS; files
are never rewritten (the shipped checkpoint is read-only). safetensors holds no code, so loading
a checkpoint cannot run any.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from regrad_cli.errors import RegradError
from regrad_cli.versions import Migrations, Version

CHECKPOINT_TENSORS = "learner.safetensors"
CHECKPOINT_CONFIG = "learner.json"
CHECKPOINT_FORMAT = "regrad-learner"
LEARNER_VERSION = Version(1, 2)
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
    tmp_t = directory / (CHECKPOINT_TENSORS + ".tmp")
    tmp_c = directory / (CHECKPOINT_CONFIG + ".tmp")
    save_file(tensors, str(tmp_t))
    tmp_c.write_text(json.dumps(meta, indent=2))
    tmp_t.replace(directory / CHECKPOINT_TENSORS)
    tmp_c.replace(directory / CHECKPOINT_CONFIG)
    return cid


def load_learner(directory: str | Path, cls, spec_cls):
    """The learner saved in ``directory``, made as ``cls(spec_cls(**spec), shapes)`` (``Learner.load``
    passes lora.Learner and lora.LearnerSpec), checked against its recorded content id."""
    import torch
    from safetensors.torch import load_file

    directory = Path(directory)
    try:
        meta = json.loads((directory / CHECKPOINT_CONFIG).read_text())
        tensors = load_file(str(directory / CHECKPOINT_TENSORS))
    except (OSError, ValueError) as exc:
        raise RegradError(f"cannot read learner checkpoint {directory}: {exc}") from exc
    meta, tensors = upgrade(meta, tensors, directory)
    try:
        spec = spec_cls(**meta["spec"])
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
    except (KeyError, TypeError, RuntimeError) as exc:
        raise RegradError(f"learner checkpoint {directory} is malformed ({type(exc).__name__}: {exc})") from exc
    learner.meta = {k: v for k, v in meta.items() if k not in _OWN_KEYS}
    if meta.get("checkpoint_id") and meta["checkpoint_id"] != learner.checkpoint_id():
        raise RegradError(
            f"learner checkpoint {directory} is corrupt: content id {learner.checkpoint_id()[:16]} "
            f"!= recorded {meta['checkpoint_id'][:16]}"
        )
    return learner


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

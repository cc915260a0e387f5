"""Which learner checkpoint is meant, in one place: 'bundled' (the shipped meta-trained
checkpoint of the bundled model), 'init' (an untrained, seeded learner shaped by [lora]) or a
checkpoint directory (a meta-train output directory means its ``best/``).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

from regrad_cli.errors import NoBankError, RegradError
from regrad_cli.workspace.config import BUNDLED_CHECKPOINT, BUNDLED_MODEL, LoraConfig, Workspace

if TYPE_CHECKING:
    from regrad_cli.learner.lora import Learner

log = logging.getLogger("regrad")


def bundled_checkpoint_dir() -> Path:
    return Path(str(files("regrad_cli") / "data" / "checkpoints" / "smollm2-135m-instruct"))


def checkpoint_dir(choice: str) -> Path:
    """The directory of a learner checkpoint choice: 'bundled' or a directory (a meta-train output
    directory means its ``best/``). 'init' has no directory: RegradError."""
    if choice == "init":
        raise RegradError("the untrained 'init' learner has no checkpoint directory to record into")
    path = bundled_checkpoint_dir() if choice == BUNDLED_CHECKPOINT else Path(choice).expanduser()
    if (path / "best" / "learner.json").exists():
        path = path / "best"
    return path


def init_learner(model, lora_cfg: LoraConfig | None = None, **overrides) -> Learner:
    """An untrained learner for ``model``, shaped and seeded by ``lora_cfg`` ([lora] of
    regrad.toml; its defaults when None), each keyword overriding the field of the same name.

    The one place a fresh learner is made: ``resolve_learner`` ('init') and meta-training both
    call it, so they share every default (targets by model family, alpha_init, seed...). An
    override of None leaves the field as it is."""
    from regrad_cli.learner.lora import Learner

    cfg = replace(lora_cfg or LoraConfig(), **{k: v for k, v in overrides.items() if v is not None})
    auto = lambda v: None if v == "auto" else v  # noqa: E731  (by model size: lora.default_lora)
    learner = Learner.for_model(model, rank=auto(cfg.rank), lora_alpha=auto(cfg.lora_alpha), layers=cfg.layers,
                                modules=cfg.modules, per_element_alpha=cfg.per_element_alpha,
                                target_patterns=cfg.target_patterns)
    return learner.init_(seed=cfg.seed, b_std=cfg.init_b_std, alpha_init=cfg.alpha_init)


def resolve_learner(ws_or_none: Workspace | None, model, model_id: str, checkpoint: str | None) -> Learner:
    """The learner for ``model``: from ``checkpoint`` ('bundled', 'init' or a directory)."""
    from regrad_cli.learner.lora import Learner

    lcfg = ws_or_none.config.lora if ws_or_none else None
    choice = checkpoint or (ws_or_none.config.learner.checkpoint if ws_or_none else BUNDLED_CHECKPOINT)
    if choice == BUNDLED_CHECKPOINT:
        path = bundled_checkpoint_dir()
        if model_id == BUNDLED_MODEL and (path / "learner.json").exists():
            return Learner.load(path, model)
        log.info("no shipped checkpoint for %s: using the untrained init", model_id)
        choice = "init"
    if choice == "init":
        learner = init_learner(model, lcfg)
        if ws_or_none is not None and checkpoint is None and model_id == ws_or_none.config.model.id:
            _remember_init_id(ws_or_none, learner.checkpoint_id())
        return learner
    path = checkpoint_dir(choice)  # a meta-train output directory means its best/
    if not (path / "learner.json").exists():
        raise RegradError(f"no learner checkpoint at {path} (expected learner.json and learner.safetensors)")
    return Learner.load(path, model)


def current_doc_loss(ws) -> str | None:
    """The document loss of the workspace's learner (learner/doc_loss.py), read from its
    learner.json without torch: 'plain' for an untrained learner or a checkpoint that records
    none; None when its files cannot be read (the load then says why)."""
    choice = ws.config.learner.checkpoint
    if choice == "init" or (choice == BUNDLED_CHECKPOINT and ws.config.model.id != BUNDLED_MODEL):
        return "plain"
    from regrad_cli.learner.persistence import read_config

    try:
        meta = read_config(checkpoint_dir(choice) / "learner.json")
    except RegradError:
        return None
    loss = meta.get("doc_loss", "plain")
    return loss if isinstance(loss, str) else None


def set_doc_loss(directory: str | Path, name: str) -> dict:
    """Give the checkpoint in ``directory`` the document loss ``name`` (doc_loss.py): learner.json
    gets ``doc_loss`` and the new content id, written atomically (the tensors are untouched; a
    format 1.0 checkpoint, whose tensors the loader migrates, is saved whole in the current
    format). An energy record (``stored_tensors``) measured with the old loss is removed. Returns
    what changed."""
    import json

    from regrad_cli.files import atomic_write_text
    from regrad_cli.learner.doc_loss import check_doc_loss
    from regrad_cli.learner.energy import META_KEY
    from regrad_cli.learner.lora import Learner
    from regrad_cli.learner.persistence import (CHECKPOINT_CONFIG, CHECKPOINT_FORMAT, ID_STABLE_FORMATS,
                                                LEARNER_VERSION, read_config, save_learner)

    check_doc_loss(name)
    directory = Path(directory)
    learner = Learner.load(directory)
    previous, previous_id = learner.doc_loss, learner.checkpoint_id()
    result = {"checkpoint": str(directory), "previous": previous, "previous_id": previous_id, "doc_loss": name,
              "checkpoint_id": previous_id, "changed": previous != name, "energy_dropped": False}
    if previous == name:
        return result
    learner.doc_loss = name
    result["checkpoint_id"] = cid = learner.checkpoint_id()
    result["energy_dropped"] = learner.meta.pop(META_KEY, None) is not None
    meta = read_config(directory / CHECKPOINT_CONFIG)
    if meta.get("format") in ID_STABLE_FORMATS:
        meta.pop(META_KEY, None)
        meta.update({"format": f"{CHECKPOINT_FORMAT}/{LEARNER_VERSION}", "checkpoint_id": cid, "doc_loss": name})
        try:
            atomic_write_text(directory / CHECKPOINT_CONFIG, json.dumps(meta, indent=2))
        except OSError as exc:
            raise RegradError(f"cannot write {directory / CHECKPOINT_CONFIG}: {exc}") from exc
    else:
        save_learner(learner, directory)
    return result


def current_checkpoint_id(ws, required: bool = True) -> str | None:
    """The id of the workspace's learner checkpoint, read from its files (no model is loaded).

    None (or NoBankError when ``required``) when it cannot be told without the model: an 'init'
    learner, the bundled checkpoint with another model, or a missing directory. Loads only the
    learner's files (no model)."""

    choice = ws.config.learner.checkpoint
    path = None
    if choice != "init" and not (choice == BUNDLED_CHECKPOINT and ws.config.model.id != BUNDLED_MODEL):
        path = checkpoint_dir(choice)
    if path is not None and (path / "learner.json").exists():
        from regrad_cli.learner.persistence import recorded_checkpoint_id

        # The id learner.json records (no torch import: `status`, an up-to-date build and `bank`
        # commands stay quick), else the learner loaded.
        cid = recorded_checkpoint_id(path)
        if cid is None:
            from regrad_cli.learner.lora import Learner

            cid = Learner.load(path).checkpoint_id()
        return cid
    if path is None:  # an untrained learner: the id an earlier load of the same model recorded
        cid = _recorded_init_id(ws)
        if cid is not None:
            return cid
    if required:
        raise NoBankError(f"cannot tell which bank under {ws.banks_location} is current (learner checkpoint "
                          f"{choice!r} has no files to read); pass --bank DIR or URI")
    return None


# An untrained learner's id depends on the model's tensor shapes, so it is only known once the
# model has loaded. The first load records it in the workspace, under a key of everything the
# learner is made from, so that `status`, an up-to-date `build-bank` and `bank` commands of a
# workspace of another model (no shipped learner) load no model either. A key that no longer
# matches (another model, config.json, [lora] or regrad version) is ignored: the model loads.
INIT_ID_FILE = "learner-init.json"


def _init_key(ws) -> str | None:
    import hashlib
    import json
    from dataclasses import asdict

    from regrad_cli import __version__
    from regrad_cli.lm.models import model_config_digest

    digest = model_config_digest(ws.config.model.id)
    if digest is None:
        return None
    blob = json.dumps({"model": ws.config.model.id, "config": digest, "dtype": ws.config.model.dtype,
                       "lora": asdict(ws.config.lora), "regrad": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _remember_init_id(ws, cid: str) -> None:
    import json

    from regrad_cli.files import atomic_write_text

    key = _init_key(ws)
    if key is None or _recorded_init_id(ws) == cid:
        return
    try:
        atomic_write_text(ws.root / INIT_ID_FILE, json.dumps({"key": key, "checkpoint_id": cid}) + "\n")
    except OSError as exc:  # a read-only workspace: only the shortcut is lost
        log.debug("cannot record the untrained learner's id: %s", exc)


def _recorded_init_id(ws) -> str | None:
    import json

    from regrad_cli.files import read_bounded

    try:  # a copied workspace's file: regular and small, or ignored (the model loads instead)
        rec = json.loads(read_bounded(ws.root / INIT_ID_FILE, 4096).decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("checkpoint_id"), str):
        return None
    return rec["checkpoint_id"] if rec.get("key") == _init_key(ws) else None

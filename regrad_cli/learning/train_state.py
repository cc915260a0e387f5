"""``state.pt``: what a meta-training run needs to continue, as one small, versioned file.

``torch.save`` of a dict, read back with ``weights_only`` (plain containers and tensors: a state
file from someone else cannot run code). Format ``regrad-metatrain-state/1.0``:

* ``format``: ``"regrad-metatrain-state/MAJOR.MINOR"``;
* ``step`` (meta-steps done), ``best_f1`` (best dev selection score so far, -1.0 for none) and
  ``history`` (``{"config", "pools", "train": [...], "dev": [...]}`` and, once a run was resumed with
  other options, ``"config_changes"``: what log.json holds);
* ``learner``: the learner's tensors under ``Learner.state_dict`` names, float32. A run that keeps
  phi frozen (``--freeze-phi``) leaves the ``phi.*`` tensors out: they are the run's starting phi
  (the ``--init`` checkpoint's, or the seeded init), which a resumed run rebuilds;
* ``phi``: ``{"stored": bool, "sha256": hex, "init": the --init checkpoint or None}``; ``sha256``
  is taken over phi's tensors in the learner's order (``phi_sha256``). When phi is not stored, a
  resumed run must start from a phi with this sha256, else it is refused;
* ``opt``: the AdamW ``state_dict``; the moments (``exp_avg``, ``exp_avg_sq``) of tensors with at
  least ``moments.min_values`` values are bfloat16, smaller ones float32 (they cost nothing, and
  keep the step sizes alpha, whose learning rate is large, exact). bfloat16 rather than float16:
  ``exp_avg_sq`` holds squared gradients, often far below float16's smallest value (6e-8), and
  an Adam moment rounded to 0 would turn into a huge step;
* ``moments``: ``{"dtype": "bfloat16", "min_values": int}``;
* ``sched``: the learning-rate schedule's ``state_dict``.

Versions: 0 (no ``format`` key; keys learner, opt, sched, step, best_f1 and history, phi always
stored, every moment float32) becomes 1.0 through ``m001_versioned``. A reader refuses a newer
major, reads a newer minor, and brings an older file to ``STATE_VERSION`` in memory; files are not
rewritten (the next save writes the current format).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from regrad_cli.errors import RegradError
from regrad_cli.files import atomic_path
from regrad_cli.lm.models import hash_tensor
from regrad_cli.versions import Migrations, Version

STATE_FILE = "state.pt"
STATE_FORMAT = "regrad-metatrain-state"
STATE_VERSION = Version(1, 0)
STATE_MIGRATIONS = Migrations("meta-training state")
# Moments of tensors with fewer values stay float32 (the step sizes alpha: one value per tensor).
MOMENTS_MIN_VALUES = 1024
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_LEGACY_KEYS = ("learner", "opt", "sched", "step", "best_f1", "history")


def phi_sha256(learner) -> str:
    """sha256 over phi's tensors in the learner's order (names included)."""
    h = hashlib.sha256()
    for n in learner.names:
        h.update(n.encode())
        hash_tensor(h, learner.tensor(n))
    return h.hexdigest()


def write_state(path: str | Path, *, learner, opt, sched, step: int, best_f1: float, history: dict,
                store_phi: bool = True, init: str | None = None) -> None:
    """Write ``path`` in the current format, atomically (a reader sees the old state or the new).
    Every tensor is written from host memory: a state saved by a GPU run reads on any machine."""
    tensors = {k: _host(v) for k, v in learner.state_dict().items()}
    if not store_phi:
        tensors = {k: v for k, v in tensors.items() if not k.startswith("phi.")}
    state = {
        "format": f"{STATE_FORMAT}/{STATE_VERSION}",
        "step": step, "best_f1": best_f1, "history": history,
        "learner": tensors,
        "phi": {"stored": store_phi, "sha256": phi_sha256(learner), "init": init},
        "opt": _compact_moments(opt.state_dict()),
        "moments": {"dtype": "bfloat16", "min_values": MOMENTS_MIN_VALUES},
        "sched": sched.state_dict(),
    }
    with atomic_path(path, fsync=True) as tmp:
        torch.save(state, tmp)


def _compact_moments(opt_state: dict) -> dict:
    state = {}
    for idx, entry in opt_state["state"].items():
        state[idx] = {k: _host(v.to(torch.bfloat16) if k in MOMENT_KEYS and v.numel() >= MOMENTS_MIN_VALUES else v)
                      for k, v in entry.items()}
    return {**opt_state, "state": state}


def _host(value):
    return value.cpu() if isinstance(value, torch.Tensor) else value


def read_state(path: str | Path) -> dict:
    """The state in ``path``, brought to ``STATE_VERSION``; one RegradError line for a file that
    is unreadable, damaged, not a state, or of a newer major format."""
    where = str(path)
    import warnings

    try:
        # weights_only: a run directory may come from someone else; never unpickle code from it.
        with warnings.catch_warnings():  # torch warns (2 lines) before refusing some pickles
            warnings.simplefilter("ignore")
            data = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - a damaged file raises RuntimeError, EOFError, UnpicklingError...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if "Weights only load failed" in str(exc):
            # torch's own message goes on to explain how to load it anyway (running its code).
            first = "it holds Python objects beyond tensors and plain data, which regrad never unpickles"
        raise RegradError(f"cannot read {where} ({first[:300]}): it is damaged or not a meta-training state; "
                          "restore it from git or a backup, or start the run again without --resume "
                          "into an empty --out") from None
    if not isinstance(data, dict):
        raise RegradError(f"{where} is not a meta-training state (it holds a {type(data).__name__}, not a dict)")
    if "format" in data:
        tag = data["format"]
        prefix, _, version = str(tag).partition("/")
        if prefix != STATE_FORMAT or not version:
            raise RegradError(f"{where} is not a meta-training state (format {str(tag)[:80]!r}, "
                              f"expected {STATE_FORMAT}/MAJOR.MINOR)")
        found = Version.parse(version, where)
    elif all(k in data for k in _LEGACY_KEYS):
        found = Version(0, 0)  # written before state.pt had a version
    else:
        raise RegradError(f"{where} is not a meta-training state (no format and none of its keys)")
    data, _ = STATE_MIGRATIONS.upgrade(data, found, STATE_VERSION, where)
    _check_fields(data, where)
    return data


def _check_fields(data: dict, where: str) -> None:
    def bad(what: str) -> RegradError:
        return RegradError(f"{where} is damaged: {what}; restore it from git or a backup")

    step = data.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise bad("'step' is not a count of steps")
    if not isinstance(data.get("best_f1"), (int, float)) or isinstance(data.get("best_f1"), bool):
        raise bad("'best_f1' is not a number")
    history = data.get("history")
    if not (isinstance(history, dict) and isinstance(history.get("train"), list)
            and isinstance(history.get("dev"), list)):
        raise bad("'history' has no train and dev logs")
    tensors = data.get("learner")
    if not (isinstance(tensors, dict) and all(isinstance(v, torch.Tensor) for v in tensors.values())):
        raise bad("'learner' is not a dict of tensors")
    for key in ("opt", "sched"):
        if not isinstance(data.get(key), dict):
            raise bad(f"'{key}' is not a dict")
    phi = data.get("phi")
    if not (isinstance(phi, dict) and isinstance(phi.get("stored"), bool)
            and (phi["stored"] or isinstance(phi.get("sha256"), str))):
        raise bad("'phi' does not say whether phi is stored")


def apply_state(state: dict, learner, opt, sched, where: str) -> None:
    """Load ``state`` (from ``read_state``) into the learner, optimiser and schedule of a run that
    was set up as the one that wrote it. A phi left out of the state must be the run's own phi."""
    phi = state["phi"]
    if not phi["stored"] and phi_sha256(learner) != phi["sha256"]:
        init = phi.get("init")
        raise RegradError(
            f"{where} continues a run whose phi (frozen, not stored) came from "
            f"{'--init ' + str(init) if init else 'the seeded init'} with sha256 {phi['sha256'][:16]}; "
            f"this run starts from phi {phi_sha256(learner)[:16]}: resume with the same --init (and --seed)")
    tensors = learner.state_dict()
    tensors.update(state["learner"])
    try:
        # Moments stored in bfloat16 continue in float32, the dtype Adam keeps them in.
        opt_state = {**state["opt"], "state": {idx: {k: v.float() if k in MOMENT_KEYS else v for k, v in entry.items()}
                                               for idx, entry in state["opt"]["state"].items()}}
        learner.load_state_dict(tensors)
        opt.load_state_dict(opt_state)
        sched.load_state_dict(state["sched"])
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RegradError(f"{where} does not fit this run ({first[:300]}): resume with the options and "
                          "--init the run was started with") from None


# Migrations: append only, never edit (versions.py) ------------------------------------------------
@STATE_MIGRATIONS.register(Version(1, 0))
def m001_versioned(data: dict) -> dict:
    """An unversioned state (before 1.0) stored phi always and every moment in float32: say so."""
    data = dict(data)
    data["phi"] = {"stored": True, "sha256": None, "init": None}
    data["moments"] = {"dtype": "float32", "min_values": 0}
    data["format"] = f"{STATE_FORMAT}/1.0"
    return data

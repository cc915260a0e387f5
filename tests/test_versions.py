"""Versioned state: regrad.toml and learner checkpoints record a format version, old ones upgrade
through named migrations, a newer major is refused. Golden files of every version stay here."""

from __future__ import annotations

import ast
import json
import logging
import shutil
from pathlib import Path

import pytest

from regrad_cli.workspace.config import CONFIG_MIGRATIONS, CONFIG_VERSION, Workspace, tomllib
from regrad_cli.errors import ConfigError, RegradError
from regrad_cli.learner.lora import Learner
from regrad_cli.learner.persistence import CHECKPOINT_CONFIG, CHECKPOINT_TENSORS, LEARNER_MIGRATIONS, LEARNER_VERSION
from regrad_cli.versions import Migrations, Version

GOLDEN = Path(__file__).parent / "golden"
REPO = Path(__file__).resolve().parent.parent


def _copy(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(GOLDEN / name, dst)
    return dst


# The migration machinery ----------------------------------------------------------------------
def test_version_parse_and_order():
    assert Version.parse("1") == Version(1, 0) and str(Version.parse(" 2.3 ")) == "2.3"
    assert Version(1, 1) > Version(1, 0) > Version(0, 9)
    with pytest.raises(RegradError, match="MAJOR.MINOR"):
        Version.parse("v1")


def test_migrations_apply_in_order_between_versions():
    m = Migrations("thing")
    m.register(Version(1, 0))(lambda d: {**d, "a": 1})

    @m.register(Version(1, 2))
    def second(d):
        return {**d, "b": d["a"] + 1}

    assert m.upgrade({}, Version(0, 0), Version(1, 2), "f") == ({"a": 1, "b": 2}, ["<lambda>", "second"])
    assert m.upgrade({"a": 5}, Version(1, 0), Version(1, 2), "f") == ({"a": 5, "b": 6}, ["second"])
    assert m.upgrade({"x": 0}, Version(1, 2), Version(1, 2), "f") == ({"x": 0}, [])
    with pytest.raises(RegradError, match="thing format 2.0 is newer.*upgrade regrad"):
        m.upgrade({}, Version(2, 0), Version(1, 2), "f")
    with pytest.raises(ValueError):
        m.register(Version(1, 1))(lambda d: d)


def test_the_recorded_histories():
    # The lists are the history of each format: append, never edit or reorder.
    assert CONFIG_MIGRATIONS.names == ["m001_lora_modules_by_family", "m002_query_combine_from_learner",
                                      "m003_query_mode"]
    assert LEARNER_MIGRATIONS.names == ["m001_combine_temperature", "m002_document_transform",
                                       "m003_document_loss_and_token_weights"]
    assert (str(CONFIG_VERSION), str(LEARNER_VERSION)) == ("1.2", "1.3")
    from regrad_cli.learning.train_state import STATE_MIGRATIONS, STATE_VERSION

    assert STATE_MIGRATIONS.names == ["m001_versioned"] and str(STATE_VERSION) == "1.0"


# regrad.toml -------------------------------------------------------------------------------------
def test_golden_workspace_before_versioning_upgrades(tmp_path):
    root = _copy("workspace_v0", tmp_path)
    raw = (root / "regrad.toml").read_text()
    ws = Workspace.open(root, create=False)
    assert "format_version" not in raw  # opening does not rewrite the file
    assert (root / "regrad.toml").read_text() == raw
    # m001: the old default module list means "by family" now; every other written value is kept
    # (later changes of a default do not reach a workspace that wrote its values out).
    written = tomllib.loads(raw)
    assert ws.config.lora.modules == [] and written["lora"]["modules"] == ["gate_proj", "up_proj", "down_proj"]
    written["lora"]["modules"] = []
    # m002: the never-read [query] combine = "sum" becomes "" (the learner's trained combination).
    assert written["query"]["combine"] == "sum" and ws.config.query.combine == ""
    written["query"]["combine"] = ""
    upgraded = ws.config.to_dict()
    assert upgraded.pop("format_version") == str(CONFIG_VERSION)
    assert {sec: {k: upgraded[sec][k] for k in keys} for sec, keys in written.items()} == written
    ws.save()
    data = tomllib.loads((root / "regrad.toml").read_text())
    assert data["format_version"] == str(CONFIG_VERSION) and data["lora"]["modules"] == []
    assert Workspace.open(root, create=False).config == ws.config


def test_golden_workspace_v1_0_reads_as_written(tmp_path):
    ws = Workspace.open(_copy("workspace_v1_0", tmp_path), create=False)
    c = ws.config
    assert c.query.combine == ""  # m002
    assert (c.model.id, c.embedder.id, c.lora.rank, c.learner.checkpoint, c.query.top_k) == (
        "fake:gpt2", "fake:hash-16", 4, "init", 2)
    assert c.lora.target_patterns == [r"transformer\.h\.[23]\.mlp\.c_fc", r"transformer\.h\.3\.attn\.c_proj"]


def test_explicit_llama_modules_survive_as_an_explicit_list(tmp_path):
    root = _copy("workspace_v0", tmp_path)
    path = root / "regrad.toml"
    path.write_text(path.read_text().replace('"gate_proj",\n', ""))
    assert Workspace.open(root, create=False).config.lora.modules == ["up_proj", "down_proj"]


def test_newer_major_is_refused_newer_minor_read(tmp_path, caplog):
    root = _copy("workspace_v1_0", tmp_path)
    path = root / "regrad.toml"
    text = path.read_text()
    path.write_text(text.replace('format_version = "1.0"', 'format_version = "2.0"'))
    with pytest.raises(ConfigError, match=r"workspace config format 2.0 is newer.*upgrade regrad"):
        Workspace.open(root, create=False)
    newer = text.replace('format_version = "1.0"', 'format_version = "1.7"')
    path.write_text(newer.replace("[query]\n", "[query]\nnew_knob = 3\n") + "\n[future]\nx = 1\n")
    with caplog.at_level(logging.WARNING, logger="regrad"):
        ws = Workspace.open(root, create=False)
    assert ws.config.query.top_k == 2
    assert "query.new_knob" in caplog.text and "future" in caplog.text
    path.write_text(text.replace('format_version = "1.0"', 'format_version = "one"'))
    with pytest.raises(ConfigError, match="not MAJOR.MINOR"):
        Workspace.open(root, create=False)


def test_unknown_key_at_the_current_version_is_still_an_error(tmp_path):
    root = _copy("workspace_v1_0", tmp_path)
    path = root / "regrad.toml"
    path.write_text(path.read_text().replace("[query]\n", "[query]\ntop_kk = 3\n"))
    with pytest.raises(ConfigError, match="unknown key query.top_kk"):
        Workspace.open(root, create=False)


def test_new_workspace_records_the_version(tmp_path):
    ws = Workspace.open(tmp_path / "new")
    assert tomllib.loads(ws.config_path.read_text())["format_version"] == str(CONFIG_VERSION)


# Learner checkpoints ----------------------------------------------------------------------------
def test_golden_learner_v1_0_loads_with_its_id():
    from conftest import make_tiny_llama

    recorded = json.loads((GOLDEN / "learner_v1_0" / CHECKPOINT_CONFIG).read_text())
    assert recorded["format"] == "regrad-learner/1"
    learner = Learner.load(GOLDEN / "learner_v1_0")
    assert learner.checkpoint_id() == recorded["checkpoint_id"]
    assert learner.trained_combine == "score"
    # The same init today gives the same tensors and id: format 1.0 ids are stable.
    fresh = Learner.for_model(make_tiny_llama(seed=0, n_layers=4)).init_(seed=3, b_std=0.05, alpha_init=0.5)
    assert fresh.checkpoint_id() == recorded["checkpoint_id"]


def test_golden_learner_v1_1_loads_and_fits_its_model():
    from regrad_cli.lm.fakes import tiny_model
    from regrad_cli.learner.lora import target_shapes

    recorded = json.loads((GOLDEN / "learner_v1_1" / CHECKPOINT_CONFIG).read_text())
    learner = Learner.load(GOLDEN / "learner_v1_1")
    assert learner.checkpoint_id() == recorded["checkpoint_id"]
    assert learner.meta["combine"] == "mean"
    assert target_shapes(tiny_model("gpt2"), learner.spec) == dict(learner.layout)


def test_shipped_checkpoint_loads_with_its_recorded_id():
    from regrad_cli.workspace.checkpoints import bundled_checkpoint_dir

    path = bundled_checkpoint_dir()
    recorded = json.loads((path / CHECKPOINT_CONFIG).read_text())
    assert Learner.load(path).checkpoint_id() == recorded["checkpoint_id"]


def test_saved_learner_records_the_current_format(tmp_path):
    Learner.load(GOLDEN / "learner_v1_0").save(tmp_path / "ck")
    assert json.loads((tmp_path / "ck" / CHECKPOINT_CONFIG).read_text())["format"] == f"regrad-learner/{LEARNER_VERSION}"


def _edit_meta(ck: Path, **changes):
    meta = json.loads((ck / CHECKPOINT_CONFIG).read_text())
    meta.update(changes)
    (ck / CHECKPOINT_CONFIG).write_text(json.dumps(meta))


def test_learner_newer_major_and_foreign_files_are_refused(tmp_path):
    ck = _copy("learner_v1_1", tmp_path)
    _edit_meta(ck, format="regrad-learner/2.0")
    with pytest.raises(RegradError, match="learner checkpoint format 2.0 is newer"):
        Learner.load(ck)
    _edit_meta(ck, format="regrad-learner/1.9")
    assert Learner.load(ck).spec.rank == 4  # a newer minor is read
    for tag in ("something-else/1.0", None):
        _edit_meta(ck, format=tag)
        with pytest.raises(RegradError, match="not a regrad learner checkpoint"):
            Learner.load(ck)


def test_learner_v1_0_without_temperature_gets_the_initial_one(tmp_path):
    import math

    from safetensors.torch import load_file, save_file

    ck = _copy("learner_v1_0", tmp_path)
    tensors = load_file(str(ck / CHECKPOINT_TENSORS))
    del tensors["combine.log_temp"]
    save_file(tensors, str(ck / CHECKPOINT_TENSORS))
    _edit_meta(ck, checkpoint_id=None)  # the recorded id covered the temperature
    learner = Learner.load(ck)
    assert float(learner.log_temp.detach()) == pytest.approx(math.log(0.05))


# torch.load ----------------------------------------------------------------------------------------
def test_every_torch_load_is_weights_only():
    """Pickles run code: every torch.load in the package passes weights_only=True."""
    bad = []
    for path in sorted((REPO / "regrad_cli").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                if not ok:
                    bad.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert bad == []


# The documents table and tombstones ---------------------------------------------------------------
def test_tombstones_read_their_format_and_refuse_a_newer_major(tmp_path):
    from types import SimpleNamespace

    from regrad_cli.workspace.tombstones import TOMBSTONES_VERSION, Tombstones

    tombs = Tombstones(SimpleNamespace(root=tmp_path))
    tombs.mark(["a"], [], "done")
    written = json.loads((tmp_path / "tombstones.json").read_text())
    assert written["format"] == 1 and str(TOMBSTONES_VERSION) == "1.0"  # 1.0 is written as the integer 1
    for newer_minor in ("1.4", "1.0"):
        (tmp_path / "tombstones.json").write_text(json.dumps({**written, "format": newer_minor}))
        assert tombs.ids() == {"a"}
    for tag, error in ((2, "newer than this regrad understands"), ("3.1", "newer than"), (0, "is damaged"),
                       ("one", "is damaged")):
        (tmp_path / "tombstones.json").write_text(json.dumps({**written, "format": tag}))
        with pytest.raises(RegradError, match=error):
            tombs.ids()


def test_documents_table_reads_its_format_and_refuses_a_newer_major(tmp_path):
    from types import SimpleNamespace

    from regrad_cli.errors import IngestError
    from regrad_cli.workspace.documents import _FORMAT_KEY, DOCUMENTS_VERSION, DocumentStore, documents_schema

    assert documents_schema(4, {"id": "e", "dim": 4}).metadata[_FORMAT_KEY] == b"1"  # 1.0, as first written
    assert str(DOCUMENTS_VERSION) == "1.0"
    store = DocumentStore(tmp_path)
    for readable in (b"1", b"1.0", b"1.7"):
        store.check_format(SimpleNamespace(metadata={_FORMAT_KEY: readable}))
    for tag, error in ((b"2", "newer than this regrad understands"), (b"0", "never existed"),
                       (b"x", "not MAJOR.MINOR")):
        with pytest.raises(IngestError, match=error):
            store.check_format(SimpleNamespace(metadata={_FORMAT_KEY: tag}))

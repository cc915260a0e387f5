"""regrad.toml's validated schema (issue 32): a hostile or mistyped setting ends in one line that
names the field, the value and the allowed range; sizes that bound memory are capped."""

from __future__ import annotations

import pytest

from reliability_helpers import run_cli


def _write(tmp_path, section, key, value):
    from regrad_cli.workspace.config import RegradConfig

    import tomli_w

    data = RegradConfig().to_dict()
    data["model"]["id"], data["embedder"]["id"] = "fake:llama", "fake:hash-32"
    del data[section][key]
    text = tomli_w.dumps(data).replace(f"[{section}]\n", f"[{section}]\n{key} = {value}\n", 1)
    ws = tmp_path / "ws"
    ws.mkdir(exist_ok=True)
    (ws / "regrad.toml").write_text(text)
    return ws


CASES = [
    ("chunking", "max_tokens", '"abc"', "chunking.max_tokens", "from 1 to 8192"),
    ("embedder", "batch_size", '"x"', "embedder.batch_size", "from 1 to 1024"),
    ("lora", "rank", "1000000000", "lora.rank", "from 1 to 256"),
    ("lora", "rank", "1000000", "lora.rank", "from 1 to 256"),
    ("lora", "layers", "[0, 1, 100000]", "lora.layers[2]", "0 to 1023"),
    ("lora", "lora_alpha", "nan", "lora.lora_alpha", "finite"),
    ("bank", "batch_size", "100000", "bank.batch_size", "from 1 to 256"),
    ("bank", "max_doc_tokens", "-1", "bank.max_doc_tokens", "from 1 to 8192"),
    ("bank", "storage_options", '{ a = [1, 2] }', "bank.storage_options['a']", "strings, numbers or booleans"),
    ("query", "top_k", "1000000", "query.top_k", "from 0 to 64"),
    ("query", "max_new_tokens", "true", "query.max_new_tokens", "from 1 to 512"),
    ("chunking", "overlap", "300", "chunking.overlap", "below max_tokens"),
]


@pytest.mark.parametrize("section,key,value,field,allowed", CASES, ids=[f"{c[1]}={c[2]}" for c in CASES])
def test_a_bad_setting_is_one_line_naming_field_and_range(tmp_path, capsys, monkeypatch, section, key, value,
                                                          field, allowed):
    ws = _write(tmp_path, section, key, value)
    for args in (["query", "what?", "--mode", "context"], ["build-bank"], ["bank", "stats"]):
        code, out, err = run_cli([*args, "--workspace", ws], capsys, monkeypatch)
        assert code == 1, (args, out, err)
        line = err.strip()
        assert len(line.splitlines()) == 1 and field in line and allowed in line, line


def test_the_defaults_and_a_written_workspace_validate(tmp_path):
    from regrad_cli.workspace.config import RegradConfig, Workspace

    RegradConfig().validate()
    ws = Workspace.open(tmp_path / "ws", overrides={"chunking.max_tokens": 128, "lora.rank": 16})
    assert Workspace.open(ws.root, create=False).config.lora.rank == 16


def test_a_bad_command_line_override_names_the_field(tmp_path):
    from regrad_cli.workspace.config import Workspace
    from regrad_cli.errors import ConfigError

    with pytest.raises(ConfigError, match=r"chunking.overlap = 64 .*must be below max_tokens \(32\)"):
        Workspace.open(tmp_path / "ws", overrides={"chunking.max_tokens": 32, "chunking.overlap": 64})
    assert not (tmp_path / "ws" / "regrad.toml").exists()


def test_help_does_not_import_pydantic():
    import subprocess
    import sys

    code = "import sys; from regrad_cli.cli import app; print('pydantic' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_the_schema_knows_every_answering_mode():
    from typing import get_args

    from regrad_cli.online.modes import MODES
    from regrad_cli.workspace.config_schema import _Query

    assert set(get_args(_Query.model_fields["mode"].annotation)) == set(MODES)

"""The Python API (regrad_cli.Regrad): the examples of docs/python.md, run as written, in a
workspace whose regrad.toml names the tiny fake models; and what they print, checked."""

from __future__ import annotations

import contextlib
import io
import re

from conftest import REPO

FAKE = {"model.id": "fake:llama", "embedder.id": "fake:hash-32"}


def _examples() -> list[str]:
    text = (REPO / "docs" / "python.md").read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_the_documented_examples_run(tmp_path, monkeypatch):
    from regrad_cli.workspace.config import Workspace

    monkeypatch.chdir(tmp_path)
    Workspace.open(tmp_path / "my-workspace", overrides=FAKE)  # the examples' workspace, on fakes
    examples = _examples()
    assert len(examples) == 3
    outputs = []
    for code in examples:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, "docs/python.md", "exec"), {"__name__": "docs_example"})
        outputs.append(out.getvalue().splitlines())
    first, second, third = outputs
    assert first[0].startswith("{'added': 2,") and first[1] == "2"
    assert first[2].endswith("param+context") and len(first) == 5  # answer + two retrieved documents
    assert second[0] == "True True" and second[1] == "2 2" and second[2] == "mode"
    assert second[3:] == ["0", "[['notes/guild.md#0']]"]
    assert third[0] == "1 1 1" and third[1] == "1 regrad build-bank" and third[2] == "notes/gate.md#0"
    assert "no gradient yet" in third[3] and "regrad build-bank" in third[3] and third[4] == "1"


def test_import_is_light():
    import subprocess
    import sys

    code = ("import sys; from regrad_cli import Regrad; "
            "print([m for m in ('torch', 'transformers', 'lancedb') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert out.strip() == "[]"


def test_loading_prints_no_progress_bars(tmp_path):
    """A script using the API on a model saved in a local directory (loaded with
    from_pretrained, which draws "Loading weights" bars) gets no progress bars or transformers
    chatter on its stderr, as the CLI gets none; transformers' own setting is put back after."""
    import os
    import subprocess
    import sys

    from regrad_cli.lm.fakes import byte_tokenizer, tiny_model
    from regrad_cli.lm.models import quiet_loading

    model_dir = tmp_path / "tiny-llama"
    with quiet_loading():
        tiny_model("llama").save_pretrained(model_dir)
        byte_tokenizer().save_pretrained(model_dir)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "guild.md").write_text("Quorra Vell founded the Tessaly Guild in 1887.")
    code = ("from regrad_cli import Regrad\n"
            f"rg = Regrad('ws', model={str(model_dir)!r}, embedder='fake:hash-32')\n"
            "rg.ingest('notes')\n"
            "rg.build_bank()\n"
            "print(rg.query('Who founded the Tessaly Guild?', max_new_tokens=3)['mode'])\n"
            "from transformers.utils import logging\n"
            "print(logging.is_progress_bar_enabled())\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS", "REGRAD_WORKSPACE")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["param+context", "True"]
    assert "Loading weights" not in run.stderr and "it/s]" not in run.stderr and "%|" not in run.stderr, run.stderr

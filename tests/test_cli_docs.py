"""The CLI reference page is generated from the code and matches `--help`; option defaults come
from the config dataclasses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from regrad_cli.cli.common import dataclass_defaults, defaults_of, ws_default, ws_help
from regrad_cli.cli.docgen import reference

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def test_docs_cli_md_is_up_to_date():
    assert DOC.exists(), "docs/cli.md is missing: python -m regrad_cli.cli.docgen > docs/cli.md"
    assert DOC.read_text(encoding="utf-8") == reference(), (
        "docs/cli.md is stale: regenerate it with  python -m regrad_cli.cli.docgen > docs/cli.md")


def _commands():
    import typer.main

    from regrad_cli.cli import app

    def walk(cmd, path):
        yield path
        for name, sub in sorted(getattr(cmd, "commands", {}).items()):
            yield from walk(sub, [*path, name])

    return list(walk(typer.main.get_command(app), []))


def _sections(text: str) -> dict[str, str]:
    parts = re.split(r"^## `(.+)`$", text, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def test_reference_lists_what_help_prints():
    from typer.testing import CliRunner

    from regrad_cli.cli import app

    sections = _sections(reference())
    runner = CliRunner()
    for path in _commands():
        title = " ".join(["regrad", *path])
        assert title in sections, f"{title} has no section"
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
        assert result.exit_code == 0, result.output
        in_help = set(OPTION.findall(result.output)) - {"--help"}
        in_doc = set(OPTION.findall(sections[title]))
        assert in_help == in_doc, (title, in_help ^ in_doc)


def _targets() -> list[str]:
    """Every "module:Class" a command module reads its defaults from."""
    cli = Path(__file__).resolve().parent.parent / "regrad_cli" / "cli"
    found = {m for f in cli.glob("*.py") for m in re.findall(r'defaults_of\("([\w.]+:\w+)"\)', f.read_text())}
    return sorted(found)


def test_commands_read_their_defaults_from_configs():
    assert {"regrad_cli.learning.metatrain:MetaTrainConfig", "regrad_cli.learning.cpt:CPTConfig"} <= set(_targets())


@pytest.mark.parametrize("target", _targets())
def test_source_read_defaults_equal_the_dataclass(target):
    import importlib

    module, _, name = target.partition(":")
    real = dataclass_defaults(getattr(importlib.import_module(module), name))
    read = defaults_of(target)
    assert read and set(read) <= set(real)
    assert {k: real[k] for k in read} == read
    # Everything literal was read: only factory defaults are left to the dataclass.
    assert set(real) - set(read) == set()


def test_cli_defaults_are_the_configs():
    """Every option named after a field of the command's config has that field's default."""
    import typer.main

    from regrad_cli.cli import app

    root = typer.main.get_command(app)
    cpt = defaults_of("regrad_cli.learning.cpt:CPTConfig")
    checked = 0
    eval_target = next(t for t in _targets() if t.endswith(":EvalConfig"))
    for command, target in (("meta-train", "regrad_cli.learning.metatrain:MetaTrainConfig"), ("eval", eval_target)):
        fields = defaults_of(target)
        for p in root.commands[command].params:
            if p.name in fields:
                expected = fields[p.name]
            elif p.name.startswith("cpt_") and p.name[4:] in cpt:
                expected = cpt[p.name[4:]]
            else:
                continue
            got = str(p.default) if isinstance(p.default, Path) else p.default
            assert got == expected, (command, p.name)
            checked += 1
    assert checked >= 20


def test_workspace_option_help_names_the_setting():
    assert ws_default("query.top_k") == 3
    assert ws_help("Documents to retrieve.", "query.top_k") == (
        "Documents to retrieve (default: query.top_k in regrad.toml, 3).")

"""Write the CLI reference (docs/cli.md) from the commands themselves.

    python -m regrad_cli.cli.docgen > docs/cli.md

One section per command and subcommand, in the order ``regrad --help`` lists them: its help,
its usage line and a table of its arguments and options with their defaults. tests/test_cli_docs.py
fails when docs/cli.md differs from what this prints, so the page cannot drift from the code.
"""

from __future__ import annotations

import sys

HEADER = """# `regrad` command-line reference

Generated from the code; do not edit by hand. Regenerate with

    python -m regrad_cli.cli.docgen > docs/cli.md

(`tests/test_cli_docs.py` fails when this page is stale). Options that override a workspace
setting default to the value in the workspace's `regrad.toml` (the default named is the one a new
workspace gets); every other default is the one of the command's config (`MetaTrainConfig`,
`EvalConfig`, ...).
"""


def _cell(text) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(param) -> str:
    if getattr(param, "required", False):
        return "required"
    value = param.default
    if callable(value) or value is None or value == () or value == []:
        return ""
    if getattr(param, "is_flag", False):
        return "on" if value else "off"
    return f"`{value}`"


def _kind(param, ctx) -> str:
    if getattr(param, "is_flag", False):
        return "flag"
    display = getattr(param, "display_type", None)  # typer's own parameters: "<int>", "<list[str]>"
    if display is not None:
        return display(ctx).strip("<>")
    name = getattr(getattr(param, "type", None), "name", "") or ""
    return name + (", repeatable" if getattr(param, "multiple", False) else "")


def _names(param) -> str:
    if param.param_type_name == "argument":
        return param.name.upper()
    return ", ".join(f"`{o}`" for o in [*param.opts, *param.secondary_opts])


def _section(cmd, path: list[str], parent_ctx, out: list[str]) -> None:
    import typer.main  # noqa: F401  (typer's click)

    ctx = type(parent_ctx)(cmd, info_name=path[-1], parent=parent_ctx) if parent_ctx else None
    if ctx is None:
        from typer._click import Context  # type: ignore[import-not-found]

        ctx = Context(cmd, info_name=path[-1])
    title = " ".join(path)
    out.append(f"\n## `{title}`\n")
    help_text = (cmd.help or "").strip()
    if help_text:
        out.append(help_text.split("\n\n")[0].strip() + "\n")
    pieces = " ".join(cmd.collect_usage_pieces(ctx))
    out.append(f"```\n{title} {pieces}\n```\n")
    rows = [p for p in cmd.params if not getattr(p, "hidden", False)]
    if rows:
        out.append("| Argument / option | Type | Default | Description |")
        out.append("|---|---|---|---|")
        for p in rows:
            out.append(f"| {_names(p)} | {_cell(_kind(p, ctx))} | {_cell(_default(p))} | {_cell(getattr(p, 'help', '') or '')} |")
    sub = getattr(cmd, "commands", None)
    if sub:
        names = cmd.list_commands(ctx)
        out.append("\nCommands: " + ", ".join(f"`{title} {n}`" for n in names) + ".\n")
        for name in names:
            _section(cmd.get_command(ctx, name), [*path, name], ctx, out)


def _footer() -> str:
    """Exit status and the JSON answers' keys (from regrad_cli.online.modes)."""
    from regrad_cli.online.modes import ANSWER_KEYS, RETRIEVED_KEYS

    out = ["## Exit status\n",
           "0 on success; 1 for an error (one line on stderr, `Error: ...`), including a batch in which",
           "some question failed (each failure is a JSON line with an `error` key); 2 for a usage",
           "error (an unknown option, or an option's value out of range, such as `--mode parm` or",
           "`--top-k -1`), refused before anything loads; 130 when interrupted.\n",
           "## JSON output of `regrad query`\n",
           "One object per question (one line each with `-` or `--batch`); the same keys in every mode.",
           "The server's `/v1/query` answers the same object, and `/v1/chat/completions` puts `mode`,",
           "`retrieved`, `warnings`, `skipped` and `timings_ms` in its `regrad` field.\n",
           "| Key | Value |", "|---|---|"]
    out += [f"| `{k}` | {_cell(v)} |" for k, v in ANSWER_KEYS.items()]
    out += ["\nEach entry of `retrieved`:\n", "| Key | Value |", "|---|---|"]
    out += [f"| `{k}` | {_cell(v)} |" for k, v in RETRIEVED_KEYS.items()]
    out += ["\nThe commands follow, in the order `regrad --help` lists them."]
    return "\n".join(out)


def reference() -> str:
    """The whole reference page as Markdown."""
    import typer.main

    from regrad_cli.cli import app

    root = typer.main.get_command(app)
    out = [HEADER, _footer()]  # before the command sections, which run to the end of the page
    _section(root, ["regrad"], None, out)
    return "\n".join(out).rstrip() + "\n"


def main() -> None:
    sys.stdout.write(reference())


if __name__ == "__main__":
    main()

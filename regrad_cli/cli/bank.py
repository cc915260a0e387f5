"""`regrad bank ...`: inspect and maintain a gradient bank."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from regrad_cli.cli.common import JsonOpt, WorkspaceOpt, print_json

bank_app = typer.Typer(help="Inspect and maintain the gradient bank (stats, verify, rm, compact).",
                       no_args_is_help=True)

BankOpt = Annotated[Optional[str], typer.Option(
    "--bank", help="Bank directory or object-store URI such as s3://bucket/banks/bank-ID (default: the workspace's bank).")]


def _bank_path(workspace: Path | None, bank: str | None) -> tuple["Path | str", object, dict]:
    """The bank to work on: --bank, else the workspace's only bank, else the current checkpoint's.

    Returns (location, workspace or None, storage options)."""
    from regrad_cli.config import RegradConfig, Workspace
    from regrad_cli.errors import ConfigError, NoBankError

    if bank is not None:
        try:  # storage options (and nothing else) come from the workspace when there is one
            opts = Workspace.open(workspace, create=False).bank_storage_options()
        except ConfigError:
            opts = Workspace(Path("."), RegradConfig()).bank_storage_options()
        return bank, None, opts  # GradientBank.open tells a path from a URI
    ws = Workspace.open(workspace, create=False)
    opts = ws.bank_storage_options()
    loc = ws.banks_location
    if isinstance(loc, str):  # object store: no listing; the current checkpoint's bank
        return ws.bank_path(_current_checkpoint_id(ws)), ws, opts
    banks = sorted(p for p in loc.glob("bank-*") if p.is_dir()) if loc.exists() else []
    if not banks:
        raise NoBankError(f"workspace {ws.root} has no gradient bank yet: run `regrad build-bank`")
    if len(banks) == 1:
        return banks[0], ws, opts
    cid = _current_checkpoint_id(ws, required=False)
    if cid is not None:
        path = ws.bank_path(cid)
        if path.exists():
            return path, ws, opts
    raise NoBankError(f"workspace {ws.root} has several banks ({', '.join(b.name for b in banks)}); "
                      "pass --bank DIR")


def _current_checkpoint_id(ws, required: bool = True) -> str | None:
    from regrad_cli.engine import bundled_checkpoint_dir
    from regrad_cli.errors import NoBankError
    from regrad_cli.lora import Learner

    choice = ws.config.learner.checkpoint
    ck = bundled_checkpoint_dir() if choice == "bundled" else Path(choice).expanduser()
    if (ck / "best" / "learner.json").exists():
        ck = ck / "best"
    if (ck / "learner.json").exists():
        return Learner.load(ck).checkpoint_id()
    if required:
        raise NoBankError(f"cannot tell which bank under {ws.banks_location} is current (learner checkpoint "
                          f"{choice!r} not found); pass --bank URI")
    return None


def _open(workspace, bank, read_only=True):
    from bank_format import GradientBank

    path, ws, opts = _bank_path(workspace, bank)
    return GradientBank.open(path, read_only=read_only, storage_options=opts), ws


@bank_app.command("stats")
def stats_cmd(workspace: WorkspaceOpt = None, bank: BankOpt = None, json_out: JsonOpt = False):
    """Rows, sizes, compression ratio, codec, LoRA config and fingerprints of the bank."""
    b, _ = _open(workspace, bank)
    s = b.stats()
    s["lora"] = b.meta.learner.get("lora")
    if json_out:
        print_json(s)
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(show_header=False, title=f"gradient bank {s['path']}")
    codec = s["codec"]
    rows = [
        ("rows", s["rows"]), ("documents", s["documents"]),
        ("bytes on disk", _human(s["bytes_on_disk"])),
        ("bytes per document (mean / median)", f"{_human(s['bytes_per_doc'])} / {_human(s['median_bytes_per_doc'])}"),
        ("fp32 bytes per document", _human(s["fp32_bytes_per_doc"])),
        ("ratio vs fp32", f"{s['ratio_vs_fp32']:.2f}x" if s["ratio_vs_fp32"] else "-"),
        ("codec", ", ".join(f"{k}={v}" for k, v in codec.items()) if isinstance(codec, dict) else codec),
        ("LoRA", ", ".join(f"{k}={v}" for k, v in (s["lora"] or {}).items() if k != "layers")
         + (f", layers {s['lora']['layers'][0]}-{s['lora']['layers'][-1]}" if s["lora"] and s["lora"].get("layers") else "")),
        ("tensors / values per document", f"{s['layout']['n_tensors']} / {s['layout']['n_values']:,}"),
        ("model", f"{s['fingerprints']['model'].get('id')} ({str(s['fingerprints']['model'].get('weights_sha256'))[:24]})"),
        ("learner checkpoint", str(s["fingerprints"]["learner"].get("checkpoint_id"))[:16]),
        ("embedder", f"{s['fingerprints']['embedder'].get('id')} (dim {s['fingerprints']['embedder'].get('dim')})"),
        ("format version", s["format_version"]), ("producer", s["producer"]),
        ("dataset versions", s["versions"]),
    ]
    for k, v in rows:
        t.add_row(k, str(v))
    Console().print(t)


@bank_app.command("verify")
def verify_cmd(workspace: WorkspaceOpt = None, bank: BankOpt = None, json_out: JsonOpt = False):
    """Decode every row and check checksums and shapes; exit 1 if any row is bad."""
    b, _ = _open(workspace, bank)
    report = b.verify()
    bad = report.get("bad", [])
    dups = report.get("duplicates", [])
    if json_out:
        print_json({**report, "ok_all": not bad and not dups})
    else:
        typer.echo(f"{report['ok']}/{report['rows']} rows ok, {len(bad)} bad, {len(dups)} duplicate keys")
        for r in bad:
            if r.get("doc_id") is None:  # a fragment whose doc ids cannot be read
                typer.echo(f"bad: {r.get('reason')} ({r.get('rows')} rows)", err=True)
            else:
                typer.echo(f"bad: {r.get('doc_id')}: {r.get('reason')}", err=True)
        for r in dups:
            typer.echo(f"duplicate: {r.get('doc_id')} ({r.get('count')} rows)", err=True)
    if bad or dups:
        raise typer.Exit(1)


@bank_app.command("rm")
def rm_cmd(
    doc_ids: Annotated[Optional[list[str]], typer.Argument(help="Document ids to remove.")] = None,
    source: Annotated[Optional[list[str]], typer.Option("--source", help="Remove every document from this source path (repeatable).")] = None,
    keep_documents: Annotated[bool, typer.Option("--keep-documents", help="Remove only the gradients, keep the texts in the documents table.")] = False,
    workspace: WorkspaceOpt = None,
    bank: BankOpt = None,
    json_out: JsonOpt = False,
):
    """Unlearn documents: delete their rows and purge old versions so their bytes leave the disk."""
    from regrad_cli.errors import RegradError

    if not doc_ids and not source:
        raise RegradError("name DOC_ID... or --source PATH")
    b, ws = _open(workspace, bank, read_only=False)
    before = b.count()
    b.delete(doc_ids=list(doc_ids) if doc_ids else None, where_sources=list(source) if source else None)
    purge = b.purge()
    removed_docs = 0
    if ws is not None and not keep_documents:
        # The text goes too: otherwise the next build-bank would compute the gradient again.
        from regrad_cli.documents import DocumentStore

        store = DocumentStore(ws)
        removed_docs = store.delete(ids=list(doc_ids or []), sources=list(source or []))
    out = {"removed_rows": before - b.count(), "removed_documents": removed_docs, "rows": b.count(),
           "purge": purge}
    if json_out:
        print_json(out)
    else:
        typer.echo(f"removed {out['removed_rows']} bank rows and {removed_docs} documents; "
                   f"old versions purged ({out['rows']} rows left)")


@bank_app.command("compact")
def compact_cmd(workspace: WorkspaceOpt = None, bank: BankOpt = None, json_out: JsonOpt = False):
    """Rewrite small fragments into larger ones and drop old dataset versions."""
    b, _ = _open(workspace, bank, read_only=False)
    out = b.compact()
    if json_out:
        print_json(out)
    else:
        typer.echo(f"compacted: {out}")


def _human(n) -> str:
    n = float(n or 0)
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)

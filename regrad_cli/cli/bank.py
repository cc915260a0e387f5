"""`regrad bank ...`: inspect and maintain a gradient bank."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from regrad_cli.cli.common import JsonOpt, WorkspaceOpt, print_json, safe_text

bank_app = typer.Typer(help="Inspect and maintain the gradient bank (stats, verify, rm, compact).",
                       no_args_is_help=True)

BankOpt = Annotated[Optional[str], typer.Option(
    "--bank", help="Bank directory or object-store URI such as s3://bucket/banks/bank-ID (default: the workspace's bank).")]


def _open(workspace, bank, read_only=True):
    from regrad_cli.workspace.banks import select_bank

    choice = select_bank(workspace, bank)
    return choice.open(read_only=read_only), choice


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
    from rich.text import Text

    t = Table(show_header=False, title=Text(f"gradient bank {safe_text(s['path'])}"))
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
        t.add_row(k, Text(safe_text(v)))  # the bank's metadata is text from elsewhere: no markup
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
                typer.echo(f"bad: {safe_text(r.get('reason'))} ({r.get('rows')} rows)", err=True)
            else:
                typer.echo(f"bad: {safe_text(r.get('doc_id'))}: {safe_text(r.get('reason'))}", err=True)
        for r in dups:
            typer.echo(f"duplicate: {safe_text(r.get('doc_id'))} ({r.get('count')} rows)", err=True)
    if bad or dups:
        raise typer.Exit(1)


@bank_app.command("rm")
def rm_cmd(
    doc_ids: Annotated[Optional[list[str]], typer.Argument(help="Document ids to remove.")] = None,
    source: Annotated[Optional[list[str]], typer.Option("--source", help="Remove every document from this source path (repeatable).")] = None,
    keep_documents: Annotated[bool, typer.Option("--keep-documents", help="Remove only the gradients, keep the texts in the documents table (a repair: build-bank computes them again).")] = False,
    workspace: WorkspaceOpt = None,
    bank: BankOpt = None,
    json_out: JsonOpt = False,
):
    """Unlearn documents: remove their gradients and texts for good (re-run to finish an interrupted run)."""
    from regrad_cli.offline.unlearn import remove_documents

    out = remove_documents(workspace, bank, doc_ids or [], source or [], keep_documents=keep_documents)
    if json_out:
        print_json(out)
        return
    typer.echo(f"removed {out['removed_rows']} bank rows and {out['removed_documents']} documents; "
               f"old versions purged ({out['rows']} rows left)")
    if out["documents_kept"]:
        typer.echo("no workspace here: the documents table was not touched (pass --workspace)", err=True)


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

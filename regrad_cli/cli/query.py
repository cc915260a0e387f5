"""`regrad query`: answer questions with temporarily applied document gradients."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from regrad_cli.cli import common
from regrad_cli.cli.common import DeviceOpt, JsonOpt, WorkspaceOpt, print_json, ws_help
from regrad_cli.online.modes import check_options, uses_step


def check_cli_options(**options) -> None:
    """The options' values checked before anything loads: OptionError (exit 2) naming the option."""
    from regrad_cli.errors import FieldError, OptionError

    try:
        check_options(**options)
    except FieldError as exc:
        raise OptionError(f"--{exc.field.replace('_', '-')}: {exc.detail}") from None


def check_ready(ws, mode: str, checkpoint: str | None) -> None:
    """Refuse, before any model loads, a query the workspace cannot answer: no documents (run
    ingest), or a mode that applies gradients without a bank for the learner (run build-bank)."""
    from regrad_cli.workspace.documents import DocumentStore
    from regrad_cli.errors import NoBankError, RegradError
    from regrad_cli.online.modes import MODES

    if not MODES[mode].retrieve:
        return
    if DocumentStore(ws).count() == 0:
        raise RegradError(f"workspace {ws.root} has no documents: run `regrad ingest PATH` first")
    if not uses_step(mode) or ws.banks_remote:
        return
    from regrad_cli.workspace.banks import workspace_banks

    if not workspace_banks(ws):  # never built (a bank for another checkpoint is told once loaded)
        raise NoBankError(f"workspace {ws.root} has no gradient bank yet: run `regrad build-bank` (mode "
                          f"{mode} applies gradients; --mode rag+phi or context answers from the passages alone)")


def query_cmd(
    question: Annotated[Optional[str], typer.Argument(help="The question, or '-' to read one question per line from stdin (one answer per line on stdout; with --json one JSON object per line).")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", "-k", help=ws_help("Documents to retrieve", "query.top_k"))] = None,
    mode: Annotated[Optional[str], typer.Option("--mode", help=ws_help("param+context | param | context | rag+phi | closed-book | closed-book+phi", "query.mode"))] = None,
    gamma: Annotated[Optional[float], typer.Option("--gamma", help=ws_help("Test-time step scale", "query.gamma"))] = None,
    combine: Annotated[Optional[str], typer.Option("--combine", help="sum | mean | score (default: the workspace's [query] combine, else what the learner was meta-trained with; 'sum' for an untrained one).")] = None,
    retriever: Annotated[Optional[str], typer.Option("--retriever", help=ws_help("dense | bm25 | hybrid", "query.retriever"))] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help=ws_help("Generation limit", "query.max_new_tokens"))] = None,
    min_score: Annotated[Optional[float], typer.Option("--min-score", help="Cosine floor: documents less similar to the question give neither a step nor a passage (default: none).")] = None,
    show_docs: Annotated[bool, typer.Option("--show-docs", help="Include the retrieved passages (and their weights).")] = False,
    batch: Annotated[Optional[Path], typer.Option("--batch", help='JSONL file of {"id":..., "question":...} records.')] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Fail on a corrupt gradient row instead of skipping it.")] = False,
    checkpoint: Annotated[Optional[str], typer.Option("--checkpoint", help="Learner checkpoint: 'bundled', 'init' or a directory.")] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, max=256, help="With '-' or --batch: questions answered per generation call.")] = 16,
    server: Annotated[Optional[str], typer.Option("--server", help="URL of a running `regrad serve` (e.g. http://127.0.0.1:8765): send the questions there instead of loading a model.")] = None,
    token: Annotated[Optional[str], typer.Option("--token", envvar="REGRAD_SERVE_TOKEN", show_envvar=True, help="Bearer token for --server.")] = None,
    device: DeviceOpt = None,
    workspace: WorkspaceOpt = None,
    json_out: JsonOpt = False,
):
    """Answer a question: retrieve, apply gradients for one step, generate, restore.

    With '-' or --batch the questions are answered in batches (one generation call for up to
    --max-batch of them, each with its own step), as `regrad serve` answers them."""
    from regrad_cli.errors import RegradError

    if batch is None and question is None:
        raise RegradError("give a QUESTION, '-' for stdin, or --batch FILE.jsonl")
    if batch is not None and question is not None:
        raise RegradError("give a QUESTION or --batch FILE.jsonl, not both")
    check_cli_options(mode=mode, top_k=top_k, gamma=gamma, combine=combine, retriever=retriever,
                      max_new_tokens=max_new_tokens, min_score=min_score)
    pipeline = batch is not None or question == "-"
    # A --batch file is read and checked whole now: a missing or malformed file is refused before
    # anything loads. Questions on stdin are answered as they come.
    records = list(_records(question, batch)) if batch is not None else _records(question, batch)
    fields = {"mode": mode, "top_k": top_k, "gamma": gamma, "combine": combine, "retriever": retriever,
              "max_new_tokens": max_new_tokens, "show_docs": show_docs, "min_score": min_score}
    if server is not None:
        given = [name for name, v in (("--checkpoint", checkpoint), ("--device", device), ("--strict", strict)) if v]
        if given:
            raise RegradError(f"{', '.join(given)} cannot be used with --server: the server decides (see `regrad serve`)")
        answers = _remote(server, token, records, {k: v for k, v in fields.items() if v is not None},
                          pipeline, max_batch)
    else:
        answers = _local(workspace, question, records, fields, pipeline=pipeline, max_batch=max_batch,
                         checkpoint=checkpoint, device=device, strict=strict)
    if _print_answers(answers, pipeline=pipeline, as_json=json_out or batch is not None, show_docs=show_docs):
        raise typer.Exit(1)


def _local(workspace, question, records, fields: dict, *, pipeline: bool, max_batch: int, checkpoint, device,
           strict: bool):
    """(id, question, answer dict or exception) from a QueryEngine over the workspace."""
    from regrad_cli.workspace.config import Workspace

    ws = Workspace.open(workspace, create=False)
    q = ws.config.query
    mode = fields["mode"] or q.mode
    check_cli_options(mode=mode, retriever=fields["retriever"] or q.retriever,
                      combine=fields["combine"] or q.combine or None)
    check_ready(ws, mode, checkpoint)  # before any model loads
    from regrad_cli.online.query import QueryEngine, Request

    opts = dict(show_docs=fields["show_docs"], min_score=fields["min_score"], **q.request_options(
        mode=mode, top_k=fields["top_k"], gamma=fields["gamma"], combine=fields["combine"],
        retriever=fields["retriever"], max_new_tokens=fields["max_new_tokens"]))
    engine = QueryEngine(ws, checkpoint=checkpoint, device=device, strict=strict, need_bank=uses_step(mode))
    if not pipeline:
        return [(None, question, engine.answer(question, **opts))]
    return ((rec_id, text, res) for chunk in _chunks(records, max_batch)
            for (rec_id, text), res in zip(chunk, engine.answer_many(
                [Request(text, **opts) for _, text in chunk], return_exceptions=True)))


def _print_answers(answers, *, pipeline: bool, as_json: bool, show_docs: bool) -> int:
    """Print every answer as it comes (a failed one in a pipeline: its error, and go on); returns
    the number of failures."""
    failures = 0
    for rec_id, text, res in answers:
        if isinstance(res, Exception):
            if not pipeline:
                raise res
            failures += 1
            typer.echo(f"Error: {res}", err=True)
            if as_json:
                print_json({"id": rec_id, "question": text, "error": str(res)})
            else:
                typer.echo("")  # one stdout line per question, also for a failed one
            continue
        if rec_id is not None:
            res = {"id": rec_id, **{k: v for k, v in res.items() if k != "id"}}
        if as_json:
            print_json(res)
        elif pipeline:
            # Questions on stdin without --json: one plain answer per line, in order.
            typer.echo(" ".join(str(res.get("answer", "")).split()))
        else:
            _render(res, show_docs)
        if not common.QUIET:  # -q
            for w in res.get("warnings") or []:
                typer.echo(f"warning: {w}", err=True)
    return failures


def _chunks(records, size: int):
    chunk = []
    for rec in records:
        chunk.append(rec)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _remote(url: str, token: str | None, records, fields: dict, pipeline: bool, max_batch: int):
    """(id, question, answer dict or RegradError) from a running `regrad serve`."""
    from regrad_cli.errors import RegradError

    if not pipeline:
        for rec_id, text in records:
            yield rec_id, text, _post(url, "/v1/query", {"question": text, **fields}, token)
        return
    for chunk in _chunks(records, max_batch):
        body = {"requests": [{"question": text, **({"id": rec_id} if rec_id is not None else {}), **fields}
                             for rec_id, text in chunk]}
        results = _post(url, "/v1/query:batch", body, token).get("results", [])
        if len(results) != len(chunk):
            raise RegradError(f"{url} answered {len(results)} results for {len(chunk)} questions")
        for (rec_id, text), res in zip(chunk, results):
            if "error" in res:
                yield rec_id, text, RegradError(_message(res))
            else:
                yield rec_id, text, res


def _message(body) -> str:
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return str(err.get("message", err))
    return str(err if err is not None else body)


def _post(url: str, path: str, body: dict, token: str | None, timeout: float = 900.0) -> dict:
    import urllib.error
    import urllib.request

    from regrad_cli.errors import RegradError

    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    target = url.rstrip("/") + path
    req = urllib.request.Request(target, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        try:
            msg = _message(json.loads(exc.read().decode("utf-8")))
        except (ValueError, UnicodeDecodeError, OSError):
            msg = exc.reason
        raise RegradError(f"{target}: HTTP {exc.code}: {msg}") from None
    except urllib.error.URLError as exc:
        raise RegradError(f"cannot reach {target}: {exc.reason} (is `regrad serve` running there?)") from None
    except (OSError, ValueError) as exc:  # timeouts, resets, a non-JSON answer
        raise RegradError(f"{target}: {exc}") from None


def _records(question, batch):
    if batch is not None:
        from regrad_cli.errors import RegradError

        try:
            lines = batch.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise RegradError(f"cannot read {batch}: {exc}") from exc
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                yield rec.get("id", i), str(rec["question"])
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise RegradError(f"{batch}:{i}: malformed record ({exc})") from exc
        return
    if question == "-":
        for line in sys.stdin:
            if line.strip():
                yield None, line.strip()
        return
    yield None, question


def _render(res: dict, show_docs: bool) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from regrad_cli.cli.common import safe_text

    console = Console()
    console.print(res["answer"] or "[dim](no answer)[/dim]", markup=not res["answer"], highlight=False)  # answer: plain
    if res["retrieved"] and (show_docs or console.is_terminal):
        err = Console(stderr=True)
        # Ids, sources and texts come from documents: never rich markup, no terminal escapes.
        table = Table("doc_id", "score", "weight", "source", title=f"retrieved ({res['mode']})")
        for r in res["retrieved"]:
            weight = r.get("weight")
            table.add_row(Text(safe_text(r["doc_id"])), f"{r['score']:.3f}",
                          "-" if weight is None else f"{weight:.3f}", Text(safe_text(r["source"])))
        err.print(table)
        if show_docs:
            for r in res["retrieved"]:
                weight = r.get("weight")
                head = f" (score {r['score']:.3f}" + ("" if weight is None else f", weight {weight:.3f}") + ")"
                err.print(Text.assemble((safe_text(r["doc_id"]), "bold"), head, ":\n",
                                        safe_text(r.get("text", ""), keep_newlines=True)), highlight=False)
    # Rows not applied (corrupt, stale, pending) are in res["warnings"], printed by the caller.

"""`regrad eval`: every system (closed-book, RAG, CPT, ReGrad, controls) on QA datasets, with drift."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from regrad_cli.cli import app
from regrad_cli.cli.common import DeviceOpt, JsonOpt, defaults_of, print_json, progress_bar

# The options' defaults are EvalConfig's and CPTConfig's (read without importing torch).
EVAL = defaults_of("regrad_cli.evaluate:EvalConfig")
CPT = defaults_of("regrad_cli.cpt:CPTConfig")


@app.command("eval")
def eval_cmd(
    dataset: Annotated[list[str], typer.Option("--dataset", help="FORMAT:PATH[@train|dev|all] with FORMAT nq-open, pubmedqa, fictional, jsonl or auto (repeatable).")],
    limit: Annotated[Optional[int], typer.Option("--limit", help="Evaluate the first N questions of each dataset.")] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Documents retrieved per question.")] = EVAL["top_k"],
    systems: Annotated[Optional[str], typer.Option("--systems", help="Comma-separated: closed-book, closed-book+phi, rag, cpt, cpt+rag, regrad, regrad+context, shifted, random (default: all).")] = None,
    out: Annotated[Path, typer.Option("--out", help="Output directory: results.json, report.md, plots, predictions.")] = Path(EVAL["out"]),
    workspace: Annotated[Optional[Path], typer.Option("--workspace", "-w", help="Use this workspace's documents and bank (default: a fresh workspace under OUT holding the datasets' supporting documents).")] = None,
    checkpoint: Annotated[Optional[str], typer.Option("--checkpoint", help="Learner checkpoint: 'bundled', 'init' or a directory.")] = None,
    continual: Annotated[int, typer.Option("--continual", help="Feed the corpus in T batches; evaluate after each (forgetting and drift curves).")] = EVAL["continual"],
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random control, CPT data order and the bootstrap.")] = EVAL["seed"],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Greedy generation limit.")] = EVAL["max_new_tokens"],
    batch_size: Annotated[int, typer.Option("--batch-size", help="Questions per generate call (1 = exactly one query at a time).")] = EVAL["batch_size"],
    gamma: Annotated[float, typer.Option("--gamma", help="Test-time step scale of ReGrad systems.")] = EVAL["gamma"],
    retriever: Annotated[str, typer.Option("--retriever", help="dense | bm25 | hybrid.")] = EVAL["retriever"],
    cpt_lr: Annotated[float, typer.Option("--cpt-lr", help="CPT learning rate (AdamW).")] = CPT["lr"],
    cpt_epochs: Annotated[int, typer.Option("--cpt-epochs", help="CPT epochs over each batch of documents.")] = CPT["epochs"],
    cpt_batch_size: Annotated[int, typer.Option("--cpt-batch-size", help="CPT documents per optimiser step.")] = CPT["batch_size"],
    cpt_params: Annotated[str, typer.Option("--cpt-params", help="CPT trains 'all' base parameters or only the 'mlp' projections.")] = CPT["params"],
    device: DeviceOpt = None,
    json_out: JsonOpt = False,
):
    """Evaluate closed-book, RAG, CPT and ReGrad systems on QA datasets, with weight drift."""
    from regrad_cli.cpt import CPTConfig
    from regrad_cli.evaluate import EvalConfig, parse_systems, run_eval

    cfg = EvalConfig(
        datasets=list(dataset), out=str(out), limit=limit, top_k=top_k, systems=parse_systems(systems),
        workspace=str(workspace) if workspace else None, checkpoint=checkpoint, continual=continual,
        seed=seed, max_new_tokens=max_new_tokens, batch_size=batch_size, gamma=gamma, retriever=retriever,
        device=device,
        cpt=CPTConfig(lr=cpt_lr, epochs=cpt_epochs, batch_size=cpt_batch_size, params=cpt_params, seed=seed),
    )
    with progress_bar("eval", enabled=not json_out) as update:
        results = run_eval(cfg, progress=lambda d, n, info: update(d, n, info),
                           command=["regrad", *sys.argv[1:]])
    if json_out:
        print_json(results)
        return
    typer.echo((out / "report.md").read_text(encoding="utf-8"))
    typer.echo(f"wrote {out}/results.json and {out}/report.md ({results['wall_s']['total']:.0f} s)", err=True)

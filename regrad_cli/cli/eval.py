"""`regrad eval`: every system (closed-book, RAG, CPT, ReGrad, oracle, controls) on QA datasets, with drift."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from regrad_cli.cli.common import DeviceOpt, JsonOpt, defaults_of, print_json, progress_bar

# The options' defaults are EvalConfig's and CPTConfig's (read without importing torch).
EVAL = defaults_of("regrad_cli.learning.evaluation.config:EvalConfig")
CPT = defaults_of("regrad_cli.learning.cpt:CPTConfig")


def eval_cmd(
    dataset: Annotated[list[str], typer.Option("--dataset", help="FORMAT:PATH[@train|dev|all[:N]] (N: a fixed subset of N items) with FORMAT nq-open, pubmedqa, fictional, jsonl or auto; 'demo' (the bundled demo questions and corpus) or synthetic:SEED[:N] (repeatable).")],
    limit: Annotated[Optional[int], typer.Option("--limit", help="Evaluate the first N questions of each dataset.")] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Documents retrieved per question.")] = EVAL["top_k"],
    systems: Annotated[Optional[str], typer.Option("--systems", help="Comma-separated: closed-book, closed-book+phi, rag, rag+phi, cpt, cpt+rag, regrad, regrad+context, oracle, shifted, random (default: all).")] = None,
    out: Annotated[Path, typer.Option("--out", help="Output directory: results.json, report.md, plots, predictions.")] = Path(EVAL["out"]),
    workspace: Annotated[Optional[Path], typer.Option("--workspace", "-w", help="Use this workspace's documents and bank (default: an eval workspace under --cache holding every supporting document of the split, plus --corpus).")] = None,
    corpus: Annotated[Optional[list[str]], typer.Option("--corpus", help="Extra distractor documents in the retrieval pool: a folder, a JSONL file, or a dataset spec (its supporting documents); repeatable.")] = None,
    pool: Annotated[str, typer.Option("--pool", help="Retrieval pool: 'split' (every supporting document of the evaluated split: hard retrieval) or 'questions' (only the evaluated questions' own documents).")] = EVAL["pool"],
    cache: Annotated[Path, typer.Option("--cache", help="Folder of content-keyed eval workspaces (documents + banks), reused by later runs on the same data.")] = Path(EVAL["cache"]),
    drift_steps: Annotated[int, typer.Option("--drift-steps", help="Questions whose step is applied to measure the deployed model's general-text perplexity, per ReGrad system (0: none).")] = EVAL["drift_steps"],
    fail_under: Annotated[Optional[list[str]], typer.Option("--fail-under", help="SYSTEM=F1: exit 1 when SYSTEM's F1 is below F1 on any dataset (repeatable).")] = None,
    baseline: Annotated[Optional[Path], typer.Option("--baseline", help="An earlier results.json: print each system's change in F1 against it.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Language model of the eval workspace (without --workspace): a Hugging Face id, a directory or fake:FAMILY (default: the bundled model).")] = None,
    embedder: Annotated[Optional[str], typer.Option("--embedder", help="Sentence embedder of the eval workspace (without --workspace): a sentence-transformers id, a directory or fake:hash-DIM (default: the bundled embedder).")] = None,
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
    resume: Annotated[bool, typer.Option("--resume", help="Keep the answers of the systems an earlier run in --out already gave under the same options, models and learner; run only the rest.")] = False,
    device: DeviceOpt = None,
    json_out: JsonOpt = False,
):
    """Evaluate closed-book, RAG, CPT and ReGrad systems on QA datasets, with weight drift."""
    from regrad_cli.learning.cpt import CPTConfig
    from regrad_cli.errors import RegradError
    from regrad_cli.learning.evaluation import EvalConfig, parse_fail_under, parse_systems, run_eval
    from regrad_cli.learning.evaluation.report import baseline_lines, fail_under_message

    cfg = EvalConfig(
        datasets=list(dataset), out=str(out), limit=limit, top_k=top_k, systems=parse_systems(systems),
        workspace=str(workspace) if workspace else None, checkpoint=checkpoint, continual=continual,
        seed=seed, max_new_tokens=max_new_tokens, batch_size=batch_size, gamma=gamma, retriever=retriever,
        device=device, corpus=list(corpus or []), pool=pool, model=model, embedder=embedder, cache=str(cache), drift_steps=drift_steps,
        fail_under=parse_fail_under(fail_under), baseline=str(baseline) if baseline else None,
        cpt=CPTConfig(lr=cpt_lr, epochs=cpt_epochs, batch_size=cpt_batch_size, params=cpt_params, seed=seed),
        resume=resume,
    )
    with progress_bar("eval", enabled=not json_out) as update:
        results = run_eval(cfg, progress=lambda d, n, info: update(d, n, info),
                           command=["regrad", *sys.argv[1:]])
    if json_out:
        print_json(results)
    else:
        typer.echo((out / "report.md").read_text(encoding="utf-8"))
        for line in baseline_lines(results):
            typer.echo(line)
        typer.echo(f"wrote {out}/results.json and {out}/report.md ({results['wall_s']['total']:.0f} s)", err=True)
    failed = fail_under_message(results)
    if failed:
        raise RegradError(failed)

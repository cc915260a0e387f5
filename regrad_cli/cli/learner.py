"""`regrad learner ...`: inspect a learner checkpoint (which tensors the step uses)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from regrad_cli.cli.common import DeviceOpt, JsonOpt, WorkspaceOpt, print_json

learner_app = typer.Typer(help="Inspect a learner checkpoint (energy share of each LoRA tensor, document loss); fit its document key map.",
                          no_args_is_help=True)


@learner_app.command("energy")
def energy_cmd(
    checkpoint: Annotated[Optional[str], typer.Option("--checkpoint", help="Learner checkpoint: 'bundled' or a directory (default: workspace config).")] = None,
    docs: Annotated[int, typer.Option("--docs", help="Documents to sample: the workspace's, else the demo corpus.")] = 64,
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="Store tensors whose energy share is above this (default: the recorded one, else 0: every tensor with any energy).")] = None,
    write: Annotated[bool, typer.Option("--write", help="Record the shares and threshold in the checkpoint's learner.json.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the document sample.")] = 0,
    device: DeviceOpt = None,
    workspace: WorkspaceOpt = None,
    json_out: JsonOpt = False,
):
    """Measure each LoRA tensor's share of the step energy; which tensors a bank stores."""
    from regrad_cli.errors import RegradError
    from regrad_cli.learner.energy import measure, write_record
    from regrad_cli.workspace.checkpoints import checkpoint_dir
    from regrad_cli.workspace.engine import Engine

    if docs < 1:
        raise RegradError("--docs must be at least 1")
    ws, choice = _workspace_and_checkpoint(workspace, checkpoint)
    target = checkpoint_dir(choice) if write else None
    texts = _sample_texts(ws, docs, seed)
    max_tokens = ws.config.bank.max_doc_tokens if ws else 256
    engine = Engine.load(ws, checkpoint=choice, device=device)
    result = measure(engine, texts, max_tokens=max_tokens, threshold=threshold)
    if write:
        result["written"] = str(write_record(target, result["record"]))
    if json_out:
        print_json(result)
        return
    rec, sub = result["record"], result["subset"]
    ranked = sorted(rec["energy"].items(), key=lambda kv: -kv[1])
    loss = engine.learner.doc_loss
    typer.echo(f"learner {result['checkpoint_id'][:16]}: energy over {rec['n_docs']} documents "
               f"(max {rec['max_tokens']} tokens, norm {rec['norm']}"
               f"{'' if loss == 'plain' else ', document loss ' + loss})")
    for name, share in ranked[:5]:
        typer.echo(f"  {share:9.3%}  {name}")
    if len(ranked) > 5:
        typer.echo(f"  ... smallest: {ranked[-1][1]:.3g} ({ranked[-1][0]})")
    typer.echo(f"threshold {sub['threshold']:g}: stores {sub['tensors_kept']} of {sub['tensors_total']} tensors "
               f"({sub['values_kept_fraction']:.1%} of the values), leaves out {sub['energy_dropped']:.2e} "
               f"of the energy")
    typer.echo(f"recorded in {result['written']}" if write else "not recorded (pass --write)")


@learner_app.command("fit-keymap")
def fit_keymap_cmd(
    train: Annotated[list[str], typer.Option("--train", help="Training set(s) with documents and questions: FORMAT:PATH[@train] or synthetic:SEED[:N]. Never evaluation data.")],
    out: Annotated[str, typer.Option("--out", help="Directory of the new learner checkpoint (the base learner plus its key map).")],
    checkpoint: Annotated[Optional[str], typer.Option("--checkpoint", help="Base learner: 'bundled' or a directory (default: workspace config).")] = None,
    docs: Annotated[int, typer.Option("--docs", help="Training documents to fit on (in the order of --train).")] = 400,
    ridge: Annotated[float, typer.Option("--ridge", help="Ridge strength, relative to the mean diagonal of the normal equations.")] = 0.1,
    max_doc_tokens: Annotated[int, typer.Option("--max-doc-tokens", help="Tokens of each document's loss (as build-bank).")] = 256,
    tensors: Annotated[str, typer.Option("--tensors", help="'B': the map writes the B tensors only (V = 0; banks then store B only); 'AB': both.")] = "B",
    model: Annotated[Optional[str], typer.Option("--model", help="Language model id or directory (default: workspace config, else the bundled model).")] = None,
    device: DeviceOpt = None,
    workspace: WorkspaceOpt = None,
    json_out: JsonOpt = False,
):
    """Fit a document key map by gradient matching and save the learner with it (docs/method.md)."""
    from pathlib import Path

    from regrad_cli.errors import RegradError
    from regrad_cli.learning.datasets import load_dataset
    from regrad_cli.learner.energy import measure, write_record
    from regrad_cli.learning.keymap import fit_keymap
    from regrad_cli.workspace.engine import Engine

    if docs < 1 or ridge <= 0 or max_doc_tokens < 2:
        raise RegradError("--docs must be >= 1, --ridge > 0 and --max-doc-tokens >= 2")
    if tensors not in ("B", "AB"):
        raise RegradError(f"--tensors must be B or AB, got {tensors!r}")
    if any(spec.partition("@")[0].partition(":")[0] == "demo" for spec in train):
        raise RegradError("the demo questions are an evaluation set: fit on training data only")
    items = [it for spec in train for it in load_dataset(spec)]  # validates every spec first
    target = Path(out)
    if (target / "learner.json").exists():
        raise RegradError(f"{target} already holds a learner checkpoint; choose a new --out")
    ws, choice = _workspace_and_checkpoint(workspace, checkpoint)
    engine = Engine.load(ws, model_id=model, checkpoint=choice, device=device)
    keymap, summary = fit_keymap(engine.model, engine.tokenizer, engine.learner, items, max_docs=docs,
                                 ridge=ridge, max_doc_tokens=max_doc_tokens, b_only=tensors == "B")
    learner = engine.learner
    learner.transform = keymap
    learner.meta = {k: v for k, v in learner.meta.items() if k != "stored_tensors"}
    learner.meta["doc_transform"] = {**summary, "train": list(train), "base": choice}
    cid = learner.save(target)
    # Which tensors the step uses, measured on the new gradients: with --tensors B the A tensors
    # carry nothing and a bank built with this learner stores B only.
    texts = list(dict.fromkeys(it.documents[0] for it in items if it.documents))[:16]
    energy = measure(engine, texts, max_tokens=max_doc_tokens)
    write_record(target, energy["record"])
    result = {"out": str(target), "checkpoint_id": cid, **summary, "stored_tensors": energy["subset"]["tensors_kept"]}
    if json_out:
        print_json(result)
        return
    typer.echo(f"key map fitted on {summary['documents']} documents ({summary['questions']} questions), "
               f"ridge {ridge:g}: learner {cid[:16]} in {target}; build a new bank with --checkpoint {target}")


def _workspace_and_checkpoint(workspace, checkpoint):
    """(the workspace or None when there is none and none was named, the learner checkpoint meant:
    the option, else the workspace's, else the bundled one)."""
    from regrad_cli.errors import ConfigError
    from regrad_cli.workspace.config import BUNDLED_CHECKPOINT, Workspace

    try:
        ws = Workspace.open(workspace, create=False)
    except ConfigError:
        if workspace is not None:
            raise
        ws = None
    return ws, checkpoint or (ws.config.learner.checkpoint if ws else BUNDLED_CHECKPOINT)


def _sample_texts(ws, n: int, seed: int) -> list[str]:
    """Up to n document texts: a seeded sample of the workspace's documents, else the demo corpus."""
    import random
    from importlib.resources import files

    texts: list[str] = []
    if ws is not None:
        from regrad_cli.workspace.documents import DocumentStore

        store = DocumentStore(ws)
        if store.count():
            texts = [d["text"] for d in store.all(columns=["id", "text"])]
    if not texts:
        corpus = files("regrad_cli") / "data" / "demo" / "corpus"
        texts = [p.read_text(encoding="utf-8") for p in sorted(corpus.iterdir(), key=lambda p: p.name)
                 if p.name.endswith(".md")]
    if len(texts) > n:
        texts = random.Random(seed).sample(texts, n)
    return texts


@learner_app.command("snapshot")
def snapshot_cmd(
    run: Annotated[str, typer.Argument(help="A meta-training run directory (its state.pt), e.g. training/long.")],
    out: Annotated[str, typer.Option("--out", help="Directory of the new learner checkpoint.")],
    json_out: JsonOpt = False,
):
    """Write the learner of a run's latest state.pt as a checkpoint (evaluate a run that is still going)."""
    from pathlib import Path

    from regrad_cli.errors import RegradError
    from regrad_cli.learner.lora import Learner
    from regrad_cli.learning.train_state import STATE_FILE, phi_sha256, read_state

    target = Path(out)
    if (target / "learner.json").exists():
        raise RegradError(f"{target} already holds a learner checkpoint; choose a new --out")
    state_path = Path(run) / STATE_FILE
    if not state_path.is_file():
        raise RegradError(f"{state_path} does not exist: give a meta-training run directory (--out of meta-train)")
    state = read_state(state_path)
    config = state["history"].get("config") or {}
    init = config.get("init_checkpoint")
    if not init:
        raise RegradError(f"{state_path}: the run did not start from an --init checkpoint; snapshot needs one "
                          "to know the learner's shape (its best/ or last/ checkpoints are written by meta-train)")
    learner = Learner.load(init)
    if not state["phi"]["stored"] and phi_sha256(learner) != state["phi"]["sha256"]:
        raise RegradError(f"{init} is not the checkpoint this run started from (its frozen phi differs)")
    if learner.transform is not None and any(k.startswith("transform.score_") for k in state["learner"]):
        learner.transform.enable_token_weights()  # a --token-weights run: its weights are in the state
    tensors = learner.state_dict()
    unknown = sorted(set(state["learner"]) - set(tensors))
    if unknown:
        raise RegradError(f"{state_path} holds tensors the learner of {init} does not have ({unknown[:3]})")
    tensors.update(state["learner"])
    try:
        learner.load_state_dict(tensors)
    except (RuntimeError, ValueError) as exc:
        raise RegradError(f"{state_path} does not fit the learner of {init} ({str(exc).splitlines()[0][:200]})") from None
    # The run stepped every tensor: a bank of the snapshot stores every tensor (no energy record).
    learner.meta = {k: v for k, v in learner.meta.items() if k not in ("stored_tensors", "trained")}
    learner.meta["combine"] = config.get("combine", learner.meta.get("combine"))
    learner.meta["norm"] = config.get("norm", learner.meta.get("norm"))
    if config.get("doc_loss"):
        learner.doc_loss = config["doc_loss"]
    learner.meta["trained"] = {"step": state["step"], "config": config, "snapshot_of": str(run)}
    cid = learner.save(target)
    result = {"out": str(target), "checkpoint_id": cid, "step": state["step"], "run": str(run)}
    if json_out:
        print_json(result)
        return
    typer.echo(f"learner of {run} at step {state['step']}: {cid[:16]} in {target}")


@learner_app.command("doc-loss")
def doc_loss_cmd(
    checkpoint: Annotated[str, typer.Argument(help="A learner checkpoint directory (its learner.json is rewritten).")],
    name: Annotated[Optional[str], typer.Argument(help="plain, salient, augmented or distill; leave out to show the current one.")] = None,
    json_out: JsonOpt = False,
):
    """Show or set the loss a learner's document gradients are taken of (a new loss is a new checkpoint id)."""
    from pathlib import Path

    from regrad_cli.errors import RegradError
    from regrad_cli.learner.doc_loss import DOC_LOSSES
    from regrad_cli.workspace.checkpoints import bundled_checkpoint_dir

    if name is not None and name not in DOC_LOSSES:
        raise RegradError(f"unknown document loss {name!r} (use {', '.join(DOC_LOSSES)})")
    path = Path(checkpoint).expanduser()
    if not (path / "learner.json").is_file():
        raise RegradError(f"{path} holds no learner checkpoint (learner.json)")
    if name is not None and path.resolve() == bundled_checkpoint_dir().resolve():
        raise RegradError("the shipped checkpoint is part of the package: copy its directory and set the loss on the copy")
    from regrad_cli.workspace.checkpoints import set_doc_loss

    if name is None:
        from regrad_cli.learner.lora import Learner

        learner = Learner.load(path)
        result = {"checkpoint": str(path), "checkpoint_id": learner.checkpoint_id(), "doc_loss": learner.doc_loss}
    else:
        result = set_doc_loss(path, name)
    if json_out:
        print_json(result)
        return
    if name is None:
        typer.echo(f"learner {result['checkpoint_id'][:16]} in {path}: document loss {result['doc_loss']}")
    elif not result["changed"]:
        typer.echo(f"learner {result['checkpoint_id'][:16]} in {path} already takes the {name} document loss")
    else:
        typer.echo(f"learner {result['previous_id'][:16]} -> {result['checkpoint_id'][:16]} in {path}: document "
                   f"loss {result['previous']} -> {name}; banks built with the old id are stale (build-bank rebuilds)")
        if result["energy_dropped"]:
            typer.echo("its energy record (measured with the old loss) was removed: bank rows store every tensor "
                       "until `regrad learner energy --write` measures it again", err=True)

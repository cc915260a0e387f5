"""`regrad meta-train`: bi-level meta-learning of phi and alpha."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from regrad_cli.cli.common import DeviceOpt, JsonOpt, WorkspaceOpt, defaults_of, print_json, progress_bar

# The options' defaults are MetaTrainConfig's (read without importing torch).
META = defaults_of("regrad_cli.learning.metatrain:MetaTrainConfig")


def meta_train_cmd(
    train: Annotated[list[str], typer.Option("--train", help="Training data FORMAT:PATH[@train|dev|all[:N]] (N: a fixed subset of N items; repeatable).")],
    dev: Annotated[Optional[list[str]], typer.Option("--dev", help="Dev data FORMAT:PATH[@split] (repeatable).")] = None,
    out: Annotated[Path, typer.Option("--out", help="Output directory for checkpoints, log and plot.")] = Path(META["out"]),
    k: Annotated[int, typer.Option("--k", help="Documents per inner step (supporting + retrieved distractors).")] = META["k"],
    steps: Annotated[int, typer.Option("--steps", help="Meta-steps.")] = META["steps"],
    epochs: Annotated[Optional[float], typer.Option("--epochs", help="Epochs over the training questions (overrides --steps).")] = None,
    meta_batch: Annotated[int, typer.Option("--meta-batch", help="Questions per meta-step.")] = META["meta_batch"],
    lr: Annotated[float, typer.Option("--lr", help="Learning rate of phi (AdamW).")] = META["lr"],
    alpha_lr: Annotated[float, typer.Option("--alpha-lr", help="Learning rate of log-alpha.")] = META["alpha_lr"],
    warmup: Annotated[float, typer.Option("--warmup", help="Warm-up fraction, then linear decay.")] = META["warmup"],
    clip: Annotated[float, typer.Option("--clip", help="Gradient-norm clip.")] = META["clip"],
    first_order: Annotated[bool, typer.Option("--first-order", help="Drop second-order terms (cheaper).")] = META["first_order"],
    with_context: Annotated[bool, typer.Option("--with-context", help="Train the parameter + in-context variant only.")] = META["with_context"],
    context_mix: Annotated[float, typer.Option("--context-mix", help="Fraction of questions that also see the passages in the prompt (one learner for both modes).")] = META["context_mix"],
    norm: Annotated[str, typer.Option("--norm", help="Gradient normalisation before combining: none, doc or tensor.")] = META["norm"],
    combine: Annotated[str, typer.Option("--combine", help="Combination of the k gradients: sum, mean or score.")] = META["combine"],
    retrieval: Annotated[str, typer.Option("--retrieval", help="Training documents: 'retrieved' (the query's dense top-k over the pool) or 'gold' (gold + distractors).")] = META["retrieval"],
    codec: Annotated[str, typer.Option("--codec", help="Bank codec the inner-step gradients pass through (straight-through); 'fp32' for none.")] = META["codec"],
    first_order_steps: Annotated[int, typer.Option("--first-order-steps", help="Warm up with this many first-order steps, second order after.")] = META["first_order_steps"],
    locality: Annotated[float, typer.Option("--locality", help="Weight of a KL term keeping general text unchanged.")] = META["locality"],
    locality_text: Annotated[Optional[Path], typer.Option("--locality-text", help="UTF-8 text for the --locality KL (default: the bundled general text, on which `regrad eval` also measures drift).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = META["seed"],
    max_doc_tokens: Annotated[int, typer.Option("--max-doc-tokens", help="Truncate documents to this many tokens.")] = META["max_doc_tokens"],
    dev_limit: Annotated[int, typer.Option("--dev-limit", help="Dev questions per evaluation.")] = META["dev_limit"],
    eval_every: Annotated[int, typer.Option("--eval-every", help="Evaluate on dev and save state every N steps.")] = META["eval_every"],
    save_every_s: Annotated[float, typer.Option("--save-every-s", help="Also save state.pt and log.json when this many seconds passed since the last save (0: only at dev checks).")] = META["save_every_s"],
    alpha_init: Annotated[float, typer.Option("--alpha-init", help="Initial step size alpha (0.1 stayed too small over a few hundred CPU steps).")] = META["alpha_init"],
    transform_lr: Annotated[float, typer.Option("--transform-lr", help="Learning rate of the learner's document key map (first order; needs --init of a learner made by `regrad learner fit-keymap`); 0 keeps it fixed.")] = META["transform_lr"],
    freeze_phi: Annotated[bool, typer.Option("--freeze-phi", help="Keep phi fixed; train only alpha, the temperature and the key map.")] = META["freeze_phi"],
    factor_cache_gb: Annotated[float, typer.Option("--factor-cache-gb", help="With --freeze-phi and a key map: keep documents' factors (bfloat16) up to this many GiB and reuse them; 0 recomputes them every draw.")] = META["factor_cache_gb"],
    factor_cache_dtype: Annotated[str, typer.Option("--factor-cache-dtype", help="How cached factors are stored: bfloat16, float8 (each token's row scaled; half the memory) or float32 (exact).")] = META["factor_cache_dtype"],
    prefix_cache_gb: Annotated[float, typer.Option("--prefix-cache-gb", help="Keep each training text's hidden states below the first adapted layer (float32, exact) up to this many GiB and start every pass there (llama-style families); 0: off.")] = META["prefix_cache_gb"],
    precision: Annotated[str, typer.Option("--precision", help="Model passes of each step and of the dev checks: float32, bfloat16 (autocast; the learner, AdamW and the loss stay float32) or auto (bfloat16 where the device has native bf16 products, e.g. a CUDA GPU).")] = META["precision"],
    doc_loss: Annotated[Optional[str], typer.Option("--doc-loss", help="Loss of the document gradients, built from the document alone: plain (the paper's next-token loss), salient, augmented or distill (first order only); recorded in the trained learner (default: the --init learner's, else plain).")] = None,
    token_weights: Annotated[bool, typer.Option("--token-weights", help="Learn per-token weights inside the document key map (start at weight 1; trained with --transform-lr; needs --init of a learner with a key map).")] = META["token_weights"],
    mix: Annotated[Optional[str], typer.Option("--mix", help="Sampling weights of the --train sets, comma-separated.")] = None,
    init_checkpoint: Annotated[Optional[Path], typer.Option("--init", help="Start from this learner checkpoint.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/state.pt.")] = False,
    stop_after: Annotated[Optional[int], typer.Option("--stop-after", help="Stop after this many steps of this session as SIGTERM does (state.pt and log.json saved, no last/, exit 0); --resume continues.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Language model (default: workspace config).")] = None,
    device: DeviceOpt = None,
    workspace: WorkspaceOpt = None,
    json_out: JsonOpt = False,
):
    """Meta-train the learner (phi, alpha) so that retrieved gradients make the model answer (data-parallel under torchrun)."""
    from regrad_cli.errors import OptionError
    from regrad_cli.learner.gradients import COMPUTE_DTYPES

    if factor_cache_dtype not in FACTOR_CACHE_DTYPES:
        raise OptionError(f"--factor-cache-dtype {factor_cache_dtype!r}: use one of {', '.join(FACTOR_CACHE_DTYPES)}")
    if precision not in COMPUTE_DTYPES:
        raise OptionError(f"--precision {precision!r}: use one of {', '.join(COMPUTE_DTYPES)}")
    if stop_after is not None and stop_after < 1:
        raise OptionError(f"--stop-after {stop_after}: give a number of steps, 1 or more")
    if doc_loss is not None:
        from regrad_cli.learner.doc_loss import DOC_LOSSES

        if doc_loss not in DOC_LOSSES:
            raise OptionError(f"--doc-loss {doc_loss!r}: use one of {', '.join(DOC_LOSSES)}")
    from importlib.resources import files

    from regrad_cli.learning import distributed
    from regrad_cli.workspace.config import Workspace
    from regrad_cli.learning.metatrain import MetaTrainConfig, meta_train
    from regrad_cli.lm.models import Embedder, load_language_model

    ws = Workspace.open(workspace, create=False) if workspace else None
    mcfg = ws.config.model if ws else None
    cfg = MetaTrainConfig(
        train=list(train), dev=list(dev or []), out=str(out), k=k, steps=steps, epochs=epochs,
        meta_batch=meta_batch, lr=lr, alpha_lr=alpha_lr, warmup=warmup, clip=clip,
        first_order=first_order, with_context=with_context, context_mix=context_mix, norm=norm,
        combine=combine, retrieval=retrieval, codec=None if codec == "fp32" else codec,
        first_order_steps=first_order_steps, locality=locality, locality_text=str(locality_text) if locality_text else None, seed=seed,
        max_doc_tokens=max_doc_tokens, dev_limit=dev_limit, eval_every=eval_every, save_every_s=save_every_s,
        alpha_init=alpha_init, init_checkpoint=str(init_checkpoint) if init_checkpoint else None,
        mix_weights=[float(x) for x in mix.split(",")] if mix else None,
        transform_lr=transform_lr, freeze_phi=freeze_phi, factor_cache_gb=factor_cache_gb, factor_cache_dtype=factor_cache_dtype,
        prefix_cache_gb=prefix_cache_gb, doc_loss=doc_loss, token_weights=token_weights, precision=precision,
    )
    general = (_locality_text(locality_text) if locality_text
               else (files("regrad_cli") / "data" / "general_text.txt").read_text(encoding="utf-8"))
    # Under torchrun each process joins the job and takes the GPU of its LOCAL_RANK; alone,
    # nothing is initialised and lm_device is the configured device.
    dist, lm_device = distributed.init(device or (mcfg.device if mcfg else "cpu"))
    try:
        lm = load_language_model(model or (mcfg.id if mcfg else "bundled:smollm2-135m-instruct"),
                                 device=lm_device, dtype=mcfg.dtype if mcfg else "float32")
        # Only rank 0 embeds (meta_train sends the pools to the others); the embedder loads lazily.
        emb = Embedder(ws.config.embedder.id if ws else "bundled:all-minilm-l6-v2",
                       device=lm_device if device else "cpu")
        with progress_bar("meta-train", total=steps, enabled=not json_out and dist.main) as update:
            summary = meta_train(cfg, lm.model, lm.tokenizer, emb, resume=resume, general_text=general,
                                 dist=dist, lora_cfg=ws.config.lora if ws else None, stop_after=stop_after,
                                 progress=lambda s, n, r: update(
                                     s, n, f"loss {r['loss']:.3f} alpha {r['alpha_mean']:.3g}"))
    finally:
        distributed.shutdown()
    if not dist.main:
        return
    summary["model"] = lm.fingerprint
    world = f" on {dist.world} processes" if dist.enabled else ""
    if json_out:
        print_json(summary)
    elif "stopped_at" in summary:
        typer.echo(f"stopped after step {summary['stopped_at']} of {summary['steps']}: state saved in {out}/state.pt; "
                   f"the same command with --resume continues it ({summary['wall_s']:.0f} s{world})")
    else:
        typer.echo(f"best dev F1 {summary['best_dev_f1']:.3f}; checkpoints in {out}/best and {out}/last "
                   f"({summary['wall_s']:.0f} s{world})")
    if "stopped_at" in summary and summary.get("stopped_by") != "--stop-after":
        # Stopped by a signal, cleanly: the shell's status for it (130 SIGINT, 143 SIGTERM).
        raise typer.Exit(130 if summary.get("stopped_by") == "SIGINT" else 143)


FACTOR_CACHE_DTYPES = ("bfloat16", "float8", "float32")  # transform.FactorCache.DTYPES, without importing torch
LOCALITY_TEXT_MAX_BYTES = 16 * 2**20


def _locality_text(path: Path) -> str:
    """The --locality-text file: a bounded UTF-8 read with one clear error for anything else."""
    from regrad_cli.errors import OptionError
    from regrad_cli.files import read_at_most

    raw = read_at_most(path, LOCALITY_TEXT_MAX_BYTES, f"--locality-text {path}", OptionError)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OptionError(f"--locality-text {path}: not UTF-8 text (byte {exc.start})") from None
    if len(text.split()) < 64:
        raise OptionError(f"--locality-text {path}: too short (needs at least a few hundred words)")
    return text


"""The ``regrad`` command line: one module per command (registered here, explicitly), heavy imports
inside the commands."""

from __future__ import annotations

import logging
import os
import sys

import typer

from regrad_cli import __version__
app = typer.Typer(
    name="regrad",
    help="ReGrad: keep a language model up to date with retrievable per-document gradients.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool):
    if value:
        typer.echo(f"regrad {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details to stderr (also after the command)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress and no warnings on stderr, errors only (also after the command)."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    allow_endpoint: bool = typer.Option(False, "--allow-endpoint",
                                        help="Use the object-store bank location and endpoints named in regrad.toml (else refused; also REGRAD_ALLOW_ENDPOINT=1)."),
):
    """ReGrad: keep a language model up to date with retrievable per-document gradients."""
    from regrad_cli.cli import common

    common.QUIET = quiet
    # -v: regrad's own loggers at INFO; third-party libraries stay at WARNING (no config dumps).
    logging.basicConfig(level=logging.ERROR if quiet else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for name in ("regrad", "regrad_cli", "bank_format"):
        logging.getLogger(name).setLevel(logging.INFO if verbose and not quiet else logging.NOTSET)
    # Quiet third-party chatter on stderr (transformers would print whole model configs).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if allow_endpoint:
        os.environ["REGRAD_ALLOW_ENDPOINT"] = "1"


from regrad_cli.cli import bank, build_bank, ingest, learner, meta_train, query, serve, status  # noqa: E402
from regrad_cli.cli import eval as eval_command  # noqa: E402

# Every command, in the order `regrad --help` lists them.
app.command("build-bank")(build_bank.build_bank_cmd)
app.command("eval")(eval_command.eval_cmd)
app.command("ingest")(ingest.ingest_cmd)
app.command("meta-train")(meta_train.meta_train_cmd)
app.command("query")(query.query_cmd)
app.command("serve")(serve.serve_cmd)
app.command("status")(status.status_cmd)
app.add_typer(bank.bank_app, name="bank")
app.add_typer(learner.learner_app, name="learner")
app.add_typer(status.docs_app, name="docs")


def main() -> None:
    """Entry point: domain errors become one line on stderr and exit status 1."""
    from regrad_cli.errors import OptionError, RegradError

    sys.argv[1:] = hoist_global_options(sys.argv[1:])
    try:
        from bank_format import BankFormatError
    except ImportError:  # pragma: no cover
        BankFormatError = RegradError  # type: ignore[misc,assignment]
    try:
        # standalone_mode=False returns a command's typer.Exit code instead of exiting.
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except OptionError as exc:  # a bad option value: a usage error, refused before any work
        typer.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    except (RegradError, BankFormatError) as exc:
        typer.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:  # the environment, not a bug: a full disk, a read-only or missing path
        typer.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    except MemoryError:  # the user's memory limit (ulimit -v, a cgroup) was reached
        typer.echo("Error: out of memory (raise the memory limit, or lower the batch or size settings)", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("Interrupted.", err=True)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("Aborted.", err=True)
        sys.exit(1)
    except Exception as exc:  # click usage errors
        if isinstance(exc, _click_exceptions()):
            exc.show()
            sys.exit(exc.exit_code)
        raise


GLOBAL_FLAGS = ("-v", "--verbose", "-q", "--quiet")


def hoist_global_options(args: list[str]) -> list[str]:
    """The arguments with -v/--verbose/-q/--quiet moved before the command, so that they work
    after it too (`regrad build-bank -q`). Nothing after a bare "--" is moved."""
    end = args.index("--") if "--" in args else len(args)
    flags = [a for a in args[:end] if a in GLOBAL_FLAGS]
    if not flags:
        return args
    return flags + [a for a in args[:end] if a not in GLOBAL_FLAGS] + args[end:]


def _click_exceptions() -> tuple[type, ...]:
    # typer >= 0.2x raises the exceptions of its own vendored copy of click (typer._click), which
    # are not click's: check both, or a usage error (a bad option value) ends in a traceback.
    import importlib

    types = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            types.append(importlib.import_module(module).ClickException)
        except (ImportError, AttributeError):
            pass
    return tuple(types)

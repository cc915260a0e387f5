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
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details to stderr."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    allow_endpoint: bool = typer.Option(False, "--allow-endpoint",
                                        help="Use the object-store bank location and endpoints named in regrad.toml (else refused; also REGRAD_ALLOW_ENDPOINT=1)."),
):
    """ReGrad: keep a language model up to date with retrievable per-document gradients."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # Quiet third-party chatter on stderr unless asked for.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info" if verbose else "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if allow_endpoint:
        os.environ["REGRAD_ALLOW_ENDPOINT"] = "1"


from regrad_cli.cli import bank, build_bank, ingest, learner, meta_train, query, serve  # noqa: E402
from regrad_cli.cli import eval as eval_command  # noqa: E402

# Every command, in the order `regrad --help` lists them.
app.command("build-bank")(build_bank.build_bank_cmd)
app.command("eval")(eval_command.eval_cmd)
app.command("ingest")(ingest.ingest_cmd)
app.command("meta-train")(meta_train.meta_train_cmd)
app.command("query")(query.query_cmd)
app.command("serve")(serve.serve_cmd)
app.add_typer(bank.bank_app, name="bank")
app.add_typer(learner.learner_app, name="learner")


def main() -> None:
    """Entry point: domain errors become one line on stderr and exit status 1."""
    from regrad_cli.errors import RegradError

    try:
        from bank_format import BankFormatError
    except ImportError:  # pragma: no cover
        BankFormatError = RegradError  # type: ignore[misc,assignment]
    try:
        # standalone_mode=False returns a command's typer.Exit code instead of exiting.
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
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

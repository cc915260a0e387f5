"""`regrad bank ...`: inspect and maintain a gradient bank."""

import typer

bank_app = typer.Typer(help="Inspect and maintain the gradient bank (stats, verify, rm, compact).", no_args_is_help=True)

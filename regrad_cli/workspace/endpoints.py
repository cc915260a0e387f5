"""Remote endpoints named in a workspace's regrad.toml: used only when the user confirms them.

A copied regrad.toml could send a bank (gradients, embeddings, document ids, source paths) to a
machine of its author's choosing, signed with the user's own credentials: ``[bank] uri =
"s3://..."`` with ``storage_options.aws_endpoint = "http://elsewhere"``. So an object-store bank
location or an endpoint-like storage option (a key naming an endpoint, URL or host) that comes
from regrad.toml is used only with ``regrad --allow-endpoint COMMAND`` or ``REGRAD_ALLOW_ENDPOINT=1``,
and is otherwise refused in one line. Whatever its source (the file, ``REGRAD_BANK_URI``,
``REGRAD_BANK_STORAGE_OPTIONS``), a remote location or endpoint is named on stderr once per run.
"""

from __future__ import annotations

import os
import re
import sys

from regrad_cli.errors import ConfigError

ENV = "REGRAD_ALLOW_ENDPOINT"
_ENDPOINT_KEY = re.compile(r"endpoint|url|host|proxy", re.IGNORECASE)
_named: set[str] = set()


def allowed() -> bool:
    return os.environ.get(ENV, "").strip().lower() not in ("", "0", "false", "no")


def endpoint_options(options: dict) -> dict:
    """The storage options that say where data goes (endpoint, URL, host, proxy keys)."""
    return {k: v for k, v in options.items() if _ENDPOINT_KEY.search(str(k))}


def use(what: str, source: str, from_config: bool) -> None:
    """Name ``what`` (a remote location or endpoint) on stderr once; from regrad.toml, refuse it
    unless the user confirmed endpoints."""
    if from_config and not allowed():
        raise ConfigError(
            f"{source} sends data to {what}: a remote endpoint from a configuration file is used "
            f"only when you confirm it (regrad --allow-endpoint COMMAND, or {ENV}=1)")
    if what not in _named:
        _named.add(what)
        sys.stderr.write(f"regrad: using {what} (from {source})\n")
        sys.stderr.flush()

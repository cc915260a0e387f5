"""Distributed writes: bank rows written as uncommitted Lance fragments by many workers, made
visible by the driver in ONE commit (``GradientBank.commit_fragments``).

A ``FragmentWriter`` holds only the bank's location, metadata and storage options, so it pickles
to any worker process or machine (a Ray actor, say). Secret storage options (keys, tokens,
passwords) are left out of the pickle: a worker supplies its own (``with_storage_options``) or
its environment does (``AWS_*``), so credentials are not copied to every worker. Its ``write`` validates and encodes rows
exactly as ``GradientBank.append`` does and writes their data files under the bank's table, but
commits nothing: until the driver commits, readers see the previous version, and a build that
dies before the commit leaves the bank as it was (the orphaned data files are removed by a later
``compact``/``purge``: at once when no build holds the bank's build lease, else once they are
older than ``lance_ops.ORPHAN_GRACE``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import BankFormatError
from .location import lance_errors, location, table_uri
from .rows import rows_table
from .schema import BankMeta, arrow_schema

# Rows of one written fragment file at most (a worker's call writes one fragment per call
# unless it is larger).
MAX_ROWS_PER_FILE = 1 << 20
# Storage option names that hold credentials (aws_secret_access_key, azure_storage_sas_token,
# google_service_account_key, ...): never pickled.
_SECRET = re.compile(r"secret|token|password|credential|key|sas|signature", re.IGNORECASE)


def secret_option(name: str) -> bool:
    """True for a storage option that holds a credential (an access key *id* names one, like a
    user name, and travels)."""
    return bool(_SECRET.search(name)) and not name.lower().endswith("key_id")


class FragmentWriter:
    """Writes rows of one bank as uncommitted fragments; picklable, usable from any process."""

    def __init__(self, path: "Path | str", meta: BankMeta, storage_options: Mapping[str, str] | None = None,
                 data_storage_version: str | None = None):
        self.location = location(path)
        self.meta_json = meta.to_json()
        self.storage_options = dict(storage_options or {})
        self.data_storage_version = data_storage_version

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        opts = state["storage_options"]
        state["storage_options"] = {k: v for k, v in opts.items() if not secret_option(k)}
        state["_secrets_left_out"] = sorted(k for k in opts if secret_option(k))
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    @property
    def secrets_left_out(self) -> list[str]:
        """Names of the secret storage options this copy lost in pickling."""
        return list(self.__dict__.get("_secrets_left_out", []))

    def with_storage_options(self, extra: Mapping[str, str]) -> "FragmentWriter":
        """A copy with ``extra`` merged into its storage options (a worker's own credentials)."""
        other = FragmentWriter(self.location, BankMeta.from_json(self.meta_json),
                               {**self.storage_options, **dict(extra)}, self.data_storage_version)
        return other

    def write(self, rows: Sequence[Mapping[str, Any]]) -> list[str]:
        """Validate, encode and write ``rows``; return the new fragments as JSON strings (to pass
        to ``GradientBank.commit_fragments``). Nothing is visible to readers yet."""
        import lance.fragment

        meta = BankMeta.from_json(self.meta_json)
        table = rows_table(meta, rows)
        if table is None:
            return []
        with lance_errors(f"cannot write fragments of bank at {self.location}"):
            frags = lance.fragment.write_fragments(
                table, table_uri(self.location), schema=arrow_schema(meta.dim), mode="append",
                max_rows_per_file=MAX_ROWS_PER_FILE, data_storage_version=self.data_storage_version,
                storage_options=self.storage_options or None,
            )
        return [json.dumps(f.to_json()) for f in frags]


def parse_fragments(fragments: Sequence[str]) -> list[Any]:
    from lance.fragment import FragmentMetadata

    out = []
    for i, f in enumerate(fragments):
        try:
            out.append(FragmentMetadata.from_json(f))
        except Exception as e:
            raise BankFormatError(f"fragment {i} is not Lance fragment metadata: {e}") from None
    return out

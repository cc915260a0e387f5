"""The spec (docs/bank-format.md) and the code agree; bank_format stands alone."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa

from bank_format import CODECS, arrow_schema
from bank_format.blob import HEADER_SIZE, MAGIC

REPO = Path(__file__).resolve().parent.parent
SPEC = (REPO / "docs" / "bank-format.md").read_text(encoding="utf-8")


def _table_rows(start_marker: str, end_marker: str) -> list[list[str]]:
    block = SPEC.split(start_marker, 1)[1].split(end_marker, 1)[0]
    rows = [line.strip() for line in block.splitlines() if line.strip().startswith("|")]
    cells = [[c.strip().strip("`") for c in row.strip("|").split("|")] for row in rows]
    return [c for c in cells[2:]]  # skip header and separator


def test_spec_schema_table_matches_code():
    rows = _table_rows("<!-- schema-table", "<!-- /schema-table -->")
    dim = 7
    schema = arrow_schema(dim)
    assert [r[0] for r in rows] == schema.names, "column names or order differ"
    for name, type_text, nullable, meaning in rows:
        field = schema.field(name)
        assert type_text.replace("[dim]", f"[{dim}]") == str(field.type), name
        assert nullable in ("yes", "no"), name
        assert (nullable == "yes") == field.nullable, name
        assert meaning, name
    assert schema.field("embedding").type == pa.list_(pa.float32(), dim)


def test_spec_blob_header_matches_code():
    rows = _table_rows("### 5.1 Fixed header", "The zstd level")
    offsets = [(int(r[0]), int(r[1])) for r in rows]
    pos = 0
    for off, size in offsets:
        assert off == pos, f"header field at {off}, expected {pos}"
        pos += size
    assert pos == HEADER_SIZE
    assert MAGIC.hex(" ") in SPEC.replace("`", "")
    codec_line = next(r for r in rows if r[3] == "codec_id")[4]
    assert re.findall(r"`?(\d)`? ([a-z0-9]+)", codec_line) == [(str(i), c) for i, c in enumerate(CODECS)]


def test_import_alone_and_use_without_torch(tmp_path):
    code = f"""
import sys
import bank_format
assert 'torch' not in sys.modules and 'lancedb' not in sys.modules
assert not any(m == 'regrad_cli' or m.startswith('regrad_cli.') for m in sys.modules)
import numpy as np
from bank_format import BankMeta, GradientBank, TensorSpec
meta = BankMeta(producer='t', model={{'id': 'm'}}, learner={{}}, embedder={{'id': 'e', 'dim': 4}},
                layout=[TensorSpec('a', (2,))])
b = GradientBank.create({str(tmp_path / 'b')!r}, meta)
b.append([{{'doc_id': 'd', 'content_hash': 'h', 'embedding': np.ones(4), 'tensors': [np.ones(2)], 'n_tokens': 1}}])
assert b.search(np.ones(4), 1)[0]['doc_id'] == 'd' and b.fetch(['d']) and b.verify()['ok'] == 1
assert 'torch' not in sys.modules, 'using a bank imported torch'
assert not any(m.startswith('regrad_cli') for m in sys.modules)
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]


def test_sources_do_not_import_torch_or_regrad_cli():
    for path in (REPO / "bank_format").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"^\s*(import|from)\s+(torch|regrad_cli)\b", text, re.M), path.name

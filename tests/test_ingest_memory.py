"""Ingest memory follows the chunking window, not the document (issue 32): one 19 MB record (the
shape that took 3.9 GB RSS with the bundled tokenizer, 8.2 GB with the fake one) is chunked in a
child whose address space is capped a little above what the text and its chunks need."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_CHILD = r"""
import re, resource, sys
from regrad_cli.offline.ingest.chunking import chunk_text

class OffsetTokenizer:
    # A fast tokenizer's interface (offsets reported), one token per word or punctuation mark:
    # the whole-text offset list of 19 MB is about 4 million tuples.
    _tok = re.compile(r"\w+|[^\w\s]")
    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        spans = [m.span() for m in self._tok.finditer(text)]
        out = {"input_ids": [0] * len(spans)}
        if return_offsets_mapping:
            out["offset_mapping"] = spans
        return type("Enc", (), {"input_ids": out["input_ids"], "__getitem__": lambda s, k: out[k]})()

def vm():
    return int(open("/proc/self/statm").read().split()[0]) * 4096

n_bytes, headroom = int(sys.argv[1]), int(sys.argv[2])
words = "The observatory on Velmora Ridge was founded in 1887, and its first director was Ada. "
text = (words * (n_bytes // len(words) + 1))[:n_bytes]
limit = vm() + headroom
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
try:
    chunks = chunk_text(text, OffsetTokenizer(), 256, 32)
except MemoryError:
    print("MemoryError")
    sys.exit(3)
assert all(c.n_tokens <= 256 for c in chunks)
print(len(chunks), sum(len(c.text) for c in chunks))
"""


def test_a_19mb_record_is_chunked_in_bounded_memory():
    n_bytes = 19 * 10**6
    # The text, its ~22 MB of chunks and their objects, and working room; whole-text offsets
    # (about 4 million tuples and lists of them) need several times this.
    headroom = 200 << 20
    out = subprocess.run([sys.executable, "-c", _CHILD, str(n_bytes), str(headroom)], capture_output=True,
                         text=True, timeout=600, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, (out.stdout, out.stderr[-2000:])
    n_chunks, n_chars = map(int, out.stdout.split())
    assert n_chunks > 1000 and n_chars >= n_bytes  # every character is in a chunk (overlaps repeat some)

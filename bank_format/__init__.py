"""bank_format: the on-disk format of regrad's Gradient Bank (spec: docs/bank-format.md).

Stands alone: numpy, pyarrow, zstandard and lancedb/pylance only, never torch or regrad_cli, so any
tool can read a bank. lancedb is imported only when a ``GradientBank`` is used.
"""

from .blob import blob_info, decode_blob, encode_blob
from .errors import BankFormatError, BankMismatchError, CorruptBlobError
from .schema import CODECS, FORMAT_VERSION, BankMeta, CodecSpec, TensorSpec, arrow_schema
from .location import is_remote
from .bank import GradientBank
from .fragments import FragmentWriter

__all__ = [
    "FORMAT_VERSION",
    "CODECS",
    "BankFormatError",
    "BankMismatchError",
    "CorruptBlobError",
    "TensorSpec",
    "CodecSpec",
    "BankMeta",
    "encode_blob",
    "decode_blob",
    "blob_info",
    "arrow_schema",
    "GradientBank",
    "FragmentWriter",
    "is_remote",
]

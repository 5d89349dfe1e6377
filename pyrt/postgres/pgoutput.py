"""The pgoutput decoder (logical replication's message format), in Rust (core/engine): what
the WAL source decodes the replication stream with. docs/pgoutput.md has the format and the
decoder's guarantees; `pyrt.reference.pgoutput` is its plain-Python oracle (tests only)."""

from .._core import (
    PgBegin,
    PgChange,
    PgCommit,
    PgLogicalMessage,
    PgOutputDecoder,
    PgRelation,
    PgTruncate,
    PgUnknown,
    format_commit_time,
)
from .._errors import DecodeError

__all__ = [
    "DecodeError",
    "PgBegin",
    "PgChange",
    "PgCommit",
    "PgLogicalMessage",
    "PgOutputDecoder",
    "PgRelation",
    "PgTruncate",
    "PgUnknown",
    "format_commit_time",
]

"""Moved to :mod:`qconvert.io.shards`; the names stay importable from here."""

from ..io.shards import ShardWriter, header_bound, shard_digest, tensor_view  # noqa: F401

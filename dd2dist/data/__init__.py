"""Token shards: the sample schema and codec, a validating shard writer, and the streaming training reader.

One sample of a token shard (format: docs/scaling.md §4) is a group of tar members sharing a ``__key__``:
``tokens.tok16`` (headerless little-endian int16), the condition (``cond.cls`` + ``label.i64``, or
``text.f16`` + ``text_mask.u8``) and ``meta.json``. See :mod:`dd2dist.data.schema`.
"""

from dd2dist.data.identity import teacher_id, teacher_spec
from dd2dist.data.schema import (
    SCHEMA_VERSION,
    SampleError,
    ShardSpec,
    TeacherMismatch,
    TokenSample,
    decode_sample,
    encode_sample,
)
from dd2dist.data.stats import DataStats
from dd2dist.data.stream import StreamState, TokenBatch, TokenStream, list_shards, stream_from_config
from dd2dist.data.writer import TokenShardWriter, write_index

__all__ = [
    "SCHEMA_VERSION", "SampleError", "ShardSpec", "TeacherMismatch", "TokenSample", "decode_sample",
    "encode_sample", "DataStats", "StreamState", "TokenBatch", "TokenStream", "list_shards", "TokenShardWriter",
    "write_index", "stream_from_config", "teacher_id", "teacher_spec",
]

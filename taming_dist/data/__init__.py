"""Data: webdataset shards (writing, verifying), the built-in synthetic dataset, training streams
and stage-2 code shards."""
from .images import make_grid, save_grid
from .shards import VerifyReport, read_manifest, resolve_shards, verify_shards, write_shards
from .stream import CorruptDataError, DataStream, build_stream, epoch_layout
from .synthetic import CLASS_NAMES, ensure_synthetic

__all__ = [
    "CLASS_NAMES", "CorruptDataError", "DataStream", "VerifyReport", "build_stream", "ensure_synthetic",
    "epoch_layout", "make_grid", "read_manifest", "resolve_shards", "save_grid", "verify_shards", "write_shards",
]

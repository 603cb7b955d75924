"""Model-agnostic checkpoint I/O: tensor sources (safetensors / torch files), streaming writers,
the megadistill sharded format, and atomic folder writes. Model families add their key maps and
configs on top (see ``megadistill.models.wan.checkpoint``)."""
from .atomic import atomic_folder, check_destination, write_json_atomic
from .errors import CheckpointError
from .safetensors_io import (SafetensorsFile, SafetensorsWriter, dtype_from_name, dtype_name, nbytes)
from .sharded import MANIFEST, Placement, ShardedSource, ShardedWriter, read_manifest, shard_file
from .sources import (MultiSource, TorchFileSource, collect_weight_files, open_file, open_files,
                      tp_slice_bounds)
from .writers import FileSetWriter, SizeShardedWriter, parse_size

__all__ = [
    "atomic_folder", "check_destination", "write_json_atomic", "CheckpointError", "SafetensorsFile",
    "SafetensorsWriter", "dtype_from_name", "dtype_name", "nbytes", "MANIFEST", "Placement",
    "ShardedSource", "ShardedWriter", "read_manifest", "shard_file", "MultiSource", "TorchFileSource",
    "collect_weight_files", "open_file", "open_files", "tp_slice_bounds", "FileSetWriter",
    "SizeShardedWriter", "parse_size",
]

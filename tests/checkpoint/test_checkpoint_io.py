"""Generic checkpoint I/O: safetensors reader/writer, size sharding, sharded format, atomic folders."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from megadistill.checkpoint import (CheckpointError, Placement, SafetensorsFile, SafetensorsWriter, ShardedSource,
                                    ShardedWriter, SizeShardedWriter, atomic_folder, parse_size)
from megadistill.checkpoint import safetensors_io

from ckpt_helpers import leftovers


def _tensors():
    g = torch.Generator().manual_seed(1)
    return {
        "a": torch.randn(6, 10, generator=g),
        "b": torch.randn(4, 6, 5, generator=g).to(torch.bfloat16),
        "c": torch.arange(7, dtype=torch.int64),
        "d": torch.randn(3, 2, generator=g).half(),
        "s": torch.tensor(3.5, dtype=torch.float64),
        "m": torch.tensor([True, False, True]),
    }


def test_writer_output_loads_in_safetensors_and_back(tmp_path):
    ts = _tensors()
    w = SafetensorsWriter(tmp_path / "x.safetensors", [(k, v.shape, v.dtype) for k, v in ts.items()])
    for k in ["c", "s", "a", "m", "d", "b"]:  # any arrival order
        w.write(k, ts[k])
    w.close()
    theirs = load_file(tmp_path / "x.safetensors")
    assert set(theirs) == set(ts) and all(torch.equal(theirs[k], ts[k]) and theirs[k].dtype == ts[k].dtype for k in ts)
    save_file(ts, tmp_path / "y.safetensors")
    f = SafetensorsFile(tmp_path / "y.safetensors")
    assert all(torch.equal(f.read(k), ts[k]) and f.dtype(k) == ts[k].dtype for k in ts)
    f.close()


@pytest.mark.parametrize("dim,start,stop", [(0, 1, 3), (1, 2, 5), (2, 1, 4), (1, 0, 6), (0, 0, 0)])
def test_slice_reads_only_the_slice(tmp_path, monkeypatch, dim, start, stop):
    t = torch.randn(4, 6, 5)
    save_file({"t": t}, tmp_path / "t.safetensors")
    f = SafetensorsFile(tmp_path / "t.safetensors")
    read = []
    real = os.preadv
    monkeypatch.setattr(safetensors_io.os, "preadv", lambda fd, bufs, off: read.append(sum(len(b) for b in bufs))
                        or real(fd, bufs, off))
    got = f.read("t", dim, start, stop)
    assert torch.equal(got, t.narrow(dim, start, stop - start))
    assert sum(read) == got.numel() * 4  # bytes read from disk == bytes of the slice
    f.close()


def test_truncated_and_garbage_files_are_rejected(tmp_path):
    save_file({"w": torch.randn(64, 64)}, tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated file: tensor 'w'"):
        SafetensorsFile(tmp_path / "cut.safetensors")
    (tmp_path / "head.safetensors").write_bytes(data[:40])
    with pytest.raises(CheckpointError, match="truncated"):
        SafetensorsFile(tmp_path / "head.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"hello")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        SafetensorsFile(tmp_path / "junk.safetensors")


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size(1234) == 1234 and parse_size("10") == 10
    with pytest.raises(CheckpointError, match="cannot read size"):
        parse_size("5 gigs")


def test_size_sharded_writer_splits_and_indexes(tmp_path):
    ts = {f"t{i}": torch.full((100,), float(i)) for i in range(5)}  # 400 bytes each
    w = SizeShardedWriter(tmp_path, "m", [(k, v.shape, v.dtype) for k, v in ts.items()], max_shard_size=900)
    for k, v in ts.items():
        w.write(k, v)
    w.close()
    index = json.loads((tmp_path / "m.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"m-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert index["metadata"]["total_size"] == 2000
    for k, f in index["weight_map"].items():
        assert torch.equal(load_file(tmp_path / f)[k], ts[k])


def test_sharded_writer_reader_regroups_tp(tmp_path):
    """A tensor split 3 ways is read back whole and as 1- and 2-way... slices at any boundary."""
    g = torch.Generator().manual_seed(0)
    ts = {"col": torch.randn(12, 4, generator=g), "row": torch.randn(5, 12, generator=g),
          "rep": torch.randn(7, generator=g)}
    placements = [Placement("col", (12, 4), torch.float32, 0, (0,)), Placement("row", (5, 12), torch.float32, 1, (1,)),
                  Placement("rep", (7,), torch.float32, None, (0, 1))]
    w = ShardedWriter(tmp_path, placements, tp=3, pp=2, header={"role": "critic"})
    for k in ("rep", "row", "col"):
        w.write(k, ts[k])
    m = w.close()
    assert m["role"] == "critic" and m["layout"] == {"tp": 3, "pp": 2}
    assert [s["file"] for s in m["tensors"]["rep"]["shards"]] == ["model-tp00-pp00.safetensors",
                                                                   "model-tp00-pp01.safetensors"]
    src = ShardedSource(tmp_path)
    for k, t in ts.items():
        assert torch.equal(src.read(k), t)
    assert torch.equal(src.read("col", 0, 2, 9), ts["col"][2:9])  # spans three parts
    assert torch.equal(src.read("row", 1, 3, 5), ts["row"][:, 3:5])
    assert torch.equal(src.read("row", 0, 1, 3), ts["row"][1:3])  # across the split dim
    src.close()


def test_sharded_reader_detects_missing_part(tmp_path):
    w = ShardedWriter(tmp_path, [Placement("w", (4, 2), torch.float32, 0, (0,))], tp=2, pp=1)
    w.write("w", torch.randn(4, 2))
    w.close()
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["tensors"]["w"]["shards"] = m["tensors"]["w"]["shards"][:1]
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="cover 2 of 4"):
        ShardedSource(tmp_path)


def test_atomic_folder(tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_folder(dst) as tmp:
            (tmp / "f").write_text("partial")
            raise RuntimeError("boom")
    assert not dst.exists() and leftovers(tmp_path) == []
    with atomic_folder(dst) as tmp:
        (tmp / "f").write_text("v1")
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_folder(dst):
            pass
    with pytest.raises(RuntimeError):  # a failed overwrite keeps the old folder
        with atomic_folder(dst, overwrite=True) as tmp:
            raise RuntimeError("boom")
    assert (dst / "f").read_text() == "v1"
    with atomic_folder(dst, overwrite=True) as tmp:
        (tmp / "g").write_text("v2")
    assert sorted(os.listdir(dst)) == ["g"] and leftovers(tmp_path) == []


def test_torch_file_source_remaps_and_reads_slices(tmp_path, monkeypatch):
    from megadistill.checkpoint import TorchFileSource
    ts = {k: v for k, v in _tensors().items() if v.dim()}
    torch.save(ts, tmp_path / "w.pth")
    src = TorchFileSource(tmp_path / "w.pth")
    assert src.mapped and src.keys() == list(ts)
    loads = []
    real = src._load
    monkeypatch.setattr(src, "_load", lambda: loads.append(1) or real())
    monkeypatch.setattr(src, "remap_bytes", 1)  # re-map before every read after the first
    for k, v in ts.items():
        assert torch.equal(src.read(k), v) and src.dtype(k) == v.dtype
    assert torch.equal(src.read("b", 1, 1, 4), ts["b"][:, 1:4])
    assert len(loads) == len(ts)
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="expected a flat"):
        TorchFileSource(tmp_path / "list.pth")

"""WebDataset latent shards: round trip, rank sharding, exact resume, corrupt data skipped."""
import io
import logging
import tarfile

import numpy as np
import pytest
import torch

from megadistill.data.latents import LatentShardStream, resolve_shards, write_latent_shards

SHAPE = (16, 2, 4, 4)
DIM = 8


def make_samples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 1 + (i * 7) % 5  # different text lengths, so padding is exercised
        out.append({"latents": torch.randn(SHAPE, generator=g), "text_states": torch.randn(length, DIM, generator=g),
                    "prompt": f"prompt number {i} \u00e9"})
    return out


def by_prompt(samples):
    return {s["prompt"]: s for s in samples}


def drain(stream, n_batches):
    return [next(stream) for _ in range(n_batches)]


def prompts_of(batches):
    return [p for b in batches for p in b["prompts"]]


def test_round_trip_padding_and_webdataset_compatibility(tmp_path):
    samples = make_samples(10)
    paths = write_latent_shards(iter(samples), tmp_path / "ds", samples_per_shard=4)
    assert [p.name for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == [p.name for p in paths]  # no temp files left
    stream = LatentShardStream(tmp_path / "ds", batch_size=5, seed=1)
    batches = drain(stream, 2)
    ref = by_prompt(samples)
    assert sorted(prompts_of(batches)) == sorted(ref)  # one epoch: every sample exactly once
    for b in batches:
        assert b["latents"].shape == (5, *SHAPE) and b["latents"].dtype == torch.float32
        assert b["text_states"].shape == (5, int(b["text_lens"].max()), DIM)
        for i, p in enumerate(b["prompts"]):
            n = int(b["text_lens"][i])
            assert torch.equal(b["latents"][i], ref[p]["latents"])
            assert torch.equal(b["text_states"][i, :n], ref[p]["text_states"])
            assert not b["text_states"][i, n:].any()
    assert stream.skipped == 0
    # an existing dataset is not silently mixed with a new one
    with pytest.raises(FileExistsError, match="already holds 3 shards"):
        write_latent_shards(iter(samples), tmp_path / "ds", samples_per_shard=4)

    bad = make_samples(6)
    bad[5]["latents"] = torch.zeros(16, 3, 4, 4)
    with pytest.raises(ValueError, match=r"sample 5: latents \[16, 3, 4, 4\]"):
        write_latent_shards(iter(bad), tmp_path / "bad", samples_per_shard=2)
    assert list((tmp_path / "bad").iterdir()) == []  # the two shards already written are removed

    import webdataset as wds  # the shards are plain WebDataset tars
    keys = [(s["__key__"], sorted(k for k in s if not k.startswith("__")))
            for s in wds.WebDataset(str(paths[0]), shardshuffle=False)]
    assert keys[0] == ("000000000", ["latents.safetensors", "prompt.txt", "text.safetensors"]) and len(keys) == 4


def test_npy_members_and_shard_patterns(tmp_path):
    (tmp_path / "ds").mkdir()
    lat = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    with tarfile.open(tmp_path / "ds" / "a.tar", "w") as tf:
        for name, arr in (("x.latents.npy", lat), ("x.text.npy", np.ones((3, DIM), np.float32))):
            buf = io.BytesIO()
            np.save(buf, arr)
            info = tarfile.TarInfo(name)
            info.size = len(buf.getvalue())
            tf.addfile(info, io.BytesIO(buf.getvalue()))
        info = tarfile.TarInfo("x.prompt.txt")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"hi"))
    batch = next(LatentShardStream(str(tmp_path / "ds" / "*.tar"), batch_size=2))
    assert batch["prompts"] == ["hi", "hi"] and torch.equal(batch["latents"][1], torch.from_numpy(lat))
    write_latent_shards(iter(make_samples(3)), tmp_path / "ds2", samples_per_shard=1)
    assert len(resolve_shards(str(tmp_path / "ds2" / "shard-{000000..000001}.tar"))) == 2
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        LatentShardStream(tmp_path, batch_size=1)


@pytest.mark.parametrize("n_shards,world", [(6, 3), (5, 2), (2, 3)])
def test_ranks_disjoint_and_cover_every_sample(tmp_path, n_shards, world):
    per_shard = 4
    samples = make_samples(n_shards * per_shard)
    write_latent_shards(iter(samples), tmp_path, samples_per_shard=per_shard)
    seen = []
    for rank in range(world):
        stream = LatentShardStream(tmp_path, batch_size=1, seed=5, rank=rank, world_size=world)
        epoch = []
        while stream.epoch == 0:
            epoch += next(stream)["prompts"]
        epoch.pop()  # the first sample of epoch 1
        seen.append(epoch)
    flat = [p for e in seen for p in e]
    assert len(flat) == len(set(flat)) == len(samples)  # disjoint across ranks, nothing lost
    if n_shards >= world:  # whole shards per rank: rank r reads shards i % world == r
        for rank, epoch in enumerate(seen):
            shards = {int(p.split()[2]) // per_shard for p in epoch}
            assert shards == {i for i in range(n_shards) if i % world == rank}


def test_order_is_deterministic_and_depends_on_seed(tmp_path):
    write_latent_shards(iter(make_samples(12)), tmp_path, samples_per_shard=3)
    a = prompts_of(drain(LatentShardStream(tmp_path, 4, seed=7, shuffle_buffer=5), 6))
    b = prompts_of(drain(LatentShardStream(tmp_path, 4, seed=7, shuffle_buffer=5), 6))
    c = prompts_of(drain(LatentShardStream(tmp_path, 4, seed=8, shuffle_buffer=5), 6))
    assert a == b and a != c
    assert sorted(a[:12]) == sorted(a[12:]) and a[:12] != a[12:]  # each epoch a new permutation


@pytest.mark.parametrize("shuffle_buffer,world,rank", [(0, 1, 0), (5, 1, 0), (3, 3, 2)])
def test_resume_gives_identical_next_batches(tmp_path, shuffle_buffer, world, rank):
    write_latent_shards(iter(make_samples(11)), tmp_path, samples_per_shard=3)
    kw = dict(batch_size=3, seed=2, rank=rank, world_size=world, shuffle_buffer=shuffle_buffer)
    reference = LatentShardStream(tmp_path, **kw)
    for k in range(7):  # resume after k batches, across window and epoch boundaries
        a = LatentShardStream(tmp_path, **kw)
        drain(a, k)
        state = a.state_dict()
        torch.save(state, tmp_path / "state.pt")  # the trainer's way: weights_only load must work
        b = LatentShardStream(tmp_path, **kw)
        b.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
        ahead_a, ahead_b = drain(a, 4), drain(b, 4)
        assert prompts_of(ahead_a) == prompts_of(ahead_b)
        assert all(torch.equal(x["latents"], y["latents"]) and torch.equal(x["text_states"], y["text_states"])
                   for x, y in zip(ahead_a, ahead_b))
        assert b.state_dict() == a.state_dict()
    assert prompts_of(drain(reference, 11)) == prompts_of(drain(LatentShardStream(tmp_path, **kw), 11))
    with pytest.raises(ValueError, match="seed=2 but this stream has 3"):
        LatentShardStream(tmp_path, **{**kw, "seed": 3}).load_state_dict(state)


def _rewrite_member(path, key_ext, data):
    members = []
    with tarfile.open(path) as tf:
        for m in tf:
            members.append((m.name, tf.extractfile(m).read()))
    with tarfile.open(path, "w") as tf:
        for name, payload in members:
            if name == key_ext:
                if data is None:
                    continue
                payload = data
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))


def test_corrupt_shard_and_samples_are_skipped_and_counted(tmp_path, caplog):
    samples = make_samples(12)
    paths = write_latent_shards(iter(samples), tmp_path, samples_per_shard=4)
    with tarfile.open(paths[1]) as tf:
        cut = tf.getmember("000000006.latents.safetensors").offset_data + 100
    paths[1].write_bytes(paths[1].read_bytes()[:cut])  # truncated inside sample 6: samples 4, 5 survive
    _rewrite_member(paths[2], "000000009.latents.safetensors", b"\x00garbage")  # undecodable
    _rewrite_member(paths[2], "000000010.prompt.txt", None)  # incomplete
    nan = samples[11]["latents"].clone()
    nan[0, 0, 0, 0] = float("nan")
    from safetensors.torch import save
    _rewrite_member(paths[2], "000000011.latents.safetensors", save({"latents": nan}))
    (tmp_path / "shard-000003.tar").write_bytes(b"not a tar at all" * 10)

    stream = LatentShardStream(tmp_path, batch_size=1, seed=0)
    with caplog.at_level(logging.WARNING, logger="megadistill.data.latents"):
        got = []
        while stream.epoch == 0:
            got += next(stream)["prompts"]
    got.pop()
    good = [f"prompt number {i} \u00e9" for i in (0, 1, 2, 3, 4, 5, 8)]
    assert sorted(got) == sorted(good)
    assert (stream.skipped_shards, stream.skipped_samples, stream.skipped) == (2, 3, 5)
    text = caplog.text
    assert "shard-000001.tar (after 2 samples)" in text and "shard-000003.tar" in text
    assert "NaN" in text and "lacks prompt.txt" in text and "cannot be decoded" in text
    # resuming inside the damaged epoch keeps the counters exact
    a = LatentShardStream(tmp_path, batch_size=1, seed=0)
    drain(a, 3)
    b = LatentShardStream(tmp_path, batch_size=1, seed=0)
    b.load_state_dict(a.state_dict())
    assert prompts_of(drain(a, 6)) == prompts_of(drain(b, 6)) and a.skipped == b.skipped


def test_unreadable_dataset_raises_instead_of_spinning(tmp_path):
    (tmp_path / "shard-000000.tar").write_bytes(b"junk" * 200)
    with pytest.raises(RuntimeError, match="no readable sample in a whole epoch"):
        next(LatentShardStream(tmp_path, batch_size=1))

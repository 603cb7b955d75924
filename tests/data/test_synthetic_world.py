"""The synthetic video-latent world: captions, determinism, ground truth and the sharded stream."""
import pytest
import torch

from megadistill.data.synthetic import (CAPTIONS, DIRECTION_VECTORS, DIRECTIONS, PALETTE,
                                        SyntheticLatentStream, SyntheticVideoWorld, format_caption,
                                        parse_caption, sample_caption, sample_captions)


@pytest.fixture(scope="module")
def world():
    return SyntheticVideoWorld(seed=0)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------- captions


def test_captions_enumerate_the_grammar_and_round_trip():
    n_single = len(PALETTE) * len(DIRECTIONS)
    assert len(CAPTIONS) == len(set(CAPTIONS)) == n_single + n_single * (n_single - len(DIRECTIONS))
    for text in CAPTIONS:
        blobs = parse_caption(text)
        assert 1 <= len(blobs) <= 2
        assert format_caption(blobs) == text
    assert parse_caption("a blue blob moving up and a yellow blob moving right") == [
        ("blue", "up"), ("yellow", "right")]


@pytest.mark.parametrize("bad, why", [
    ("a pink blob moving left", "unknown colour"),
    ("a red blob moving sideways", "unknown direction"),
    ("a red blob moving left and a red blob moving up", "one colour twice"),
    ("a red blob moving left and a blue blob moving up and a green blob moving down", "at most 2"),
    ("red blob left", "grammar"),
    ("A red blob moving left", "grammar"),
    ("", "grammar"),
])
def test_parse_caption_rejects_text_outside_the_grammar(bad, why):
    with pytest.raises(ValueError, match=why):
        parse_caption(bad)


def test_sampled_captions_are_in_the_grammar_and_deterministic():
    texts = sample_captions(400, gen(3))
    assert texts == sample_captions(400, gen(3))
    assert set(texts) <= set(CAPTIONS)
    counts = [len(parse_caption(t)) for t in texts]
    assert 150 < counts.count(1) < 250  # one or two blobs with probability 1/2 each
    assert sample_caption(gen(5)) in CAPTIONS


# ------------------------------------------------------------------------------------- world


def test_world_is_deterministic(world):
    a = world.sample(16, gen(1))
    b = SyntheticVideoWorld(seed=0).sample(16, gen(1))
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    for key in a[2]:
        assert torch.equal(a[2][key].nan_to_num(-7), b[2][key].nan_to_num(-7)), key
    c = world.sample(16, gen(2))
    assert not torch.equal(a[0], c[0])
    other = SyntheticVideoWorld(seed=1)
    assert not torch.allclose(other.signatures, world.signatures)


def test_palette_and_background_directions_are_orthonormal(world):
    basis = torch.cat([world.signatures, world.background_basis]).double()
    assert basis.shape == (16, 16)
    torch.testing.assert_close(basis @ basis.T, torch.eye(16, dtype=torch.float64), atol=1e-6, rtol=0)


def test_latents_have_unit_scale_and_consistent_meta(world):
    x, captions, meta = world.sample(256, gen(11))
    assert x.shape == (256, 16, 8, 8, 8) and x.dtype == torch.float32
    assert abs(float(x.std()) - 1) < 0.05 and abs(float(x.mean())) < 0.05
    steps = torch.arange(8, dtype=torch.float32)
    for i, text in enumerate(captions):
        blobs = parse_caption(text)
        assert int(meta["num_blobs"][i]) == len(blobs)
        for b, (colour, direction) in enumerate(blobs):
            assert PALETTE[int(meta["colours"][i, b])] == colour
            assert DIRECTIONS[int(meta["directions"][i, b])] == direction
            pos, vel = meta["positions"][i, b], meta["velocities"][i, b]
            # Straight line at constant velocity, along the captioned direction.
            torch.testing.assert_close(pos, pos[0] + steps[:, None] * vel, atol=1e-5, rtol=0)
            unit = torch.tensor(DIRECTION_VECTORS[direction], dtype=torch.float32)
            speed = float(vel @ unit)
            usable = 8 - 1 - 2 * world.margin
            lo_speed, hi_speed = (u * usable / 7 for u in world.travel_range)
            assert lo_speed - 1e-5 <= speed <= hi_speed + 1e-5 and torch.allclose(vel, speed * unit)
            # Centres stay `margin` inside the frame for the whole clip.
            assert float(pos.min()) >= world.margin - 1e-5 and float(pos.max()) <= 7 - world.margin + 1e-5
            lo, hi = world.amplitude_range
            assert lo * world.scale - 1e-4 <= float(meta["amplitudes"][i, b]) <= hi * world.scale + 1e-4
        for b in range(len(blobs), 2):
            assert int(meta["colours"][i, b]) == -1 and bool(meta["positions"][i, b].isnan().all())
            assert float(meta["amplitudes"][i, b]) == 0


def test_colour_heat_map_peaks_at_the_true_position(world):
    """Projecting on a colour's signature shows that colour's blob, where meta says it is."""
    x, _, meta = world.sample(64, gen(12))
    for i in range(64):
        for b in range(int(meta["num_blobs"][i])):
            heat = torch.einsum("cfhw,c->fhw", x[i], world.signatures[meta["colours"][i, b]])
            for f in range(8):
                row, col = divmod(int(heat[f].argmax()), 8)
                px, py = meta["positions"][i, b, f].tolist()
                # Nearest pixel, up to near-ties that the small noise can flip.
                assert abs(col - px) <= 0.75 and abs(row - py) <= 0.75
                peak = float(heat[f].max())
                assert peak > 0.8 * float(meta["amplitudes"][i, b])


def test_sample_for_captions_shows_the_given_captions(world):
    captions = ["a white blob moving down", "a red blob moving left and a green blob moving up"]
    _, meta = world.sample_for_captions(captions, gen(4))
    assert meta["colours"].tolist() == [[PALETTE.index("white"), -1],
                                        [PALETTE.index("red"), PALETTE.index("green")]]
    assert float(meta["velocities"][0, 0, 1]) > 0 and float(meta["velocities"][1, 0, 0]) < 0
    with pytest.raises(ValueError, match="unknown colour"):
        world.sample_for_captions(["a pink blob moving up"], gen(4))


def test_world_rejects_bad_settings():
    with pytest.raises(ValueError, match="palette size"):
        SyntheticVideoWorld(channels=4)
    with pytest.raises(ValueError, match="frames"):
        SyntheticVideoWorld(frames=1)
    with pytest.raises(ValueError, match="margin"):
        SyntheticVideoWorld(height=3, width=3, margin=1.0)
    with pytest.raises(ValueError, match="travel_range"):
        SyntheticVideoWorld(travel_range=(0.5, 1.5))


def test_world_config_rebuilds_the_same_world(world):
    twin = SyntheticVideoWorld(**world.config())
    assert twin.scale == world.scale and torch.equal(twin.signatures, world.signatures)


# ------------------------------------------------------------------------------------ stream


def test_stream_shards_are_disjoint_and_partition_the_single_rank_stream(world):
    single = SyntheticLatentStream(world, batch_size=4, seed=9)
    ranks = [SyntheticLatentStream(world, batch_size=4, seed=9, rank=r, world_size=2) for r in range(2)]
    seen = {0: [], 1: []}
    for i in range(3):
        for r, stream in enumerate(ranks):
            batch = next(stream)
            assert batch["latents"].shape == (4, 16, 8, 8, 8) and len(batch["prompts"]) == 4
            seen[r].append(batch["latents"])
            # Rank r's batch i is batch i * world_size + r of the one-rank stream.
            assert torch.equal(batch["latents"], single.batch_at(2 * i + r)["latents"])
    a, b = torch.cat(seen[0]).flatten(1), torch.cat(seen[1]).flatten(1)
    assert float(torch.cdist(a, b).min()) > 1.0  # no clip of rank 0 appears on rank 1


def test_stream_resumes_exactly_from_its_state(world):
    stream = SyntheticLatentStream(world, batch_size=3, seed=5, rank=1, world_size=2)
    for _ in range(3):
        next(stream)
    state = stream.state_dict()
    expected = next(stream)
    resumed = SyntheticLatentStream(world, batch_size=3, seed=5, rank=1, world_size=2)
    assert not torch.equal(next(iter(resumed))["latents"], expected["latents"])
    resumed.load_state_dict(state)
    got = next(resumed)
    assert torch.equal(got["latents"], expected["latents"]) and got["prompts"] == expected["prompts"]
    assert resumed.state_dict() == stream.state_dict()


def test_stream_rejects_foreign_state(world):
    stream = SyntheticLatentStream(world, batch_size=3, seed=5)
    state = stream.state_dict()
    other = SyntheticLatentStream(world, batch_size=3, seed=6)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)
    with pytest.raises(KeyError, match="batch_size"):
        stream.load_state_dict({k: v for k, v in state.items() if k != "batch_size"})
    with pytest.raises(ValueError, match="rank"):
        SyntheticLatentStream(world, batch_size=3, seed=5, rank=2, world_size=2)


def test_run_config_world_settings_reach_the_stream_world(tmp_path):
    """``data.world`` in a run config sets the world the trainer and the evaluation sample from,
    and every settable key is a constructor argument of the world."""
    import inspect

    from megadistill.config import load_config
    from megadistill.config.schema import SYNTHETIC_WORLD_KEYS
    from megadistill.models.registry import get_family

    assert set(SYNTHETIC_WORLD_KEYS) <= set(inspect.signature(SyntheticVideoWorld).parameters)
    path = tmp_path / "run.yaml"
    path.write_text("recipe: {method: finetune}\nmodels: {student: {preset: tiny}}\n"
                    "pipeline_config: {latent_shape: [16, 6, 8, 8]}\n"
                    "data: {kind: synthetic, world: {travel_range: [0.6, 0.7], margin: 1.0, background_std: 0.5}}\n")
    cfg = load_config(str(path))
    world = get_family("wan").build_synthetic_stream(cfg, rank=0, world_size=1).world
    assert (world.travel_range, world.margin, world.background_std) == ((0.6, 0.7), 1.0, 0.5)
    assert world.latent_shape == (16, 6, 8, 8)
    _, _, meta = world.sample(64, torch.Generator().manual_seed(0))
    speed = meta["velocities"].norm(dim=-1)
    speed = speed[~speed.isnan()]
    # travel 0.6-0.7 of the usable 5 px (8 - 1 - 2 * 1.0) over 5 frame steps
    assert float(speed.min()) >= 0.6 - 1e-5 and float(speed.max()) <= 0.7 + 1e-5


def test_training_seed_draws_other_clips_of_the_same_world(tmp_path):
    """The world is the dataset: ``training.seed`` changes which clips a run draws, not the world
    (signatures, motion rules); ``data.world.seed`` selects another world."""
    from megadistill.config import load_config
    from megadistill.models.registry import get_family

    path = tmp_path / "run.yaml"
    path.write_text("recipe: {method: finetune}\nmodels: {student: {preset: tiny}}\n"
                    "pipeline_config: {latent_shape: [16, 6, 8, 8]}\ndata: {kind: synthetic}\n")

    def stream(*overrides):
        return get_family("wan").build_synthetic_stream(load_config(str(path), list(overrides)), rank=0,
                                                        world_size=1)

    base, reseeded, other = stream(), stream("training.seed=1"), stream("data.world.seed=1")
    assert base.world.config() == reseeded.world.config() and base.world.config()["seed"] == 0
    assert torch.equal(base.world.signatures, reseeded.world.signatures)
    assert not torch.equal(base.world.signatures, other.world.signatures)
    assert not torch.equal(next(base)["latents"], next(reseeded)["latents"])

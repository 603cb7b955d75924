"""Metrics on synthetic-world latents: tracking, adherence, temporal error and Frechet distance.

Sizes: sets of 512 clips. The FD noise floor (two independent real sets, 76 features) is about
5 at 512 clips and about 10.5 at 256 (it falls like ~1/N); a 15 degree tilt of the colours
already gives ~55, pure noise ~1e5.
"""
import math

import pytest
import torch

from megadistill.data.synthetic import SyntheticVideoWorld, parse_caption
from megadistill.eval import (LatentFeatureExtractor, decode_blobs, evaluate, feature_extractor,
                              frechet_distance, frechet_distance_inf, noise_floor_fd, prompt_adherence,
                              temporal_error)

N = 512


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def world():
    return SyntheticVideoWorld(seed=0)


@pytest.fixture(scope="module")
def real(world):
    """Two independent real sets with their captions, meta and features."""
    sets = []
    for seed in (101, 102):
        latents, captions, meta = world.sample(N, gen(seed))
        sets.append(dict(latents=latents, captions=captions, meta=meta,
                         feats=feature_extractor(world)(latents)))
    return sets


@pytest.fixture(scope="module")
def floor(real):
    return frechet_distance(real[0]["feats"], real[1]["feats"])


def tilt_colours(world, latents, degrees):
    """Rotate each palette signature towards a background direction: off-palette colours."""
    rot = torch.eye(world.channels, dtype=torch.float64)
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    for a, b in zip(world.signatures.double(), world.background_basis.double()):
        rot += (c - 1) * (torch.outer(a, a) + torch.outer(b, b)) + s * (torch.outer(b, a) - torch.outer(a, b))
    return torch.einsum("dc,ncfhw->ndfhw", rot, latents.double()).float()


# --------------------------------------------------------------------------------- tracking


def test_tracking_recovers_true_positions_and_velocities(world, real):
    tracks = feature_extractor(world).track(real[0]["latents"])
    meta = real[0]["meta"]
    for b in range(2):
        rows = (meta["colours"][:, b] >= 0).nonzero()[:, 0]
        colour = meta["colours"][rows, b]
        pos_err = (tracks.centre[rows, colour] - meta["positions"][rows, b].double()).norm(dim=-1)
        vel_err = (tracks.velocity[rows, colour] - meta["velocities"][rows, b].double()).norm(dim=-1)
        assert float(pos_err.mean()) < 0.04 and float(pos_err.max()) < 0.2
        assert float(vel_err.max()) < 0.05
    decoded = decode_blobs(tracks, world.palette)
    assert all(set(d) == set(parse_caption(c)) for d, c in zip(decoded, real[0]["captions"]))


# ------------------------------------------------------------------------ adherence, motion


def test_real_clips_adhere_and_move_in_straight_lines(world, real):
    assert prompt_adherence(real[0]["latents"], real[0]["captions"], world) >= 0.95
    assert temporal_error(real[0]["latents"], world) < 0.05


def test_noise_scores_at_most_chance_and_wanders(world, real, floor):
    noise = torch.randn(real[0]["latents"].shape, generator=gen(7))
    # Guessing one caption of the grammar at random would score ~1/24 on one-blob captions.
    assert prompt_adherence(noise, real[0]["captions"], world) < 0.05
    assert temporal_error(noise, world) > 1.0
    assert frechet_distance(real[0]["feats"], feature_extractor(world)(noise)) > 100 * floor


def test_shuffled_captions_lose_adherence(world, real):
    perm = torch.randperm(N, generator=gen(8)).tolist()
    shuffled = [real[0]["captions"][i] for i in perm]
    assert prompt_adherence(real[0]["latents"], shuffled, world) < 0.1


def test_reversed_time_keeps_temporal_error_and_flips_directions(world, real):
    x = real[0]["latents"]
    reversed_x = x.flip(2)
    assert temporal_error(reversed_x, world) == pytest.approx(temporal_error(x, world), rel=1e-6)
    assert prompt_adherence(reversed_x, real[0]["captions"], world) < 0.02
    flipped = {"left": "right", "right": "left", "up": "down", "down": "up"}
    opposite = [" and ".join(f"a {c} blob moving {flipped[d]}" for c, d in parse_caption(t))
                for t in real[0]["captions"]]
    assert prompt_adherence(reversed_x, opposite, world) >= 0.95


def test_swapped_colours_keep_fd_but_lose_adherence(world, real, floor):
    """FD is caption-free: a permutation of the palette keeps the distribution of clips."""
    sig = world.signatures.double()
    swap = torch.eye(world.channels, dtype=torch.float64) - sig.T @ sig + sig.roll(1, dims=0).T @ sig
    x = torch.einsum("dc,ncfhw->ndfhw", swap, real[0]["latents"].double()).float()
    assert prompt_adherence(x, real[0]["captions"], world) < 0.02
    assert frechet_distance(real[1]["feats"], feature_extractor(world)(x)) < 2 * floor


# ------------------------------------------------------------------------------------- FD


def test_fd_noise_floor_is_far_below_wrong_colours(world, real, floor):
    assert 1.0 < floor < 10.0  # documented: ~5 at 512 clips
    # 65 degrees: each blob keeps cos(65) = 0.42 of its amplitude on its palette colour, so about
    # half fall under the presence threshold.
    tilted = tilt_colours(world, real[0]["latents"], 65)
    fd_tilted = frechet_distance(real[1]["feats"], feature_extractor(world)(tilted))
    assert fd_tilted > 10 * floor
    assert prompt_adherence(tilted, real[0]["captions"], world) < 0.8
    other_world = SyntheticVideoWorld(seed=1).sample(N, gen(5))[0]
    assert frechet_distance(real[1]["feats"], feature_extractor(world)(other_world)) > 20 * floor


def test_noise_floor_fd_is_deterministic_and_falls_with_size(world):
    small = noise_floor_fd(world, 256, seed=0)
    assert small == noise_floor_fd(world, 256, seed=0)
    assert 4.0 < small < 20.0  # documented: ~10.5 at 256 clips
    assert noise_floor_fd(world, 512, seed=0) < small


def test_fd_is_symmetric_zero_on_itself_and_exact_on_an_affine_map(real):
    a, b = real[0]["feats"], real[1]["feats"]
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    assert frechet_distance(a, a) < 1e-8 * float(torch.cov(a.T).trace())
    # b' = 2 a + 1: mu' = 2 mu + 1, S' = 4 S, so FD = |mu + 1|^2 + tr S + 4 tr S - 2 * 2 tr S.
    expected = float((a.mean(0) + 1).pow(2).sum() + torch.cov(a.T).trace())
    assert frechet_distance(a, 2 * a + 1) == pytest.approx(expected, rel=1e-9)


def test_fd_matches_scipy_sqrtm_when_scipy_is_installed(real):
    linalg = pytest.importorskip("scipy.linalg")
    a, b = real[0]["feats"].numpy(), real[1]["feats"].numpy()
    ca, cb = torch.cov(torch.from_numpy(a).T).numpy(), torch.cov(torch.from_numpy(b).T).numpy()
    cross = linalg.sqrtm(ca @ cb).real.trace()
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + ca.trace() + cb.trace() - 2 * cross
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)


def test_fd_inf_removes_the_finite_sample_bias_of_two_real_sets(real, floor):
    a, b = real[0]["feats"], real[1]["feats"]
    value = frechet_distance_inf(a, b)
    assert value == frechet_distance_inf(a, b)  # deterministic for a seed
    # Raw FD of two real sets of 512 clips is the noise floor (~4-5); extrapolated, ~0 either sign.
    assert abs(value) < 0.25 * floor


def test_fd_inf_recovers_a_known_distance_where_the_raw_fd_is_biased():
    # a ~ N(0, I), b ~ N(mu, diag(s^2)) in 24 dims: FD = |mu|^2 + sum (1 - s)^2 exactly.
    d, n = 24, 400
    g = gen(3)
    mu = torch.full((d,), 0.3, dtype=torch.float64)
    s = torch.linspace(0.8, 1.2, d, dtype=torch.float64)
    truth = float(mu.pow(2).sum() + (1 - s).pow(2).sum())                   # 2.16 + 0.35
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = mu + s * torch.randn(n, d, generator=g, dtype=torch.float64)
    raw = frechet_distance(a, b)
    assert raw > truth + 0.6                                                   # ~ +0.9 at n = 400
    assert frechet_distance_inf(a, b) == pytest.approx(truth, abs=0.4)
    assert frechet_distance_inf(a, b, seed=1) == pytest.approx(truth, abs=0.4)


def test_fd_inf_rejects_sets_too_small_to_extrapolate():
    x = torch.randn(40, 24, generator=gen(0), dtype=torch.float64)
    with pytest.raises(ValueError, match="subsets larger"):
        frechet_distance_inf(x, x)  # halves of 20 rows are narrower than 24 features
    with pytest.raises(ValueError, match="out of range"):
        frechet_distance_inf(x, x, points=1)


def test_quality_report_extrapolates_fd_of_each_set(world):
    from megadistill.eval.quality import fd_inf_min_samples, quality_report

    n = fd_inf_min_samples(world)
    assert n == 2 * len(feature_extractor(world).feature_names) + 2
    report, _ = quality_report([], None, world, n, seed=0, fd_inf=True)
    assert set(report["fd_inf"]) == {"real"}
    # real clips of the captions against the reference: raw FD at the floor, extrapolated near 0
    assert abs(report["fd_inf"]["real"]) < 0.5 * report["real"]["fd"]
    with pytest.raises(ValueError, match=f"at least {n} clips"):
        quality_report([], None, world, n - 1, seed=0, fd_inf=True)


def test_fd_rejects_bad_input():
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(torch.zeros(1, 3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="widths differ"):
        frechet_distance(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="nan"):
        frechet_distance(torch.full((4, 3), float("nan")), torch.zeros(4, 3))


# ------------------------------------------------------------------------- features, evaluate


def test_features_are_deterministic_and_standardised(world, real):
    fresh = LatentFeatureExtractor(world, calibration_samples=256)
    cached = feature_extractor(world)
    x = real[0]["latents"][:64]
    assert torch.equal(fresh.projection, cached.projection)
    torch.testing.assert_close(fresh.raw_features(x), cached.raw_features(x), rtol=0, atol=0)
    feats = real[0]["feats"]
    assert feats.shape == (N, len(cached.feature_names))
    assert float(feats.mean(0).abs().max()) < 0.5 and 0.7 < float(feats.std(0).median()) < 1.3


def test_evaluate_scores_real_clips_for_their_captions(world, real, floor):
    captions = real[1]["captions"]
    generated, _ = world.sample_for_captions(captions, gen(9))
    scores = evaluate(generated, captions, real[0]["latents"], world)
    assert set(scores) == {"fd", "adherence", "temporal_error"}
    assert scores["adherence"] >= 0.95 and scores["temporal_error"] < 0.05
    assert scores["fd"] < 2 * floor


def test_metrics_reject_mismatched_input(world, real):
    x = real[0]["latents"][:4]
    with pytest.raises(ValueError, match="captions"):
        prompt_adherence(x, real[0]["captions"][:3], world)
    with pytest.raises(ValueError, match="clip shape"):
        temporal_error(torch.zeros(2, 16, 4, 8, 8), world)
    with pytest.raises(ValueError, match="nan"):
        temporal_error(torch.full((2, 16, 8, 8, 8), float("nan")), world)

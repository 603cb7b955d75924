"""Quality metrics for generated synthetic-world latents (no model needed).

- ``frechet_distance``: Frechet distance between Gaussians fitted to two feature sets,
  ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^{1/2} S_b S_a^{1/2})^{1/2})``. The last
  trace equals ``tr((S_a S_b)^{1/2})`` but is taken from symmetric PSD matrices through
  eigendecompositions in float64 (tiny negative eigenvalues clamped to 0), which is exact and
  stays real where a general matrix square root of ``S_a S_b`` can return complex round-off.
- ``frechet_distance_inf``: the same distance extrapolated to infinitely many samples ("FD_inf",
  Chong & Forsyth, CVPR 2020). Estimated from N samples, FD is biased upwards by about ``k / N``
  with a ``k`` that depends on both distributions (two real sets of 256 clips score ~8.5 here,
  of 2048 ~1): FDs of sets of different quality do not compare at a fixed N. FD_inf fits
  ``FD(n) = FD_inf + k / n`` over random subsets and reports the intercept.
- ``prompt_adherence``: fraction of clips whose decoded blobs (colours present and their
  directions) equal the caption's, as sets.
- ``temporal_error``: mean distance (latent px) of detected blob centres from their straight
  constant-velocity line fit.

Features and tracking are in ``features.py``. Metrics need the world the latents come from: its
palette signatures define what a colour is.
"""
from __future__ import annotations

from typing import Dict, Sequence, Union

import numpy as np
import torch

from megadistill.data.synthetic import SyntheticVideoWorld, mix_seed, parse_caption
from megadistill.eval.features import BlobTracks, decode_blobs, feature_extractor

Array = Union[torch.Tensor, np.ndarray]


def _as_feature_matrix(feats: Array, name: str) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(feats) if not isinstance(feats, torch.Tensor) else feats)
    x = x.detach().cpu().double()
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"{name} must be a [N, D] feature matrix with N >= 2, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains nan or inf")
    return x


def _sym_sqrt(mat: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric PSD matrix (symmetrised, eigenvalues clamped at 0)."""
    w, v = torch.linalg.eigh((mat + mat.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(feats_a: Array, feats_b: Array) -> float:
    """Frechet distance between Gaussian fits (mean, unbiased covariance) of ``[N, D]`` features."""
    a = _as_feature_matrix(feats_a, "feats_a")
    b = _as_feature_matrix(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: {a.shape[1]} vs {b.shape[1]}")
    mu_a, mu_b = a.mean(dim=0), b.mean(dim=0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    root_a = _sym_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    fd = (mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross
    return float(fd.clamp(min=0))


def frechet_distance_inf(feats_a: Array, feats_b: Array, points: int = 8, draws: int = 8,
                         smallest: float = 0.5, seed: int = 0) -> float:
    """FD of ``[N, D]`` features extrapolated to N -> infinity (the bias of a finite N removed).

    For ``points`` subset sizes ``n`` spaced evenly in ``1/n`` from ``1/N`` to ``1/(smallest N)``
    (``N`` the smaller set's size) it averages the FD of ``draws`` pairs of random subsets of size
    ``n`` (without replacement; one pair at ``n = N`` when both sets have N rows), fits
    ``FD(n) = FD_inf + k / n`` by least squares and returns ``FD_inf``. Deterministic for a
    ``seed``. Two sets drawn from one distribution score ~0 (either sign, within the estimate's
    noise); the smallest subset must exceed the feature width, where the ``1/n`` law starts to hold.
    """
    a = _as_feature_matrix(feats_a, "feats_a")
    b = _as_feature_matrix(feats_b, "feats_b")
    if points < 2 or draws < 1 or not 0 < smallest < 1:
        raise ValueError(f"points={points} (>= 2), draws={draws} (>= 1), smallest={smallest} (in (0, 1)) "
                         "are out of range")
    n_full = min(a.shape[0], b.shape[0])
    n_min = int(round(smallest * n_full))
    if n_min <= a.shape[1]:
        raise ValueError(f"FD_inf of {a.shape[1]} features needs subsets larger than that: {n_full} samples "
                         f"give subsets of {n_min}; use at least {2 * a.shape[1] + 2} samples (or a larger "
                         "smallest)")
    g = torch.Generator().manual_seed(mix_seed("fd-inf", seed))
    inv_sizes, fds = [], []
    for inv in torch.linspace(1.0 / n_full, 1.0 / n_min, points, dtype=torch.float64).tolist():
        n = int(round(1.0 / inv))
        whole = n == a.shape[0] == b.shape[0]
        values = []
        for _ in range(1 if whole else draws):
            ia = torch.randperm(a.shape[0], generator=g)[:n]
            ib = torch.randperm(b.shape[0], generator=g)[:n]
            values.append(frechet_distance(a[ia], b[ib]))
        inv_sizes.append(1.0 / n)
        fds.append(sum(values) / len(values))
    x = torch.tensor(inv_sizes, dtype=torch.float64)
    y = torch.tensor(fds, dtype=torch.float64)
    slope = ((x - x.mean()) * (y - y.mean())).sum() / (x - x.mean()).pow(2).sum()
    return float(y.mean() - slope * x.mean())


def prompt_adherence(latents: torch.Tensor, captions: Sequence[str], world: SyntheticVideoWorld) -> float:
    """Fraction in [0, 1] of clips whose detected ``{(colour, direction)}`` equals the caption's.

    A clip with an extra colour, a missing colour or a wrong direction counts as a miss. Pure
    noise scores ~0 (below the chance level of guessing among the captions): it rarely shows a
    blob strong enough to count as present.
    """
    _check_captions(latents, captions)
    return _adherence(feature_extractor(world).track(latents), captions, world)


def temporal_error(latents: torch.Tensor, world: SyntheticVideoWorld) -> float:
    """Mean distance (latent px) of detected blob centres from their straight-line fit.

    Tracks: every present colour of a clip, and its strongest colour when none is present (so a
    clip without a clear blob still counts, with the wandering centre of its best guess).
    """
    return _temporal_error(feature_extractor(world).track(latents))


def evaluate(generated: torch.Tensor, captions: Sequence[str], real_reference: torch.Tensor,
             world: SyntheticVideoWorld) -> Dict[str, float]:
    """``{"fd", "adherence", "temporal_error"}`` of generated clips against real ones.

    FD has a noise floor that falls like ~1/N (see ``noise_floor_fd``); compare FDs only at
    equal sizes of both sets.
    """
    _check_captions(generated, captions)
    extractor = feature_extractor(world)
    tracks = extractor.track(generated)
    return {
        "fd": frechet_distance(extractor(generated, tracks), extractor(real_reference)),
        "adherence": _adherence(tracks, captions, world),
        "temporal_error": _temporal_error(tracks),
    }


def noise_floor_fd(world: SyntheticVideoWorld, n: int, seed: int = 0) -> float:
    """FD between two independent real sets of ``n`` clips: the smallest FD to expect at size ``n``."""
    if n < 2:
        raise ValueError(f"n={n} must be >= 2")
    extractor = feature_extractor(world)
    a = world.sample(n, torch.Generator().manual_seed(mix_seed("noise-floor-a", seed)))[0]
    b = world.sample(n, torch.Generator().manual_seed(mix_seed("noise-floor-b", seed)))[0]
    return frechet_distance(extractor(a), extractor(b))


def _check_captions(latents: torch.Tensor, captions: Sequence[str]) -> None:
    if isinstance(captions, str) or len(captions) != latents.shape[0]:
        raise ValueError(f"{latents.shape[0]} clips need {latents.shape[0]} captions (a list of str), "
                         f"got {captions!r:.80}")


def _adherence(tracks: BlobTracks, captions: Sequence[str], world: SyntheticVideoWorld) -> float:
    wanted = [set(parse_caption(c)) for c in captions]
    got = decode_blobs(tracks, world.palette)
    return sum(set(g) == w for g, w in zip(got, wanted)) / len(wanted)


def _temporal_error(tracks: BlobTracks) -> float:
    strongest = torch.nn.functional.one_hot(tracks.strength.argmax(dim=1), tracks.present.shape[1]).bool()
    return float(tracks.residual[tracks.present | strongest].mean())

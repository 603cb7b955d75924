"""Fixed, deterministic features of synthetic-world latents (``megadistill.data.synthetic``).

Blob tracking, per clip ``x [C, F, H, W]`` and palette colour ``k``:

1. heat map ``h_k[f] = <x[:, f], s_k>`` (projection on the colour's unit signature);
2. per frame, least-squares fit of one isotropic Gaussian of the world's width ``sigma``,
   ``h_k[f](i, j) ~= a * exp(-|(j, i) - c|^2 / (2 sigma^2))``: a grid search over half-pixel
   centres (the best centre maximises ``relu(<h, g_c>)^2 / |g_c|^2``, the profiled least-squares
   gain) followed by damped Gauss-Newton steps on ``(a, c)``. The fit models border truncation,
   so centres of blobs near an edge are unbiased;
3. colour ``k`` is *present* when the median amplitude over frames reaches half the world's
   smallest blob amplitude;
4. trajectory: least-squares line ``c(f) ~= c0 + v f``; its velocity ``v`` gives the direction
   and the mean distance of the detected centres from the line is the track's residual (px).

The feature vector concatenates, per colour, the amplitude median and spread over frames and
(multiplied by a presence gate in [0, 1], so absent colours contribute ~0 rather than the
fit's noise) mean position, velocity and residual; then per-channel std, frame-difference and
spatial-Laplacian energies, and a fixed seeded random projection of the whole clip. Each
feature is standardised by mean/std measured once on real samples of the world, so the Frechet
distance is dimensionless and weighs the feature groups comparably.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from megadistill.data.synthetic import DIRECTIONS, SyntheticVideoWorld, mix_seed


@dataclass
class BlobTracks:
    """Per clip ``n`` and palette colour ``k`` (positions are (x, y) = (width, height) px)."""
    amplitude: torch.Tensor   # [N, K, F] fitted peak height per frame
    centre: torch.Tensor      # [N, K, F, 2] fitted centre per frame
    present: torch.Tensor     # [N, K] bool
    velocity: torch.Tensor    # [N, K, 2] slope of the least-squares line, px/frame
    residual: torch.Tensor    # [N, K] mean distance of centres from the line, px

    @property
    def strength(self) -> torch.Tensor:
        """[N, K] median amplitude over frames."""
        return self.amplitude.median(dim=2).values

    def directions(self) -> torch.Tensor:
        """[N, K] index into ``DIRECTIONS`` of the dominant signed velocity component."""
        vx, vy = self.velocity[..., 0], self.velocity[..., 1]
        by_name = {"left": -vx, "right": vx, "up": -vy, "down": vy}
        return torch.stack([by_name[d] for d in DIRECTIONS], dim=-1).argmax(dim=-1)


class LatentFeatureExtractor:
    """Tracks blobs and turns clips ``[N, C, F, H, W]`` into standardised features ``[N, D]``."""

    def __init__(self, world: SyntheticVideoWorld, projection_dim: int = 16, seed: int = 0,
                 calibration_samples: int = 512, gauss_newton_steps: int = 6,
                 chunk_size: int = 256):
        self.world = world
        self.sigma = world.blob_sigma
        self.signatures = world.signatures.double()                       # [K, C]
        self.presence_threshold = 0.5 * world.amplitude_range[0] * world.scale
        self.gauss_newton_steps = int(gauss_newton_steps)
        self.chunk_size = int(chunk_size)
        C, F, H, W = world.latent_shape
        g = torch.Generator().manual_seed(mix_seed("eval-projection", seed))
        dim = C * F * H * W
        self.projection = torch.randn((dim, projection_dim), generator=g, dtype=torch.float64)
        self.projection /= math.sqrt(dim)  # each output has about the clip's per-element variance
        self._grid, self._templates = self._candidate_templates(H, W)
        self.feature_names = self._names(projection_dim)
        self.feature_mean = torch.zeros(len(self.feature_names), dtype=torch.float64)
        self.feature_std = torch.ones(len(self.feature_names), dtype=torch.float64)
        calib = torch.Generator().manual_seed(mix_seed("eval-calibration", seed, world.seed))
        raw = self.raw_features(world.sample(calibration_samples, calib)[0])
        self.feature_mean = raw.mean(dim=0)
        self.feature_std = raw.std(dim=0).clamp(min=1e-6)

    # -- tracking -------------------------------------------------------------------------------

    def check_latents(self, latents: torch.Tensor) -> torch.Tensor:
        if not isinstance(latents, torch.Tensor) or latents.dim() != 5:
            raise ValueError("latents must be a tensor [N, C, F, H, W], got "
                             f"{getattr(latents, 'shape', type(latents).__name__)}")
        if tuple(latents.shape[1:]) != self.world.latent_shape:
            raise ValueError(f"latents have clip shape {tuple(latents.shape[1:])} but the world makes "
                             f"{self.world.latent_shape}; evaluate with the world they come from")
        if latents.shape[0] < 1:
            raise ValueError("latents hold no clips")
        if not bool(torch.isfinite(latents).all()):
            raise ValueError("latents contain nan or inf")
        return latents.detach().cpu().double()

    def track(self, latents: torch.Tensor) -> BlobTracks:
        x = self.check_latents(latents)
        parts = [self._track_chunk(x[i:i + self.chunk_size]) for i in range(0, x.shape[0], self.chunk_size)]
        amplitude = torch.cat([p[0] for p in parts])
        centre = torch.cat([p[1] for p in parts])
        velocity, residual = fit_lines(centre)
        present = amplitude.median(dim=2).values >= self.presence_threshold
        return BlobTracks(amplitude, centre, present, velocity, residual)

    def _track_chunk(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        N, C, F, H, W = x.shape
        heat = torch.einsum("ncfhw,kc->nkfhw", x, self.signatures)          # [N, K, F, H, W]
        K = heat.shape[1]
        amplitude, centre = fit_gaussians(heat.reshape(-1, H, W), self.sigma, self._grid,
                                          self._templates, self.gauss_newton_steps)
        return amplitude.reshape(N, K, F), centre.reshape(N, K, F, 2)

    def _candidate_templates(self, H: int, W: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Half-pixel centre grid [G, 2] over the frame and its Gaussians [G, H*W]."""
        gx = torch.arange(0, 2 * W - 1, dtype=torch.float64) / 2
        gy = torch.arange(0, 2 * H - 1, dtype=torch.float64) / 2
        grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1).reshape(-1, 2)
        return grid, gaussian_images(grid, H, W, self.sigma).reshape(grid.shape[0], H * W)

    # -- features -------------------------------------------------------------------------------

    def _names(self, projection_dim: int) -> List[str]:
        names = []
        for colour in self.world.palette:
            names += [f"{colour}/{s}" for s in ("amp_median", "amp_spread", "x_mean", "y_mean",
                                                "vx", "vy", "line_residual")]
        names += [f"channel_std/{c}" for c in range(self.world.channels)]
        names += ["frame_diff_energy", "laplacian_energy"]
        names += [f"projection/{i}" for i in range(projection_dim)]
        return names

    def raw_features(self, latents: torch.Tensor, tracks: Optional[BlobTracks] = None) -> torch.Tensor:
        """Unstandardised features [N, D] float64 (``tracks``: ``self.track(latents)`` if known)."""
        x = self.check_latents(latents)
        tracks = self.track(latents) if tracks is None else tracks
        _, _, F, H, W = x.shape
        strength = tracks.strength
        gate = (strength / self.presence_threshold).clamp(0, 1)            # [N, K]
        mid = torch.tensor([(W - 1) / 2, (H - 1) / 2], dtype=torch.float64)
        mean_pos = tracks.centre.mean(dim=2) - mid                           # [N, K, 2]
        spread = tracks.amplitude.std(dim=2)
        per_colour = torch.stack([
            strength, spread,
            gate * mean_pos[..., 0], gate * mean_pos[..., 1],
            gate * tracks.velocity[..., 0], gate * tracks.velocity[..., 1],
            gate * tracks.residual,
        ], dim=-1).flatten(1)                                                # [N, 7K]
        channel_std = x.std(dim=(2, 3, 4))
        frame_diff = (x[:, :, 1:] - x[:, :, :-1]).pow(2).mean(dim=(1, 2, 3, 4))
        lap = (4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1]
               - x[..., 1:-1, :-2] - x[..., 1:-1, 2:])
        laplacian = lap.pow(2).mean(dim=(1, 2, 3, 4))
        projection = x.flatten(1) @ self.projection
        return torch.cat([per_colour, channel_std, frame_diff[:, None], laplacian[:, None], projection], 1)

    def __call__(self, latents: torch.Tensor, tracks: Optional[BlobTracks] = None) -> torch.Tensor:
        """Standardised features [N, D] float64 (real samples: ~zero mean, unit std)."""
        return (self.raw_features(latents, tracks) - self.feature_mean) / self.feature_std


# ------------------------------------------------------------------------------- primitives


def gaussian_images(centres: torch.Tensor, H: int, W: int, sigma: float) -> torch.Tensor:
    """``exp(-|(j, i) - c|^2 / 2 sigma^2)`` for centres ``[..., 2]`` (x, y) -> ``[..., H, W]``."""
    xs = torch.arange(W, dtype=centres.dtype)
    ys = torch.arange(H, dtype=centres.dtype)
    dx2 = (xs - centres[..., 0:1]) ** 2
    dy2 = (ys - centres[..., 1:2]) ** 2
    return torch.exp(-(dy2[..., :, None] + dx2[..., None, :]) / (2 * sigma ** 2))


def fit_gaussians(heat: torch.Tensor, sigma: float, grid: torch.Tensor, templates: torch.Tensor,
                  steps: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Least-squares ``heat[p] ~= a_p * gaussian(c_p)`` for maps ``[P, H, W]`` -> (a [P], c [P, 2]).

    Start: the grid centre with the best profiled gain ``relu(<h, g>)^2 / |g|^2``. Then
    Levenberg-damped Gauss-Newton on ``(a, cx, cy)``; steps move the centre by at most half a
    pixel and keep it within one pixel of the frame, and ``a`` stays >= 0 (a blob's amplitude is
    positive; on maps without a blob the fit ends near ``a = 0`` at an arbitrary centre).
    """
    P, H, W = heat.shape
    h = heat.reshape(P, H * W)
    corr = h @ templates.T                                                   # [P, G]
    energy = templates.pow(2).sum(dim=1)                                     # [G]
    best = (corr.clamp(min=0) ** 2 / energy).argmax(dim=1)
    centre = grid[best].clone()
    amp = (corr.gather(1, best[:, None])[:, 0] / energy[best]).clamp(min=0)
    xs = torch.arange(W, dtype=h.dtype).repeat(H)
    ys = torch.arange(H, dtype=h.dtype).repeat_interleave(W)
    eye = torch.eye(3, dtype=h.dtype)
    for _ in range(steps):
        g = gaussian_images(centre, H, W, sigma).reshape(P, H * W)
        dx = (xs - centre[:, 0:1]) / sigma ** 2
        dy = (ys - centre[:, 1:2]) / sigma ** 2
        jac = torch.stack([g, amp[:, None] * g * dx, amp[:, None] * g * dy], dim=-1)  # [P, HW, 3]
        resid = h - amp[:, None] * g
        jtj = jac.transpose(1, 2) @ jac
        damp = 1e-3 * torch.diagonal(jtj, dim1=1, dim2=2).clamp(min=1e-9)
        delta = torch.linalg.solve(jtj + torch.diag_embed(damp) + 1e-9 * eye,
                                   (jac.transpose(1, 2) @ resid[..., None]))[..., 0]
        amp = (amp + delta[:, 0]).clamp(min=0)
        step = delta[:, 1:].clamp(-0.5, 0.5)
        centre = centre + step
        centre[:, 0] = centre[:, 0].clamp(-1.0, W)
        centre[:, 1] = centre[:, 1].clamp(-1.0, H)
    return amp, centre


def fit_lines(centre: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Least-squares line through ``centre [..., F, 2]`` over frame index ->
    (velocity [..., 2] px/frame, mean distance of the points from the line [...] px)."""
    F = centre.shape[-2]
    t = torch.arange(F, dtype=centre.dtype)
    tc = t - t.mean()
    mean = centre.mean(dim=-2, keepdim=True)
    velocity = (tc[:, None] * (centre - mean)).sum(dim=-2) / tc.pow(2).sum()
    line = mean + tc[:, None] * velocity[..., None, :]
    residual = (centre - line).norm(dim=-1).mean(dim=-1)
    return velocity, residual


def decode_blobs(tracks: BlobTracks, palette) -> List[List[Tuple[str, str]]]:
    """What each clip shows: ``(colour, direction)`` of every present colour, palette order."""
    dirs = tracks.directions()
    out = []
    for n in range(tracks.present.shape[0]):
        out.append([(palette[k], DIRECTIONS[int(dirs[n, k])])
                    for k in range(tracks.present.shape[1]) if bool(tracks.present[n, k])])
    return out


_EXTRACTORS: Dict[Tuple, LatentFeatureExtractor] = {}


def feature_extractor(world: SyntheticVideoWorld, projection_dim: int = 16, seed: int = 0
                      ) -> LatentFeatureExtractor:
    """A cached ``LatentFeatureExtractor`` for the world (calibration runs once per config)."""
    key = (tuple(sorted(world.config().items())), projection_dim, seed)
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = LatentFeatureExtractor(world, projection_dim=projection_dim, seed=seed)
    return _EXTRACTORS[key]

"""A procedural video-latent world: coloured Gaussian blobs moving in straight lines.

Real Wan latents need real weights and real videos; this world needs neither. It gives a
distribution with known ground truth (what is in the clip, where, how it moves) that a small
teacher can learn on a CPU and that metrics (``megadistill.eval``) can check.

Captions follow a closed grammar::

    caption := blob | blob " and " blob          (the two blobs have different colours)
    blob    := "a " COLOUR " blob moving " DIRECTION
    COLOUR  in PALETTE, DIRECTION in DIRECTIONS

A latent clip ``x`` of shape ``[C, F, H, W]`` is

    x[:, f, i, j] = scale * ( sum_b a_b * exp(-|(j, i) - p_b(f)|^2 / (2 sigma^2)) * s_{colour_b}
                              + bg_std * sum_k n_k(i, j) * q_k
                              + noise_std * eps[:, f, i, j] )

with ``p_b(f) = p_b(0) + v_b * f`` (straight line, constant velocity; positions are
``(x, y) = (width index, height index)``, "up" is towards row 0), palette signatures ``s_c``
and background directions ``q_k`` the rows of one random orthogonal matrix fixed by the world
seed (so colour lives in its own subspace and the background never looks like a colour), a
static smooth random background field ``n_k`` per sample, and white noise ``eps``. ``scale``
is calibrated once per world so that elements have unit variance overall, like VAE latents.
"""
from __future__ import annotations

import hashlib
import re
from typing import Any, Dict, List, Sequence, Tuple

import torch

PALETTE: Tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "white")
DIRECTIONS: Tuple[str, ...] = ("left", "right", "up", "down")
# Unit displacement (dx, dy) per direction, in (width index, height index); "up" is towards row 0.
DIRECTION_VECTORS: Dict[str, Tuple[int, int]] = {
    "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
MAX_BLOBS = 2

_BLOB_RE = re.compile(r"a (\w+) blob moving (\w+)")
_GRAMMAR = ('"a <colour> blob moving <direction>", optionally joined by " and " to a second blob '
            f"of another colour; colours {list(PALETTE)}, directions {list(DIRECTIONS)}")


# --------------------------------------------------------------------------------- captions


def format_caption(blobs: Sequence[Tuple[str, str]]) -> str:
    """``[("red", "left"), ("blue", "up")]`` -> ``"a red blob moving left and a blue blob moving up"``."""
    text = " and ".join(f"a {colour} blob moving {direction}" for colour, direction in blobs)
    parse_caption(text)  # validates colours, directions, count and distinct colours
    return text


def parse_caption(text: str) -> List[Tuple[str, str]]:
    """Inverse of ``format_caption``: the ``(colour, direction)`` of each blob, in caption order."""
    if not isinstance(text, str):
        raise TypeError(f"caption must be a str, got {type(text).__name__}")
    parts = text.split(" and ")
    if len(parts) > MAX_BLOBS:
        raise ValueError(f"caption {text!r} names {len(parts)} blobs; at most {MAX_BLOBS}. "
                         f"Grammar: {_GRAMMAR}")
    blobs = []
    for part in parts:
        match = _BLOB_RE.fullmatch(part)
        if match is None:
            raise ValueError(f"caption {text!r} does not follow the grammar: {_GRAMMAR}")
        colour, direction = match.groups()
        if colour not in PALETTE:
            raise ValueError(f"caption {text!r}: unknown colour {colour!r}; use one of {list(PALETTE)}")
        if direction not in DIRECTIONS:
            raise ValueError(f"caption {text!r}: unknown direction {direction!r}; "
                             f"use one of {list(DIRECTIONS)}")
        blobs.append((colour, direction))
    if len({c for c, _ in blobs}) != len(blobs):
        raise ValueError(f"caption {text!r} names one colour twice; the blobs must differ in colour")
    return blobs


def _enumerate_captions() -> Tuple[str, ...]:
    singles = [(c, d) for c in PALETTE for d in DIRECTIONS]
    pairs = [(a, b) for a in singles for b in singles if a[0] != b[0]]
    return tuple([format_caption([a]) for a in singles] + [format_caption(list(p)) for p in pairs])


CAPTIONS: Tuple[str, ...] = _enumerate_captions()  # 24 one-blob + 480 two-blob captions


def sample_captions(n: int, generator: torch.Generator) -> List[str]:
    """``n`` captions: one or two blobs with probability 1/2 each, colours distinct and uniform,
    directions uniform. Consumes a fixed amount of randomness per caption."""
    count = torch.randint(1, MAX_BLOBS + 1, (n,), generator=generator)
    colours = torch.rand(n, len(PALETTE), generator=generator).argsort(dim=1)[:, :MAX_BLOBS]
    directions = torch.randint(0, len(DIRECTIONS), (n, MAX_BLOBS), generator=generator)
    return [" and ".join(f"a {PALETTE[int(colours[i, b])]} blob moving {DIRECTIONS[int(directions[i, b])]}"
                         for b in range(int(count[i]))) for i in range(n)]


def sample_caption(generator: torch.Generator) -> str:
    """One caption drawn like ``sample_captions``."""
    return sample_captions(1, generator)[0]


def mix_seed(*parts: Any) -> int:
    """A 63-bit seed hashed from ``parts`` (stable across runs and machines, unlike ``hash``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ------------------------------------------------------------------------------------ world


class SyntheticVideoWorld:
    """Unlimited captioned latent clips ``[channels, frames, height, width]``; see the module doc.

    Motion: a blob's centre stays at least ``margin`` pixels inside the frame over the whole clip;
    it travels ``u * usable`` pixels along its direction, ``u ~ U(travel_range)`` and ``usable =
    extent - 1 - 2 * margin``, i.e. a constant speed ``u * usable / (frames - 1)`` px/frame.
    """

    def __init__(self, channels: int = 16, frames: int = 8, height: int = 8, width: int = 8,
                 seed: int = 0, blob_sigma: float = 1.25,
                 amplitude_range: Tuple[float, float] = (4.0, 6.0),
                 travel_range: Tuple[float, float] = (0.85, 1.0), margin: float = 0.5,
                 background_std: float = 0.25, background_smoothness: float = 1.5,
                 noise_std: float = 0.1):
        if channels <= len(PALETTE):
            raise ValueError(f"channels={channels} must exceed the palette size {len(PALETTE)} "
                             "(colours and background need their own directions)")
        if frames < 2:
            raise ValueError(f"frames={frames}: motion needs at least 2 frames")
        if min(height, width) - 1 - 2 * margin <= 0:
            raise ValueError(f"height={height}, width={width} leave no room for blob centres with "
                             f"margin={margin}; use larger frames or a smaller margin")
        if not 0 < amplitude_range[0] <= amplitude_range[1]:
            raise ValueError(f"amplitude_range={amplitude_range} must be positive and increasing")
        if not 0 < travel_range[0] <= travel_range[1] <= 1:
            raise ValueError(f"travel_range={travel_range} must satisfy 0 < low <= high <= 1 "
                             "(fractions of the usable extent)")
        if blob_sigma <= 0 or background_std < 0 or noise_std < 0 or background_smoothness <= 0:
            raise ValueError("blob_sigma and background_smoothness must be > 0; background_std and "
                             "noise_std must be >= 0")
        self.channels, self.frames, self.height, self.width = channels, frames, height, width
        self.seed = int(seed)
        self.blob_sigma = float(blob_sigma)
        self.amplitude_range = (float(amplitude_range[0]), float(amplitude_range[1]))
        self.travel_range = (float(travel_range[0]), float(travel_range[1]))
        self.margin = float(margin)
        self.background_std = float(background_std)
        self.background_smoothness = float(background_smoothness)
        self.noise_std = float(noise_std)
        self.palette = PALETTE
        basis = _orthogonal_matrix(channels, mix_seed("world-basis", self.seed))
        self.signatures = basis[: len(PALETTE)].contiguous()        # [n_colours, C], orthonormal
        self.background_basis = basis[len(PALETTE):].contiguous()   # [C - n_colours, C]
        self.scale = 1.0
        calib = torch.Generator().manual_seed(mix_seed("world-scale", self.seed))
        self.scale = float(1.0 / self.sample(256, calib)[0].double().std())

    @property
    def latent_shape(self) -> Tuple[int, int, int, int]:
        return (self.channels, self.frames, self.height, self.width)

    def config(self) -> Dict[str, Any]:
        """Constructor arguments: ``SyntheticVideoWorld(**world.config())`` rebuilds this world."""
        return dict(channels=self.channels, frames=self.frames, height=self.height, width=self.width,
                    seed=self.seed, blob_sigma=self.blob_sigma, amplitude_range=self.amplitude_range,
                    travel_range=self.travel_range, margin=self.margin,
                    background_std=self.background_std,
                    background_smoothness=self.background_smoothness, noise_std=self.noise_std)

    def sample(self, n: int, generator: torch.Generator
               ) -> Tuple[torch.Tensor, List[str], Dict[str, torch.Tensor]]:
        """``n`` clips with random captions: ``(latents [n, C, F, H, W] float32, captions, meta)``."""
        captions = sample_captions(n, generator)
        latents, meta = self.sample_for_captions(captions, generator)
        return latents, captions, meta

    def sample_for_captions(self, captions: Sequence[str], generator: torch.Generator
                            ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Clips showing the given captions; the rest (positions, speeds, amplitudes, background,
        noise) is drawn from ``generator`` with a fixed amount of randomness per clip.

        meta (slot ``b`` is the ``b``-th blob of the caption; absent slots hold -1 / nan / 0):
          num_blobs [n] long, colours [n, 2] long (palette index), directions [n, 2] long,
          positions [n, 2, F, 2] (x, y) px, velocities [n, 2, 2] (x, y) px/frame,
          amplitudes [n, 2] peak height in latent units.
        """
        n = len(captions)
        if n < 1:
            raise ValueError("sample_for_captions needs at least one caption")
        colours = torch.full((n, MAX_BLOBS), -1, dtype=torch.long)
        directions = torch.full((n, MAX_BLOBS), -1, dtype=torch.long)
        for i, text in enumerate(captions):
            for b, (colour, direction) in enumerate(parse_caption(text)):
                colours[i, b] = PALETTE.index(colour)
                directions[i, b] = DIRECTIONS.index(direction)
        present = colours >= 0
        start, velocity, amplitude = self._draw_motion(directions, generator)
        fields = self._draw_background(n, generator)
        noise = torch.randn((n, self.channels, self.frames, self.height, self.width),
                            generator=generator)

        steps = torch.arange(self.frames, dtype=torch.float64)
        positions = start[:, :, None, :] + velocity[:, :, None, :] * steps[None, None, :, None]
        amplitude = amplitude * present
        # Large tensors in float32 (the output precision); kinematics stay float64.
        blobs = self._render_blobs(positions, amplitude).float()                # [n, 2, F, H, W]
        signature = self.signatures[colours.clamp(min=0)]                        # [n, 2, C]
        latents = torch.einsum("nbfhw,nbc->ncfhw", blobs, signature)
        background = torch.einsum("nkhw,kc->nchw", fields.float(), self.background_basis)
        latents.add_(background[:, :, None], alpha=self.background_std)
        latents.add_(noise, alpha=self.noise_std).mul_(self.scale)

        nan = torch.tensor(float("nan"), dtype=torch.float64)
        meta = {
            "num_blobs": present.sum(dim=1),
            "colours": colours,
            "directions": directions,
            "positions": torch.where(present[:, :, None, None], positions, nan).float(),
            "velocities": torch.where(present[:, :, None], velocity, nan).float(),
            "amplitudes": (self.scale * amplitude).float(),
        }
        return latents, meta

    # -- pieces of a clip ---------------------------------------------------------------------

    def _draw_motion(self, directions: torch.Tensor, generator: torch.Generator):
        """Start (x, y), velocity (x, y) px/frame and peak amplitude for every slot [n, 2]."""
        n = directions.shape[0]
        u_travel, u_along, u_across, u_amp = torch.rand(
            (4, n, MAX_BLOBS), generator=generator, dtype=torch.float64)
        unit = torch.tensor([DIRECTION_VECTORS[d] for d in DIRECTIONS], dtype=torch.float64)
        unit = unit[directions.clamp(min=0)]                                     # [n, 2, 2]
        extent = torch.tensor([self.width, self.height], dtype=torch.float64)
        lo = self.margin
        hi = extent - 1 - self.margin                                            # per axis (x, y)
        horizontal = unit[..., 0] != 0                                           # [n, 2]
        axis_hi = torch.where(horizontal, hi[0], hi[1])
        axis_hi_perp = torch.where(horizontal, hi[1], hi[0])
        t_lo, t_hi = self.travel_range
        travel = (t_lo + (t_hi - t_lo) * u_travel) * (axis_hi - lo)
        sign = unit.sum(dim=-1)                                                  # +1 or -1
        # Start so that start + sign * travel stays within [lo, axis_hi].
        along0 = lo + (axis_hi - lo - travel) * u_along + torch.where(sign < 0, travel, 0.0)
        across0 = lo + (axis_hi_perp - lo) * u_across
        start = torch.where(horizontal[..., None], torch.stack([along0, across0], -1),
                            torch.stack([across0, along0], -1))
        velocity = unit * (travel / (self.frames - 1))[..., None]
        a_lo, a_hi = self.amplitude_range
        amplitude = a_lo + (a_hi - a_lo) * u_amp
        return start, velocity, amplitude

    def _render_blobs(self, positions: torch.Tensor, amplitude: torch.Tensor) -> torch.Tensor:
        """Isotropic Gaussians ``a * exp(-d^2 / 2 sigma^2)`` at ``positions [n, 2, F, 2]``."""
        xs = torch.arange(self.width, dtype=torch.float64)
        ys = torch.arange(self.height, dtype=torch.float64)
        dx2 = (xs - positions[..., 0:1]) ** 2                                  # [n, 2, F, W]
        dy2 = (ys - positions[..., 1:2]) ** 2                                  # [n, 2, F, H]
        d2 = dy2[..., :, None] + dx2[..., None, :]
        return amplitude[:, :, None, None, None] * torch.exp(-d2 / (2 * self.blob_sigma ** 2))

    def _draw_background(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Static smooth fields [n, C - n_colours, H, W], each with unit spatial std: white noise
        blurred by a Gaussian of width ``background_smoothness`` px (replicate padding)."""
        k = self.channels - len(PALETTE)
        white = torch.randn((n, k, self.height, self.width), generator=generator, dtype=torch.float64)
        radius = max(1, int(round(2 * self.background_smoothness)))
        taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
        kernel = torch.exp(-taps ** 2 / (2 * self.background_smoothness ** 2))
        kernel = kernel / kernel.sum()
        x = white.reshape(n * k, 1, self.height, self.width)
        x = torch.nn.functional.pad(x, (radius, radius, 0, 0), mode="replicate")
        x = torch.nn.functional.conv2d(x, kernel.view(1, 1, 1, -1))
        x = torch.nn.functional.pad(x, (0, 0, radius, radius), mode="replicate")
        x = torch.nn.functional.conv2d(x, kernel.view(1, 1, -1, 1)).reshape(n, k, self.height, self.width)
        x = x - x.mean(dim=(2, 3), keepdim=True)
        return x / x.std(dim=(2, 3), keepdim=True).clamp(min=1e-12)


def _orthogonal_matrix(size: int, seed: int) -> torch.Tensor:
    """A random orthogonal matrix, unique given the seed: QR of a Gaussian matrix with the signs
    fixed so that R has a positive diagonal (QR alone is unique only up to those signs)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn((size, size), generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))[None, :]
    return q.T.contiguous().float()


# ----------------------------------------------------------------------------------- stream


class SyntheticLatentStream(torch.utils.data.IterableDataset):
    """Endless batches ``{"latents": [B, C, F, H, W], "prompts": list[str]}`` for one data rank.

    Batch ``i`` of rank ``r`` is the world's sample drawn from a generator seeded by
    ``(seed, i * world_size + r)``: a pure function of its position, so ranks never share a batch
    and ``state_dict()`` (just the next ``i``) resumes exactly. Iterate it directly (or with a
    ``DataLoader(batch_size=None, num_workers=0)``); worker processes would each replay the stream.
    """

    def __init__(self, world: SyntheticVideoWorld, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
        self.world = world
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.next_index = 0

    def batch_at(self, index: int) -> Dict[str, Any]:
        """The ``index``-th batch of this rank (does not move the stream)."""
        global_index = int(index) * self.world_size + self.rank
        g = torch.Generator().manual_seed(mix_seed("stream", self.seed, global_index))
        latents, prompts, _ = self.world.sample(self.batch_size, g)
        return {"latents": latents, "prompts": prompts}

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, Any]:
        batch = self.batch_at(self.next_index)
        self.next_index += 1
        return batch

    def state_dict(self) -> Dict[str, Any]:
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "batch_size": self.batch_size, "world_seed": self.world.seed,
                "next_index": self.next_index}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key in ("seed", "rank", "world_size", "batch_size", "world_seed"):
            if key not in state:
                raise KeyError(f"stream state lacks {key!r}; pass a dict from state_dict()")
            mine = self.state_dict()[key]
            if state[key] != mine:
                raise ValueError(f"stream state has {key}={state[key]!r} but this stream has "
                                 f"{mine!r}; build the stream with the settings it was saved with")
        index = state.get("next_index")
        if not isinstance(index, int) or index < 0:
            raise ValueError(f"stream state next_index={index!r} must be a non-negative int")
        self.next_index = index

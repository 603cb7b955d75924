"""Reading and writing small videos, and looking at latents without (or with) a VAE.

Frames are ``uint8 [T, H, W, 3]`` (numpy or torch). GIFs and folders of images go through Pillow,
which is always installed; other containers (.mp4, .webm, .mov ...) need ``imageio`` with its
ffmpeg plugin (``pip install imageio imageio-ffmpeg``), and say so when they are missing.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_FFMPEG_HINT = "install imageio and imageio-ffmpeg (pip install imageio imageio-ffmpeg)"


def _imageio():
    try:
        import imageio.v2 as imageio
    except ImportError:
        return None
    return imageio


def _as_frames(frames) -> np.ndarray:
    arr = frames.detach().cpu().numpy() if torch.is_tensor(frames) else np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8 or arr.shape[0] < 1:
        raise ValueError(f"frames must be uint8 [T, H, W, 3] with T >= 1, got {arr.dtype} {list(arr.shape)}")
    return np.ascontiguousarray(arr)


# --- writing ----------------------------------------------------------------------------------------

def write_video(frames, path, fps: float = 16.0) -> Path:
    """Writes ``frames`` (uint8 ``[T, H, W, 3]``) to ``path``: ``.gif`` with Pillow (looping), ``.mp4``
    with imageio-ffmpeg. The file appears complete or not at all (temp file + rename). Pillow stores
    identical consecutive GIF frames once, with their durations added."""
    path = Path(path)
    arr = _as_frames(frames)
    if fps <= 0:
        raise ValueError(f"fps={fps} must be > 0")
    suffix = path.suffix.lower()
    if suffix not in (".gif", ".mp4"):
        raise ValueError(f"{path}: write .gif or .mp4")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        if suffix == ".gif":
            _write_gif(arr, tmp, fps)
        else:
            _write_mp4(arr, tmp, fps)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _write_gif(arr: np.ndarray, path: str, fps: float):
    from PIL import Image

    images = [Image.fromarray(f) for f in arr]
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], loop=0,
                   duration=max(1, round(1000 / fps)), optimize=False)


def _write_mp4(arr: np.ndarray, path: str, fps: float):
    imageio = _imageio()
    if imageio is None:
        raise RuntimeError(f"writing {Path(path).suffix} needs imageio: {_FFMPEG_HINT}; or write a .gif")
    try:
        with imageio.get_writer(path, format="FFMPEG", fps=fps, codec="libx264", macro_block_size=1) as w:
            for f in arr:
                w.append_data(f)
    except (ImportError, ValueError, RuntimeError) as e:
        raise RuntimeError(f"cannot write mp4 ({e}); {_FFMPEG_HINT}") from e


# --- reading ----------------------------------------------------------------------------------------

def read_video(path, max_frames: int | None = None) -> np.ndarray:
    """uint8 ``[T, H, W, 3]`` of a ``.gif``, a folder of images (sorted by name), or, with imageio
    installed, any container ffmpeg reads. ``max_frames`` stops after that many frames."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such video file or frame folder")
    if path.is_dir():
        frames = _read_frame_folder(path, max_frames)
    elif path.suffix.lower() == ".gif":
        frames = _read_gif(path, max_frames)
    elif path.suffix.lower() in IMAGE_EXTS:
        frames = _read_frame_files([path], 1)
    else:
        frames = _read_with_imageio(path, max_frames)
    if not frames:
        raise ValueError(f"{path}: holds no frames")
    return np.stack(frames)


def _read_gif(path: Path, max_frames):
    from PIL import Image, ImageSequence

    frames = []
    with Image.open(path) as im:
        for frame in ImageSequence.Iterator(im):
            frames.append(np.asarray(frame.convert("RGB")))
            if max_frames is not None and len(frames) >= max_frames:
                break
    return frames


def _read_frame_files(files, max_frames):
    from PIL import Image

    frames = []
    for f in files[:max_frames]:
        with Image.open(f) as im:
            frames.append(np.asarray(im.convert("RGB")))
    if frames and len({fr.shape for fr in frames}) > 1:
        raise ValueError(f"frames in {Path(files[0]).parent} differ in size: {sorted({fr.shape for fr in frames})}")
    return frames


def _read_frame_folder(folder: Path, max_frames):
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise ValueError(f"{folder}: a frame folder must hold images ({', '.join(IMAGE_EXTS)})")
    return _read_frame_files(files, max_frames)


def _read_with_imageio(path: Path, max_frames):
    imageio = _imageio()
    if imageio is None:
        raise RuntimeError(f"{path}: reading {path.suffix or 'this file'} needs imageio: {_FFMPEG_HINT}; "
                           "or convert it to a .gif or a folder of PNG frames")
    frames = []
    try:
        with imageio.get_reader(str(path)) as r:
            for f in r:
                f = np.asarray(f)
                if f.ndim == 2:
                    f = np.repeat(f[..., None], 3, axis=-1)
                frames.append(np.ascontiguousarray(f[..., :3]).astype(np.uint8, copy=False))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except (ImportError, ValueError, RuntimeError, OSError) as e:
        raise RuntimeError(f"{path}: cannot read video ({e}); {_FFMPEG_HINT}") from e
    return frames


def resize_center_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scales every frame to cover ``height x width`` (aspect kept, bicubic), then crops the centre."""
    from PIL import Image

    t, h, w, _ = frames.shape
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    top, left = (nh - height) // 2, (nw - width) // 2
    out = np.empty((t, height, width, 3), dtype=np.uint8)
    for i, f in enumerate(frames):
        im = Image.fromarray(f)
        if (nh, nw) != (h, w):
            im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        out[i] = np.asarray(im)[top:top + height, left:left + width]
    return out


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` -> float ``[3, T, H, W]`` in [-1, 1] (the VAE's input range)."""
    return torch.from_numpy(_as_frames(frames)).permute(3, 0, 1, 2).float().div(127.5).sub(1.0)


def tensor_to_frames(video: torch.Tensor) -> np.ndarray:
    """float ``[3, T, H, W]`` in [-1, 1] -> uint8 ``[T, H, W, 3]`` (rounded, clamped)."""
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"video must be [3, T, H, W], got {list(video.shape)}")
    x = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()


# --- previews of latents ------------------------------------------------------------------------------

def preview_projection(channels: int) -> torch.Tensor:
    """A fixed ``[3, channels]`` map from latent channels to RGB: a seeded Gaussian matrix with rows of
    unit norm, so unit-variance latents give unit-variance colour channels. The same for every call."""
    g = torch.Generator().manual_seed(20240611 + channels)
    m = torch.randn(3, channels, generator=g, dtype=torch.float64)
    return (m / m.norm(dim=1, keepdim=True)).float()


def latents_to_preview(latents: torch.Tensor, vae=None, upscale: int = 8) -> np.ndarray:
    """uint8 frames ``[T, H, W, 3]`` showing latents ``[C, F, H, W]``.

    With ``vae`` (anything with ``decode(latents [B, C, F, H, W]) -> video [B, 3, T, H, W]`` in [-1, 1],
    such as ``WanVAE``) the frames are the decoded video. Without it each latent frame becomes one
    image: RGB = 0.5 * P @ latents per position (``P`` = :func:`preview_projection`), clamped to
    [-1, 1], upscaled ``upscale`` times by pixel repetition (8 = Wan's spatial stride). It shows
    layout and motion of a latent clip, not its colours."""
    if latents.ndim != 4:
        raise ValueError(f"latents must be [C, F, H, W], got {list(latents.shape)}")
    if vae is not None:
        with torch.no_grad():
            video = vae.decode(latents[None])
        return tensor_to_frames(video[0])
    if int(upscale) != upscale or upscale < 1:
        raise ValueError(f"upscale={upscale} must be a positive integer")
    x = latents.detach().float().cpu()
    rgb = 0.5 * torch.einsum("kc,cfhw->kfhw", preview_projection(x.shape[0]), x)
    rgb = rgb.repeat_interleave(int(upscale), dim=2).repeat_interleave(int(upscale), dim=3)
    return tensor_to_frames(rgb)

#!/usr/bin/env python
"""Encode captioned videos into WebDataset latent shards for ``data.kind: webdataset``.

    python tools/preprocess.py --videos clips/ --captions captions.json --vae Wan2.1-T2V-1.3B \\
        --text-encoder Wan2.1-T2V-1.3B --out data/latents [--frames 81 --height 480 --width 832]

``--videos``: a folder (every video file and every sub-folder of image frames in it, sorted by
name) or a text file listing one path per line. Readable without extra packages: ``.gif`` and
folders of PNG/JPEG frames (Pillow); ``.mp4`` and other containers need ``imageio`` +
``imageio-ffmpeg``, and without them such a video is reported and skipped.

``--captions``: ``.json`` (``{video file name or stem: caption}``), ``.jsonl`` (one
``{"video": ..., "caption": ...}`` a line) or a text file with one caption a line in the order of
the videos.

Each video: its first ``--frames`` frames (a video with fewer is skipped), scaled to cover
``--height x --width`` and centre-cropped, mapped to [-1, 1], encoded by the Wan VAE (posterior
mean, normalized); its caption encoded by the text encoder, keeping only the valid tokens. The
shards (``--samples-per-shard`` samples each) are described in :mod:`megadistill.data.latents`.
Exit status 0 when every video was written, 1 when some were skipped, 2 on bad input.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402

from megadistill.data.video_io import IMAGE_EXTS  # noqa: E402

VIDEO_EXTS = (".gif", ".mp4", ".webm", ".mov", ".mkv", ".avi")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
log = logging.getLogger("preprocess")


def list_videos(spec) -> list:
    p = Path(spec)
    if p.is_dir():
        found = sorted(q for q in p.iterdir() if not q.name.startswith(".") and (
            q.suffix.lower() in VIDEO_EXTS or (q.is_dir() and any(f.suffix.lower() in IMAGE_EXTS for f in q.iterdir()))))
        if not found:
            raise ValueError(f"--videos {p}: no videos ({', '.join(VIDEO_EXTS)}) or frame folders in it")
        return found
    if p.is_file():
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
        paths = [Path(ln) if os.path.isabs(ln) else p.parent / ln for ln in lines if ln and not ln.startswith("#")]
        if not paths:
            raise ValueError(f"--videos {p}: the list holds no paths")
        return paths
    raise FileNotFoundError(f"--videos {p}: no such folder or list file")


def read_captions(path, videos: list) -> list:
    """One caption per video, in the order of ``videos``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--captions {p}: no such file")
    text = p.read_text(encoding="utf-8")
    if p.suffix in (".json", ".jsonl"):
        try:
            if p.suffix == ".json":
                table = json.loads(text)
            else:
                rows = [json.loads(ln) for ln in text.splitlines() if ln.strip()]
                table = {r["video"]: r["caption"] for r in rows}
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"--captions {p}: expected {{video: caption}} JSON or JSONL rows "
                             f"{{\"video\", \"caption\"}} ({e})") from None
        out = []
        for v in videos:
            caption = table.get(v.name, table.get(v.stem, table.get(str(v))))
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(f"--captions {p} has no caption for {v.name} (keys are file names or stems)")
            out.append(caption.strip())
        return out
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) != len(videos):
        raise ValueError(f"--captions {p}: {len(lines)} caption lines for {len(videos)} videos; a text file holds one "
                         "caption per video, in the order of the videos")
    return lines


def check_geometry(vae, frames: int, height: int, width: int):
    st, sh, sw = vae.stride
    if frames < 1 or (frames - 1) % st or height % sh or width % sw or height < sh or width < sw:
        raise ValueError(f"--frames {frames} --height {height} --width {width}: the VAE needs frames = 1 + {st}k and "
                         f"height, width multiples of {sh}, {sw} (e.g. 81 x 480 x 832)")


def encoded_samples(videos, captions, vae, encoder, args, device, counts):
    """Yields shard samples; unreadable or too short videos are logged and counted."""
    from megadistill.data.video_io import frames_to_tensor, read_video, resize_center_crop

    dtype = DTYPES[args.dtype]
    for video, caption in zip(videos, captions):
        try:
            frames = read_video(video, max_frames=args.frames)
            if len(frames) < args.frames:
                raise ValueError(f"has {len(frames)} frames, fewer than --frames {args.frames}")
        except (OSError, ValueError, RuntimeError) as e:
            counts["skipped"] += 1
            log.warning("skipping %s: %s", video, e)
            continue
        clip = frames_to_tensor(resize_center_crop(frames, args.height, args.width))
        with torch.no_grad():
            latents = vae.encode(clip[None].to(device))[0]
            states, lens = encoder.encode([caption])
        counts["written"] += 1
        yield {"latents": latents.to(dtype).cpu(), "text_states": states[0, : int(lens[0])].to(dtype).cpu(),
               "prompt": caption}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--videos", required=True, help="folder of videos / frame folders, or a file listing paths")
    p.add_argument("--captions", required=True, help=".json {name: caption}, .jsonl, or one caption a line")
    p.add_argument("--vae", required=True, help="Wan VAE: diffusers folder or Wan2.1_VAE.pth")
    p.add_argument("--text-encoder", required=True, help="text encoder folder (diffusers or Wan native) or 'tiny'")
    p.add_argument("--out", required=True, help="output folder of the shards")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--samples-per-shard", type=int, default=64)
    p.add_argument("--text-len", type=int, default=512, help="token limit of the captions (Wan: 512)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="stored dtype of latents and text states")
    p.add_argument("--device", default=None, help="default cuda if available, else cpu")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from megadistill.checkpoint import CheckpointError
    from megadistill.data.latents import write_latent_shards

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    a = parse_args(argv)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    counts = {"written": 0, "skipped": 0}
    start = time.time()
    try:
        from megadistill.models.wan.family import load_text_encoder
        from megadistill.models.wan.vae import WanVAE

        videos = list_videos(a.videos)
        captions = read_captions(a.captions, videos)
        vae = WanVAE.from_pretrained(a.vae, device=device).eval()
        check_geometry(vae, a.frames, a.height, a.width)
        encoder = load_text_encoder(a.text_encoder, device, text_len=a.text_len)
        shards = write_latent_shards(encoded_samples(videos, captions, vae, encoder, a, device, counts), a.out,
                                     a.samples_per_shard, overwrite=a.overwrite)
    except (CheckpointError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {counts['written']} samples in {len(shards)} shards to {a.out} ({counts['skipped']} videos skipped, "
          f"latents {list(vae.latent_shape(a.frames, a.height, a.width))}, {time.time() - start:.1f} s)")
    return 1 if counts["skipped"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""tools/preprocess.py, tools/export.py (plain and DeepSpeed ZeRO-2/3 checkpoints), launch/sample.py,
megadistill.train.sampling and megadistill.data.video_io, on tiny models."""
import importlib.util
import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from megadistill.checkpoint import CheckpointError
from megadistill.config import config_from_dict, config_to_dict
from megadistill.data.latents import LatentShardStream
from megadistill.data.video_io import (frames_to_tensor, latents_to_preview, read_video, resize_center_crop,
                                       write_video)
from megadistill.diffusion import FlowMatchScheduler, denoising_step_list, guided_prediction, ode_sample, sde_sample
from megadistill.models.wan import WanDiT, get_preset, init_weights
from megadistill.models.wan.keys import native_to_diffusers
from megadistill.train.sampling import Guidance, noise_for, sample_video

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "models"))
from _tiny_assets import build_tiny_vae, save_diffusers_vae, tiny_text_encoder_pipeline  # noqa: E402


def load_tool(rel):
    spec = importlib.util.spec_from_file_location("tool_" + Path(rel).stem, ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


export = load_tool("tools/export.py")
preprocess = load_tool("tools/preprocess.py")
sample = load_tool("launch/sample.py")

TEXT_LEN = 16
LATENT = [16, 2, 4, 4]


def run_config_dict():
    d = {"recipe": {"family": "wan", "method": "dmd2"},
         "models": {"student": {"preset": "tiny"}, "teacher": {"preset": "tiny"}, "critic": {"preset": "tiny"}},
         "training": {"ema": {"decay": 0.9}},
         "pipeline_config": {"latent_shape": LATENT, "text_len": TEXT_LEN, "flow_shift": 5.0, "text_encoder": "tiny"},
         "method_config": {"denoising_steps": [1000, 750, 500, 250], "warp_denoising_step": True},
         "data": {"kind": "synthetic"}}
    return config_to_dict(config_from_dict(d))  # the resolved form the trainer writes into meta.json


def tiny_dit(seed):
    return init_weights(WanDiT(get_preset("tiny").replace(text_len=TEXT_LEN)), seed=seed)


def params_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    vae = save_diffusers_vae(build_tiny_vae(seed=0), root / "vae")
    text = tiny_text_encoder_pipeline(root / "text")
    return {"vae": vae, "text": text}


@pytest.fixture(scope="module")
def plain_checkpoint(tmp_path_factory):
    """A training checkpoint written by the trainer's own writer, roles as plain modules."""
    from megadistill.methods.roles import EMA, RoleHandle
    from megadistill.train.checkpoint import save_training_checkpoint

    out = tmp_path_factory.mktemp("run")
    handles = {}
    for i, name in enumerate(("student", "critic")):
        m = tiny_dit(seed=10 + i)
        ema = EMA(m, 0.5) if name == "student" else None
        if ema is not None:
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(0.25)  # the average now differs from the live weights
            ema.update(step=5)
        handles[name] = RoleHandle(name=name, module=m, trainable=True,
                                   optimizer=torch.optim.AdamW(m.parameters()), ema=ema)
    step = save_training_checkpoint(out, 7, handles, {"step": 7}, run_config_dict())
    return {"dir": step, "run": out, "student": params_of(handles["student"].module),
            "critic": params_of(handles["critic"].module), "student_ema": dict(handles["student"].ema.shadow)}


# --- export -------------------------------------------------------------------------------------------

def assert_diffusers_equal(folder, expected):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel.from_pretrained(str(folder))
    got = model.state_dict()
    assert len(got) == len(expected)
    for name, t in expected.items():
        assert torch.equal(got[native_to_diffusers(name)], t), name


def test_export_plain_checkpoint(plain_checkpoint, tmp_path, capsys):
    ck = plain_checkpoint
    assert export.main(["--checkpoint", str(ck["run"]), "--role", "student", "--to", "diffusers",
                        "--dst", str(tmp_path / "st")]) == 0
    assert "exported student of step 7 (safetensors, config from models.student.preset 'tiny')" in capsys.readouterr().out
    assert_diffusers_equal(tmp_path / "st", ck["student"])

    assert export.main(["--checkpoint", str(ck["dir"]), "--role", "student_ema", "--to", "native",
                        "--dst", str(tmp_path / "ema"), "--dtype", "bf16"]) == 0
    model = WanDiT.from_pretrained(tmp_path / "ema")
    assert model.config == get_preset("tiny").replace(text_len=TEXT_LEN)
    for n, t in model.state_dict().items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, ck["student_ema"][n].bfloat16()), n
    assert not torch.equal(ck["student_ema"]["head.head.weight"], ck["student"]["head.head.weight"])

    assert export.main(["--checkpoint", str(ck["dir"]), "--role", "critic", "--to", "megadistill", "--tp", "2",
                        "--dst", str(tmp_path / "critic")]) == 0
    assert all(torch.equal(a, ck["critic"][n]) for n, a in WanDiT.from_pretrained(tmp_path / "critic").state_dict().items())

    capsys.readouterr()
    assert export.main(["--checkpoint", str(ck["dir"]), "--role", "student", "--to", "native",
                        "--dst", str(tmp_path / "st")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert export.main(["--checkpoint", str(ck["dir"]), "--role", "critic_ema", "--to", "native",
                        "--dst", str(tmp_path / "x")]) == 2
    assert "no EMA of role 'critic'" in capsys.readouterr().err
    assert export.main(["--checkpoint", str(tmp_path), "--role", "student", "--to", "native",
                        "--dst", str(tmp_path / "x")]) == 2
    assert "not a megadistill training checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _zero_worker(rank, world, port, out, config_dict):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import deepspeed

    from megadistill.methods.roles import RoleHandle
    from megadistill.train.checkpoint import save_training_checkpoint

    from megadistill.distributed.deepspeed_comm import init_deepspeed_comm
    init_deepspeed_comm("gloo")
    handles, refs = {}, {}
    g = torch.Generator().manual_seed(rank)  # ranks see different data, as in data-parallel training
    for i, (name, stage) in enumerate((("student", 3), ("critic", 2))):
        model = tiny_dit(seed=20 + i)
        cfg = {"zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
               "zero_force_ds_cpu_optimizer": False, "train_micro_batch_size_per_gpu": 1}
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                          config=cfg)
        for _ in range(2):
            x = torch.randn(1, *LATENT, generator=g)
            loss = engine(x, torch.tensor([500.0]), torch.randn(1, 5, 64, generator=g)).pow(2).mean()
            engine.backward(loss)
            engine.step()
        handles[name] = RoleHandle(name=name, module=None, trainable=True, engine=engine)
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            refs[name] = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    save_training_checkpoint(out, 2, handles, {"step": 2}, config_dict)
    if rank == 0:
        for name, ref in refs.items():
            save_file(ref, str(Path(out) / f"ref_{name}.safetensors"))


def test_export_deepspeed_zero3_and_zero2_checkpoints(tmp_path):
    import torch.multiprocessing as mp
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    mp.start_processes(_zero_worker, args=(2, _free_port(), str(tmp_path), run_config_dict()), nprocs=2, join=True,
                       start_method="fork")
    step = tmp_path / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in (step / "student" / "state").glob("zero_pp_rank_*")) == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    ref3, ref2 = load_file(str(tmp_path / "ref_student.safetensors")), load_file(str(tmp_path / "ref_critic.safetensors"))
    assert not torch.equal(ref3["head.head.weight"], tiny_dit(20).head.head.weight)  # training moved the weights

    # our weights_only merge equals DeepSpeed's own (which unpickles; fine on files this test wrote)
    ours = dict(export.iter_engine_state_dict(step / "student" / "state"))
    theirs = get_fp32_state_dict_from_zero_checkpoint(str(step / "student"), tag="state")
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)

    assert export.main(["--checkpoint", str(tmp_path), "--role", "student", "--to", "diffusers",
                        "--dst", str(tmp_path / "student_diffusers")]) == 0
    assert_diffusers_equal(tmp_path / "student_diffusers", ref3)
    assert export.main(["--checkpoint", str(step), "--role", "critic", "--to", "native",
                        "--dst", str(tmp_path / "critic_native")]) == 0
    got = WanDiT.from_pretrained(tmp_path / "critic_native").state_dict()
    assert all(torch.equal(got[n], t) for n, t in ref2.items()) and len(got) == len(ref2)

    (step / "student" / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CheckpointError, match="model and 1 optimizer state files"):
        dict(export.iter_engine_state_dict(step / "student" / "state"))


# --- sampling -------------------------------------------------------------------------------------------

def test_sample_video_guidance_matches_manual_combination():
    sched = FlowMatchScheduler(1000, 5.0)
    ts = denoising_step_list([1000, 750, 500, 250], warp=True, shift=5.0)
    noise = noise_for(0, (2, 4, 2, 3, 3), seed=1)
    cond = lambda x, t: 0.5 * x + t.float().view(-1, 1, 1, 1, 1) / 1000  # noqa: E731
    uncond = lambda x, t: -0.25 * x  # noqa: E731
    for conv, s in (("cfg", 4.0), ("dmd", 3.0)):
        manual = ode_sample(lambda x, t: guided_prediction(cond(x, t), uncond(x, t), s, conv), noise, ts, sched)
        assert torch.equal(sample_video(cond, noise, ts, sched, "ode", guidance=Guidance(uncond, s, conv)), manual)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(sample_video(cond, noise, ts, sched, "sde", generator=g1), sde_sample(cond, noise, ts, sched, g2))
    calls = []
    sample_video(cond, noise, ts, sched, guidance=Guidance(lambda x, t: calls.append(1) or x, 0.0, "dmd"))
    assert calls == []  # dmd scale 0 (= cfg 1) is the conditional prediction: no unconditional call
    with pytest.raises(ValueError, match="guidance convention"):
        Guidance(uncond, 2.0, "classifier")
    with pytest.raises(ValueError, match="sampler 'euler'"):
        sample_video(cond, noise, ts, sched, "euler")


def test_launch_sample_from_checkpoint_and_exported_model(plain_checkpoint, assets, tmp_path, capsys):
    common = ["--prompts", "a red fox in the snow", "--steps", "1000,750,500,250", "--seed", "4"]
    assert sample.main(["--checkpoint", str(plain_checkpoint["run"]), *common, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "sampled 1 videos from student of" in out and "frames/s" in out and "4 model calls each" in out
    lat = load_file(str(tmp_path / "a" / "sample_0000.safetensors"))["latents"]
    assert lat.shape == tuple(LATENT)

    # the same numbers by hand: noise of (seed, index), warped steps, SDE sampling, tiny text encoder
    from megadistill.models.wan.family import load_text_encoder
    model = tiny_dit(0)
    model.load_state_dict(plain_checkpoint["student"])
    text, _ = load_text_encoder("tiny", "cpu", text_len=TEXT_LEN, text_dim=64).encode(["a red fox in the snow"])
    ts = denoising_step_list([1000, 750, 500, 250], warp=True, shift=5.0)
    with torch.no_grad():
        want = sample_video(lambda x, t: model(x, t, text), noise_for(0, LATENT, 4)[None], ts,
                            FlowMatchScheduler(1000, 5.0), "sde",
                            generator=torch.Generator("cpu").manual_seed(4 * 1_000_003))
    assert torch.equal(lat, want[0])
    gif = read_video(tmp_path / "a" / "sample_0000.gif")
    preview = latents_to_preview(lat)  # Pillow stores identical consecutive frames once
    assert preview.shape == (2, 32, 32, 3) and np.array_equal(gif, preview[: len(gif)])
    meta = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert meta["samples"][0]["prompt"] == "a red fox in the snow" and meta["sampler"] == "sde"

    # an exported model, guidance, several prompts in batches, previews decoded by a VAE
    assert export.main(["--checkpoint", str(plain_checkpoint["dir"]), "--to", "diffusers", "--dst",
                        str(tmp_path / "exp")]) == 0
    (tmp_path / "p.txt").write_text("a red fox in the snow\n# comment\nwaves on black rocks\nrain on a street\n")
    args = ["--prompts", str(tmp_path / "p.txt"), "--num-steps", "3", "--guidance-scale", "3",
            "--guidance-convention", "dmd", "--text-encoder", "tiny", "--latent-shape", "16", "2", "2", "2",
            "--seed", "1"]
    assert sample.main(["--checkpoint", str(tmp_path / "exp"), *args, "--batch-size", "2",
                        "--vae", str(assets["vae"]), "--out", str(tmp_path / "b")]) == 0
    assert "6 model calls each" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "sample_0000.gif", "sample_0000.safetensors", "sample_0001.gif", "sample_0001.safetensors",
        "sample_0002.gif", "sample_0002.safetensors", "samples.json"]
    assert read_video(tmp_path / "b" / "sample_0002.gif").shape == (5, 16, 16, 3)  # 1 + 4 * (2 - 1) frames
    # ODE sampling is batch-independent: the training checkpoint one prompt at a time gives the same latents
    assert sample.main(["--checkpoint", str(plain_checkpoint["dir"]), *args, "--out", str(tmp_path / "c")]) == 0
    for i in range(3):
        a = load_file(str(tmp_path / "b" / f"sample_{i:04d}.safetensors"))["latents"]
        c = load_file(str(tmp_path / "c" / f"sample_{i:04d}.safetensors"))["latents"]
        assert (a - c).abs().max() <= 1e-4 * a.abs().max(), i  # float32 batched vs single matmuls

    capsys.readouterr()
    assert sample.main(["--checkpoint", str(tmp_path / "exp"), *args, "--causal", "--out", str(tmp_path / "d")]) == 2
    assert "--causal" in capsys.readouterr().err
    assert sample.main(["--checkpoint", str(tmp_path / "exp"), "--prompts", "x", "--num-steps", "2",
                        "--out", str(tmp_path / "d")]) == 2
    assert "--latent-shape" in capsys.readouterr().err


# --- preprocess and video I/O ---------------------------------------------------------------------------

def _palette_video(seed, frames, h=20, w=28):
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)  # <= 256 colours: GIFs keep them exactly
    return palette[rng.integers(0, 16, (frames, h, w))]


def test_video_io_round_trip_and_errors(tmp_path):
    v = _palette_video(0, 4)
    write_video(v, tmp_path / "v.gif", fps=8)
    assert np.array_equal(read_video(tmp_path / "v.gif"), v) and read_video(tmp_path / "v.gif", 2).shape[0] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["v.gif"]
    x = frames_to_tensor(v)
    assert x.shape == (3, 4, 20, 28) and x.min() >= -1 and x.max() <= 1
    assert resize_center_crop(v, 16, 16).shape == (4, 16, 16, 3)
    try:
        import imageio  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="imageio-ffmpeg"):
            write_video(v, tmp_path / "v.mp4")
        (tmp_path / "clip.mp4").write_bytes(b"\x00")
        with pytest.raises(RuntimeError, match="imageio-ffmpeg"):
            read_video(tmp_path / "clip.mp4")
    with pytest.raises(ValueError, match="uint8"):
        write_video(v.astype(np.float32), tmp_path / "w.gif")
    p1, p2 = latents_to_preview(torch.ones(16, 2, 3, 3)), latents_to_preview(torch.ones(16, 2, 3, 3))
    assert p1.shape == (2, 24, 24, 3) and np.array_equal(p1, p2)


def test_preprocess_tool_writes_readable_shards(assets, tmp_path, capsys):
    from megadistill.models.wan.text_encoder import WanTextEncoder
    from megadistill.models.wan.vae import WanVAE

    videos = tmp_path / "videos"
    videos.mkdir()
    clips = {"a.gif": _palette_video(1, 6), "b.gif": _palette_video(2, 5), "short.gif": _palette_video(3, 3)}
    for name, v in clips.items():
        write_video(v, videos / name)
    (videos / "c").mkdir()  # a folder of PNG frames
    from PIL import Image
    frames_c = _palette_video(4, 5)
    for i, f in enumerate(frames_c):
        Image.fromarray(f).save(videos / "c" / f"{i:03d}.png")
    captions = {"a": "a red fox in the snow", "b.gif": "waves on black rocks", "c": "rain on a street",
                "short": "too short"}
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    argv = ["--videos", str(videos), "--captions", str(tmp_path / "captions.json"), "--vae", str(assets["vae"]),
            "--text-encoder", str(assets["text"]), "--out", str(tmp_path / "shards"), "--frames", "5",
            "--height", "16", "--width", "16", "--samples-per-shard", "2", "--text-len", "24"]
    assert preprocess.main(argv) == 1  # one video skipped
    assert "wrote 3 samples in 2 shards" in capsys.readouterr().out

    vae = WanVAE.from_pretrained(assets["vae"])
    enc = WanTextEncoder.from_pretrained(assets["text"], text_len=24)
    batch = next(LatentShardStream(tmp_path / "shards", batch_size=3, seed=0))
    assert sorted(batch["prompts"]) == sorted(["a red fox in the snow", "waves on black rocks", "rain on a street"])
    source = {"a red fox in the snow": clips["a.gif"], "waves on black rocks": clips["b.gif"],
              "rain on a street": frames_c}
    for i, prompt in enumerate(batch["prompts"]):
        video = frames_to_tensor(resize_center_crop(source[prompt][:5], 16, 16))
        with torch.no_grad():
            want = vae.encode(video[None])[0]
        states, lens = enc.encode([prompt])
        n = int(batch["text_lens"][i])
        assert batch["latents"][i].shape == (16, 2, 2, 2) and torch.equal(batch["latents"][i], want)
        assert n == int(lens[0]) and torch.equal(batch["text_states"][i, :n], states[0, :n])

    capsys.readouterr()
    assert preprocess.main(argv) == 2  # shards exist
    assert "--overwrite" in capsys.readouterr().err
    assert preprocess.main([*argv[:-10], "--frames", "6", "--height", "16", "--width", "16", "--overwrite"]) == 2
    assert "frames = 1 + 4k" in capsys.readouterr().err

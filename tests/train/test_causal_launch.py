"""The causal methods through the real entry point on CPU: self-forcing DMD (single process, and
2 ranks with DeepSpeed ZeRO-3 on gloo) and ODE-init on pairs written by tools/generate_ode_pairs.py."""
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys

import pytest

from _dist_spawn import spawn
from _tiny_run import ROOT

LAUNCH = os.path.join(ROOT, "launch", "pretrain_dmd.py")
DS_CONFIG = os.path.join(ROOT, "configs", "ds", "zero3_cpu.json")


def load_file(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def records(output_dir):
    return [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]


def common(output_dir, steps=3):
    return ["--output_dir", str(output_dir), "--max_steps", str(steps), "--set", "logging.log_every=1",
            "--set", "checkpoint.every=100"]


def check_losses(recs, keys, steps=3):
    assert [r["step"] for r in recs] == list(range(1, steps + 1))
    for key in keys:
        values = [r[key] for r in recs if key in r]
        assert values and all(math.isfinite(v) and v > 0 for v in values), (key, recs)


def test_self_forcing_single_process(tmp_path):
    out = tmp_path / "sf"
    main = load_file("pretrain_dmd_sf", LAUNCH).main
    rc = main(["--config", os.path.join(ROOT, "configs", "tiny_self_forcing.yaml"), *common(out),
               "--set", "method_config.generator_update_interval=2", "--set", "method_config.context_noise=100"])
    assert rc == 0
    recs = records(out)
    check_losses(recs, ["critic_loss", "generator_loss"])
    # the two time-scale rule: the generator updates at steps 0 and 2 (logged as 1 and 3)
    assert ["generator_loss" in r for r in recs] == [True, False, True]
    assert all(r["rollout_frames"] == 6 for r in recs if "generator_loss" in r)


def test_self_forcing_with_the_gan_term(tmp_path):
    """DMD2's GAN term in self-forcing: the critic's classifier sees real clips of the synthetic
    world against the rollout's DMD window, and the generator loss carries its term."""
    out = tmp_path / "sf_gan"
    main = load_file("pretrain_dmd_sf_gan", LAUNCH).main
    rc = main(["--config", os.path.join(ROOT, "configs", "tiny_self_forcing.yaml"), *common(out),
               "--set", "method_config.generator_update_interval=2", "--set", "models.critic.realism_head=true",
               "--set", "method_config.gan_generator_weight=1e-2", "--set", "method_config.gan_critic_weight=1e-1",
               "--set", "method_config.gan_max_timestep=300"])
    assert rc == 0
    recs = records(out)
    check_losses(recs, ["critic_loss", "generator_loss", "gan_critic_loss", "gan_generator_loss"])
    assert all(0 < r["realism_real_prob"] < 1 for r in recs)


def test_ode_init_single_process_on_generated_pairs(tmp_path):
    pairs = tmp_path / "pairs"
    tool = load_file("generate_ode_pairs_launch", os.path.join(ROOT, "tools", "generate_ode_pairs.py"))
    prompts = os.path.join(ROOT, "configs", "prompts", "example_prompts.txt")
    assert tool.main(["--teacher", "tiny", "--prompts", prompts, "--text-encoder", "tiny", "--latent-shape", "16",
                      "6", "8", "8", "--num-steps", "4", "--keep-steps", "1000,750,500,250", "--warp",
                      "--out", str(pairs)]) == 0
    out = tmp_path / "ode"
    main = load_file("pretrain_dmd_ode", LAUNCH).main
    assert main(["--config", os.path.join(ROOT, "configs", "tiny_ode_init.yaml"), *common(out),
                 "--set", f"data.path={pairs}"]) == 0
    check_losses(records(out), ["loss"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_self_forcing_two_ranks_zero3(tmp_path):
    out = tmp_path / "sf_ds"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "--no_local_rank", LAUNCH, "--ds_config", DS_CONFIG,
           "--config", os.path.join(ROOT, "configs", "tiny_self_forcing.yaml"), *common(out),
           "--set", "training.micro_batch_size=1", "--set", "method_config.generator_update_interval=2",
           "--set", "training.ema={decay: 0.9, start_step: 1}"]
    p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    recs = records(out)
    check_losses(recs, ["critic_loss", "generator_loss", "generator_grad_norm", "critic_grad_norm"])


@pytest.fixture(autouse=True)
def _no_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_sample_causal_streams_past_the_training_length(tmp_path, capsys):
    """launch/sample.py --causal on a windowed student: 4 blocks of 2 frames with a 4-frame window
    (the cache holds 2 blocks, so it wraps), equal to a plain forward_block loop."""
    import torch
    from safetensors.torch import load_file as load_st

    from megadistill.diffusion import FlowMatchScheduler, denoising_step_list
    from megadistill.models.wan import get_preset, init_weights
    from megadistill.models.wan.causal import CausalWanDiT
    from megadistill.models.wan.family import load_text_encoder
    from megadistill.train.sampling import noise_for

    model = init_weights(CausalWanDiT(get_preset("tiny"), num_frame_per_block=2, local_window_frames=4), seed=5)
    model.save_pretrained(tmp_path / "student")
    sample = load_file("sample_causal", os.path.join(ROOT, "launch", "sample.py"))
    out = tmp_path / "samples"
    with torch.enable_grad():  # sample.main turns grad off process-wide; restore it on the way out
        rc = sample.main(["--checkpoint", str(tmp_path / "student"), "--prompts", "a red ball", "--causal",
                          "--steps", "1000,750,500", "--warp", "--text-encoder", "tiny", "--latent-shape", "16", "4",
                          "4", "4", "--num-frames", "8", "--num-frame-per-block", "2", "--local-attn-size", "4",
                          "--context-noise", "100", "--seed", "3", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "frames/s" in printed and "first block after" in printed
    got = load_st(str(out / "sample_0000.safetensors"))["latents"]
    assert got.shape == (16, 8, 4, 4)
    # The same video from a plain loop over forward_block.
    encoder = load_text_encoder("tiny", "cpu", text_len=model.config.text_len, text_dim=model.config.text_dim)
    text, _ = encoder.encode(["a red ball"])
    sched = FlowMatchScheduler(1000, 5.0)
    steps = denoising_step_list([1000, 750, 500], warp=True, shift=5.0)
    x_all = noise_for(0, (16, 8, 4, 4), 3)[None]
    g = torch.Generator().manual_seed(3 * 1_000_003)
    cache = model.new_cache(1, 8)
    blocks = []
    with torch.no_grad():
        for s in range(0, 8, 2):
            x = x_all[:, :, s:s + 2]
            for j, t in enumerate(steps):
                tb = t.expand(1).clone()
                x0 = sched.x0_from_flow(x, model.forward_block(x, tb, text, cache, s), tb)
                if j + 1 < len(steps):
                    x = sched.add_noise(x0, torch.randn(x0.shape, generator=g), steps[j + 1].expand(1))
            blocks.append(x0)
            if s + 2 < 8:
                tc = torch.full((1,), 100.0, dtype=torch.float64)
                model.forward_block(sched.add_noise(x0, torch.randn(x0.shape, generator=g), tc), tc, text, cache, s)
    assert cache.evicted
    torch.testing.assert_close(got, torch.cat(blocks, dim=2)[0], rtol=1e-5, atol=1e-6)
    with torch.enable_grad():
        assert sample.main(["--checkpoint", str(tmp_path / "student"), "--prompts", "x", "--causal", "--num-steps",
                            "4", "--text-encoder", "tiny", "--latent-shape", "16", "4", "4", "4", "--out", str(out)]) == 2


def _zero3_block_worker(rank, world):
    """Rank's view: the cached-path rollout of a causal student held by a ZeRO-3 engine (every
    parameter partitioned) equals the plain module's, forward and full gradients."""
    import deepspeed
    import torch
    from deepspeed.utils import safe_get_full_grad

    import megadistill.distributed as md
    from megadistill.diffusion import FlowMatchScheduler
    from megadistill.methods import RoleHandle
    from megadistill.methods.causal_rollout import block_rollout
    from megadistill.models.wan import get_preset, init_weights
    from megadistill.models.wan.adapter import WanAdapter
    from megadistill.models.wan.causal import CausalWanDiT

    torch.set_grad_enabled(True)
    md.initialize(backend="gloo")
    from megadistill.distributed.deepspeed_comm import init_deepspeed_comm
    init_deepspeed_comm("gloo")
    adapter = WanAdapter(None, FlowMatchScheduler(1000, 5.0), latent_shape=(16, 6, 4, 4))
    g = torch.Generator().manual_seed(0)
    noise, text, weight = torch.randn(1, 16, 6, 4, 4, generator=g), torch.randn(1, 8, 64, generator=g), \
        torch.randn(1, 16, 6, 4, 4, generator=g)
    steps = torch.tensor([1000.0, 750.0, 500.0, 250.0], dtype=torch.float64)

    def rollout(handle):
        out = block_rollout(adapter, handle, {"text_states": text}, noise, steps, (2, 1, 3), grad_from_block=0,
                            context_timestep=100.0, generator=torch.Generator().manual_seed(1))
        return out, (out * weight).sum()

    def build():
        return init_weights(CausalWanDiT(get_preset("tiny"), num_frame_per_block=2), seed=1)

    reference = build()
    ref_out, ref_loss = rollout(reference)
    ref_loss.backward()
    model = build()
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                      config=config, mpu=md.mpu)
    assert all(p.data.numel() == 0 for p in engine.module.parameters())  # all partitioned
    out, loss = rollout(RoleHandle("student", None, True, engine=engine))
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    engine.backward(loss)  # identical inputs on both ranks: the averaged gradient is the reference's
    for (name, p), ref in zip(engine.module.named_parameters(), reference.parameters()):
        # round-off scales with the gradient's size (up to ~17 here: 1.3e-5 off on an AVX2-only CPU)
        scale = max(1.0, ref.grad.abs().max().item())
        torch.testing.assert_close(safe_get_full_grad(p), ref.grad, rtol=1e-4, atol=2e-6 * scale, msg=name)


def test_cached_rollout_under_zero3_equals_one_process():
    spawn(_zero3_block_worker, 2)

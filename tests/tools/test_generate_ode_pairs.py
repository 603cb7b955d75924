"""tools/generate_ode_pairs.py: readable shards whose endpoint is the teacher's ODE sample and whose
states lie on that trajectory at the kept timesteps."""
import functools
import importlib.util
import json
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPE = [16, 4, 4, 4]


def tool():
    spec = importlib.util.spec_from_file_location("generate_ode_pairs", os.path.join(ROOT, "tools",
                                                                                     "generate_ode_pairs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(tmp_path, *extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\na blue cube rolling left\nthe green sphere\n")
    out = tmp_path / "pairs"
    args = ["--teacher", "tiny", "--teacher-seed", "4", "--prompts", str(prompts), "--text-encoder", "tiny",
            "--latent-shape", *map(str, SHAPE), "--num-steps", "6", "--keep-steps", "1000,750,500,250", "--warp",
            "--out", str(out), "--batch-size", "2", "--samples-per-shard", "2", "--seed", "1", *extra]
    return tool().main(args), out, prompts


@functools.lru_cache(maxsize=1)
def teacher_and_encoder():
    from megadistill.models.wan import WanDiT, get_preset, init_weights
    from megadistill.models.wan.family import load_text_encoder

    teacher = init_weights(WanDiT(get_preset("tiny")), seed=4).eval()
    return teacher, load_text_encoder("tiny", "cpu", text_len=teacher.config.text_len, text_dim=teacher.config.text_dim)


def teacher_sample(prompt_index, prompt, guidance=None):
    """The teacher's ODE sample of one prompt, computed here with the library's ODE sampler."""
    from megadistill.diffusion import FlowMatchScheduler, denoising_step_list, ode_sample, sample_timesteps_uniform
    from megadistill.train.sampling import Guidance, guided, noise_for

    teacher, encoder = teacher_and_encoder()
    sched = FlowMatchScheduler(1000, 5.0)
    keep = denoising_step_list([1000, 750, 500, 250], warp=True, shift=5.0)
    grid = torch.unique(torch.cat([sample_timesteps_uniform(6, shift=5.0), keep])).flip(0)
    text, _ = encoder.encode([prompt])
    predict = lambda x, t: teacher(x, t, text)  # noqa: E731
    if guidance is not None:
        neg, _ = encoder.encode([""])
        predict = guided(predict, Guidance(lambda x, t: teacher(x, t, neg), *guidance))
    noise = noise_for(prompt_index, SHAPE, 1)[None]
    with torch.no_grad():
        return ode_sample(predict, noise, grid, sched)[0], keep, grid, noise[0], predict


def read_all(out):
    from megadistill.data.latents import LatentShardStream

    stream = LatentShardStream(str(out), batch_size=3, seed=0)
    batch = next(stream)
    order = [int(k.rsplit(":", 1)[-1]) for k in batch["keys"]]
    return batch, order


def test_endpoint_is_the_teacher_ode_sample_and_states_lie_on_the_trajectory(tmp_path):
    from megadistill.diffusion import FlowMatchScheduler

    rc, out, prompts = run(tmp_path)
    assert rc == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    meta = json.loads((out / "ode_pairs.json").read_text())
    assert meta["num_samples"] == 3 and meta["keep_timesteps"] == pytest.approx([1000, 937.5, 833.3333, 625], abs=1e-3)
    batch, order = read_all(out)
    assert batch["ode_states"].shape == (3, 4, *SHAPE) and batch["ode_timesteps"].dtype == torch.float64
    lines = prompts.read_text().splitlines()
    for row, i in enumerate(order):
        endpoint, keep, grid, noise, predict = teacher_sample(i, lines[i])
        assert batch["prompts"][row] == lines[i]
        # float rounding only: the tool runs prompts in batches of 2 (text padded to the longer one)
        torch.testing.assert_close(batch["latents"][row], endpoint, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batch["ode_timesteps"][row], keep, rtol=0, atol=0)
        states = batch["ode_states"][row]
        torch.testing.assert_close(states[0], noise, rtol=0, atol=0)  # t = 1000 is the starting noise
        # Each kept state, integrated on over the rest of the grid, reaches the same endpoint.
        sched = FlowMatchScheduler(1000, 5.0)
        from megadistill.diffusion import ode_sample

        for k, t in enumerate(keep):
            rest = grid[grid <= t]
            with torch.no_grad():
                again = ode_sample(predict, states[k][None], rest, sched)[0]
            torch.testing.assert_close(again, endpoint, rtol=1e-5, atol=1e-5)


def test_guidance_is_applied_with_its_convention(tmp_path):
    rc, out, prompts = run(tmp_path, "--guidance-scale", "2.0", "--guidance-convention", "dmd")
    assert rc == 0
    batch, order = read_all(out)
    i = order[0]
    endpoint = teacher_sample(i, prompts.read_text().splitlines()[i], guidance=(2.0, "dmd"))[0]
    torch.testing.assert_close(batch["latents"][0], endpoint, rtol=1e-5, atol=1e-5)
    unguided = teacher_sample(i, prompts.read_text().splitlines()[i])[0]
    assert (unguided - batch["latents"][0]).abs().max() > 1e-3  # guidance changed the sample


@pytest.mark.parametrize("extra, message", [
    (["--guidance-scale", "3"], "convention"),
    (["--keep-steps", "1000,0"], "values > 0"),
    (["--teacher", "no-such-model"], "neither an existing checkpoint nor a preset"),
])
def test_bad_input_is_reported(tmp_path, capsys, extra, message):
    rc, out, _ = run(tmp_path, *extra)
    assert rc == 2 and message in capsys.readouterr().err
    assert not list(out.glob("*.tar")) if out.exists() else True

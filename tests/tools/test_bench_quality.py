"""tools/bench_quality.py end to end on a very short run, and the sampling library under it."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from megadistill.config import load_config
from megadistill.data.synthetic import SyntheticVideoWorld
from megadistill.diffusion import FlowMatchScheduler, sample_timesteps_uniform
from megadistill.eval.quality import build_adapter, eval_set, generate, load_role_model
from megadistill.train.quality_report import quality_bar, student_step_list

from _tool_loader import ROOT, load_tool

CONFIG = ROOT / "configs" / "tiny_dmd2_quality.yaml"
KEYS = {"real", "teacher_50", "teacher_4", "student_4", "noise_floor_fd", "wall_s"}
METRICS = {"fd", "adherence", "temporal_error"}


def test_bench_quality_short_run(tmp_path, monkeypatch, capsys):
    """Distill the shipped teacher for 2 steps through the launcher and measure 154 clips per set,
    the fewest with which FD_inf is extrapolated too."""
    monkeypatch.chdir(ROOT)  # the config's weight paths are relative to the repository root
    bench = load_tool("bench_quality")
    out_json = tmp_path / "quality.json"
    rc = bench.main(["--quick", "--max_steps", "2", "--samples", "154", "--teacher_steps", "6",
                     "--batch_size", "40", "--output_dir", str(tmp_path / "run"), "--json", str(out_json),
                     "--set", "training.micro_batch_size=2", "--threads", "1",
                     "--pairs", "4", "--warm_start_steps", "2", "--set_warm_start", "training.micro_batch_size=2"])
    assert rc == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert printed == json.loads(out_json.read_text())
    assert set(printed) == KEYS  # FD_inf goes to stderr only: the JSON keeps its shape
    fd_inf = [line for line in captured.err.splitlines() if line.startswith("FD_inf (")]
    assert len(fd_inf) == 1
    for name in ("real", "teacher_50", "teacher_4", "student_4"):
        assert f" {name} " in fd_inf[0]
    assert sum(line.endswith("(on FD_inf)") for line in captured.err.splitlines()) == 3
    for name in ("real", "teacher_50", "teacher_4", "student_4"):
        assert set(printed[name]) == METRICS
        assert all(math.isfinite(v) for v in printed[name].values()), (name, printed[name])
        assert 0.0 <= printed[name]["adherence"] <= 1.0
    assert printed["real"]["adherence"] == 1.0  # real clips show their captions
    assert printed["noise_floor_fd"] > 0 and printed["wall_s"] > 0
    # Both stages went through the launcher: 2 logged steps each, a final checkpoint with the student;
    # DMD2 started from the warm start's export.
    for stage in ("warm_start", "dmd2"):
        run = tmp_path / "run" / stage
        steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
        assert steps[-1] == 2, stage
        assert (run / "checkpoints" / "step_00000002" / "student.safetensors").is_file()
    assert (tmp_path / "run" / "ode_pairs" / "ode_pairs.json").is_file()
    dmd2_config = (tmp_path / "run" / "dmd2" / "config.yaml").read_text()
    assert str(tmp_path / "run" / "warm_student") in dmd2_config
    exported = load_file(str(tmp_path / "run" / "warm_student" / "diffusion_pytorch_model.safetensors"))
    trained = load_file(str(tmp_path / "run" / "warm_start" / "checkpoints" / "step_00000002" / "student.safetensors"))
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)


def test_bench_quality_refuses_a_warm_start_on_another_step_list(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    bench = load_tool("bench_quality")
    rc = bench.main(["--quick", "--output_dir", str(tmp_path), "--set_warm_start",
                     "method_config.warp_denoising_step=true"])
    assert rc == 2 and "differs from the DMD2 student's" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_student_step_list_is_the_methods():
    cfg = load_config(CONFIG)
    steps = student_step_list(cfg, FlowMatchScheduler(1000, 5.0))
    # [1000, 750, 500, 250] as they stand (warp_denoising_step: false) ...
    assert torch.allclose(steps, torch.tensor([1000.0, 750.0, 500.0, 250.0], dtype=torch.float64))
    # ... or warped onto the shift-5 grid (DESIGN.md).
    warped = load_config(CONFIG, ["method_config.warp_denoising_step=true"])
    assert torch.allclose(student_step_list(warped, FlowMatchScheduler(1000, 5.0)),
                          torch.tensor([1000.0, 937.5, 2500 / 3, 625.0], dtype=torch.float64))
    # The self-forcing student's list comes from its own method config, the same way.
    causal = load_config(ROOT / "configs" / "tiny_self_forcing_quality.yaml", ["method_config.warp_denoising_step=true"])
    assert torch.allclose(student_step_list(causal, FlowMatchScheduler(1000, 5.0)),
                          torch.tensor([1000.0, 937.5, 2500 / 3, 625.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="recipe.method 'finetune'"):
        student_step_list(load_config(ROOT / "configs" / "tiny_finetune.yaml"), FlowMatchScheduler(1000, 5.0))


def test_quality_bar_conditions():
    m = lambda fd, adh: {"fd": fd, "adherence": adh, "temporal_error": 0.1}  # noqa: E731
    good = {"teacher_50": m(10.0, 0.95), "teacher_4": m(100.0, 0.5), "student_4": m(10.5, 0.94)}
    assert all(quality_bar(good).values())
    bad = {"teacher_50": m(10.0, 0.95), "teacher_4": m(30.0, 0.5), "student_4": m(11.5, 0.90)}
    assert not any(quality_bar(bad).values())
    # Judged on other FD figures (FD_inf), the same rows pass where their own fd fails.
    verdict = quality_bar(bad, {"student_4": 4.0, "teacher_50": 4.0, "teacher_4": 20.0})
    assert verdict["student_fd <= 1.1 x teacher_50_fd"] and verdict["student_fd <= 0.3 x teacher_4_fd"]
    assert not verdict["student_adherence >= teacher_50_adherence - 0.02"]  # adherence is unchanged


def test_generate_does_not_depend_on_batching(monkeypatch):
    """Sample i is a function of (seed, i): ODE samples agree whatever the batch size."""
    monkeypatch.chdir(ROOT)
    cfg = load_config(CONFIG)
    model = load_role_model(cfg, "teacher")
    adapter = build_adapter(cfg, {"teacher": model})
    world = SyntheticVideoWorld(channels=16, frames=6, height=8, width=8, seed=0)
    captions = eval_set(world, 3, seed=5).captions
    ts = sample_timesteps_uniform(3, shift=5.0)
    a = generate(model, adapter, captions, ts, "ode", world.latent_shape, seed=1, guidance_scale=3.0, batch_size=3)
    b = generate(model, adapter, captions, ts, "ode", world.latent_shape, seed=1, guidance_scale=3.0, batch_size=2)
    # Batch size changes only the matmul kernels' round-off (up to ~2e-5 here on an AVX2-only CPU);
    # noise that depended on the batch would differ by O(1).
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    c = generate(model, adapter, captions, ts, "ode", world.latent_shape, seed=2, guidance_scale=3.0, batch_size=3)
    assert not torch.allclose(a, c)
    with pytest.raises(ValueError, match="sampler"):
        generate(model, adapter, captions, ts, "euler", world.latent_shape, seed=1)


def test_launcher_prints_the_quality_report_at_the_end(tmp_path, monkeypatch, capsys):
    """logging.quality_samples: the DMD2 run itself ends with the report (the README's main job)."""
    monkeypatch.chdir(ROOT)
    from launch.pretrain_dmd import main as launch_main

    out = tmp_path / "run"
    rc = launch_main(["--config", str(CONFIG), "--output_dir", str(out), "--max_steps", "2",
                      "--set", "training.micro_batch_size=2", "--set", "logging.quality_samples=4"])
    assert rc == 0
    report = json.loads((out / "quality.json").read_text())
    assert set(report) == KEYS
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("quality report (")]
    assert len(printed) == 1 and json.loads(printed[0].split(": ", 1)[1]) == report
    assert report["real"]["adherence"] == 1.0
    assert all(math.isfinite(report[row]["fd"]) for row in ("teacher_50", "teacher_4", "student_4"))

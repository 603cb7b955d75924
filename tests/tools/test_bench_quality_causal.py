"""tools/bench_quality_causal.py end to end on a very short run, and the causal sampling under it."""
import json
import math

import pytest
import torch

from megadistill.config import load_config
from megadistill.data.synthetic import SyntheticVideoWorld
from megadistill.eval.causal_quality import causal_bar, generate_causal, world_of_length
from megadistill.eval.quality import build_adapter, eval_set, load_role_model

from _tool_loader import ROOT, load_tool

SF_CONFIG = ROOT / "configs" / "tiny_self_forcing_quality.yaml"
METRICS = {"fd", "adherence", "temporal_error"}


def test_bench_quality_causal_short_run(tmp_path, monkeypatch, capsys):
    """ODE pairs -> ODE-init -> self-forcing through the launcher, 2 steps each, 4 clips per set;
    the bidirectional FD is read from a bench_quality JSON."""
    monkeypatch.chdir(ROOT)  # the configs' weight paths are relative to the repository root
    bidirectional = tmp_path / "quality.json"
    bidirectional.write_text(json.dumps({"student_4": {"fd": 123.0, "adherence": 0.5, "temporal_error": 0.1}}))
    out_json = tmp_path / "causal.json"
    bench = load_tool("bench_quality_causal")
    rc = bench.main(["--quick", "--pairs", "4", "--teacher_steps", "3", "--ode_steps", "2", "--sf_steps", "2",
                     "--samples", "4", "--batch_size", "4", "--bidirectional_json", str(bidirectional),
                     "--output_dir", str(tmp_path / "run"), "--json", str(out_json), "--threads", "1",
                     "--set_ode", "training.micro_batch_size=2", "--set_sf", "training.micro_batch_size=2"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out_json.read_text())
    for name in ("causal_1x", "causal_2x"):
        assert set(printed[name]) == METRICS
        assert all(math.isfinite(v) for v in printed[name].values()), (name, printed[name])
        assert 0.0 <= printed[name]["adherence"] <= 1.0
    assert printed["bidirectional_student_fd"] == 123.0
    bar = printed["bar"]
    assert bar["fd_ratio_1x"] == pytest.approx(printed["causal_1x"]["fd"] / 123.0)
    assert bar["temporal_ratio_2x"] == pytest.approx(printed["causal_2x"]["temporal_error"]
                                                     / printed["causal_1x"]["temporal_error"])
    assert printed["noise_floor_fd"] > 0 and printed["wall_s"] > 0
    # Each stage ran: 4 ODE pairs, 2 logged steps of ODE-init and of self-forcing, the exported student.
    assert json.loads((tmp_path / "run" / "ode_pairs" / "ode_pairs.json").read_text())["num_samples"] == 4
    for stage in ("ode_init", "self_forcing"):
        steps = [json.loads(line)["step"] for line in (tmp_path / "run" / stage / "log.jsonl").read_text().splitlines()]
        assert steps[-1] == 2, stage
    assert (tmp_path / "run" / "ode_student" / "diffusion_pytorch_model.safetensors").is_file()


def test_bench_quality_causal_trains_its_own_bidirectional_student(tmp_path, monkeypatch, capsys):
    """Without --bidirectional_json the bidirectional student is warm-started on the run's own
    ODE pairs and DMD2-distilled, as tools/bench_quality.py does (2 steps each, 4 clips)."""
    monkeypatch.chdir(ROOT)
    bench = load_tool("bench_quality_causal")
    small = "training.micro_batch_size=2"
    rc = bench.main(["--quick", "--pairs", "4", "--teacher_steps", "3", "--ode_steps", "2", "--sf_steps", "2",
                     "--dmd2_steps", "2", "--dmd2_warm_start_steps", "2", "--samples", "4", "--batch_size", "4",
                     "--output_dir", str(tmp_path / "run"),
                     "--threads", "1", "--set_ode", small, "--set_sf", small, "--set_warm_start", small,
                     "--set_dmd2", small])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    bidirectional = printed["reference"]["bidirectional"]
    assert printed["bidirectional_student_fd"] == bidirectional["fd"] and math.isfinite(bidirectional["fd"])
    for stage in ("dmd2_warm_start", "dmd2"):
        steps = [json.loads(line)["step"] for line in (tmp_path / "run" / stage / "log.jsonl").read_text().splitlines()]
        assert steps[-1] == 2, stage
    assert str(tmp_path / "run" / "dmd2_warm_student") in (tmp_path / "run" / "dmd2" / "config.yaml").read_text()
    # One step list for the pairs, the warm start and the DMD2 student, checked before any work.
    rc = bench.main(["--quick", "--output_dir", str(tmp_path / "mismatch"), "--set_ode",
                     "method_config.warp_denoising_step=true"])
    assert rc == 2 and "differs from the DMD2 student's" in capsys.readouterr().err
    assert not any((tmp_path / "mismatch").iterdir())


def test_causal_bar():
    bar = causal_bar(fd_1x=110.0, temporal_1x=0.2, temporal_2x=0.29, bidirectional_fd=100.0)
    assert bar["fd_ratio_1x"] == pytest.approx(1.1) and bar["temporal_ratio_2x"] == pytest.approx(1.45)
    assert bar["met"] is True
    assert causal_bar(121.0, 0.2, 0.29, 100.0)["met"] is False      # FD above 1.2 x
    assert causal_bar(110.0, 0.2, 0.31, 100.0)["met"] is False      # drift above 1.5 x
    assert causal_bar(110.0, 0.2, 0.29, None)["met"] is False       # no bidirectional FD: not met


def test_world_of_length_changes_only_frames():
    world = SyntheticVideoWorld(channels=16, frames=6, height=8, width=8, seed=3)
    long = world_of_length(world, 12)
    assert long.config() == {**world.config(), "frames": 12}
    assert world_of_length(world, 6) is world
    assert torch.equal(long.signatures, world.signatures)  # same colours in latent space


def _student(window: int, sinks: int, frames: int):
    cfg = load_config(SF_CONFIG, [f"pipeline_config.local_attn_size={window}", f"pipeline_config.sink_size={sinks}",
                                  f"pipeline_config.latent_shape=[16,{frames},8,8]"])
    student = load_role_model(cfg, "student")
    return student, build_adapter(cfg, {"student": student})


def test_generate_causal_past_the_training_length(monkeypatch):
    """2F = 12 frames in blocks of 3 with a window of 6 frames + 3 sinks: blocks 0-2 see every earlier
    frame (so they equal the whole-prefix rollout from the same noise), block 3 (frames 9-11) no longer
    sees frames 3-5 (so it differs)."""
    monkeypatch.chdir(ROOT)
    world = SyntheticVideoWorld(channels=16, frames=12, height=8, width=8, seed=0)
    captions = eval_set(world, 2, seed=0).captions
    steps = torch.tensor([1000.0, 500.0])
    windowed, adapter = _student(6, 3, 12)
    full, full_adapter = _student(-1, 0, 12)
    a = generate_causal(windowed, adapter, captions, steps, world.latent_shape, seed=0, batch_size=2)
    b = generate_causal(full, full_adapter, captions, steps, world.latent_shape, seed=0, batch_size=2)
    assert a.shape == (2, 16, 12, 8, 8) and torch.isfinite(a).all()
    torch.testing.assert_close(a[:, :, :9], b[:, :, :9], rtol=1e-5, atol=1e-5)
    assert (a[:, :, 9:] - b[:, :, 9:]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="multiple"):
        generate_causal(windowed, adapter, captions, steps, (16, 10, 8, 8), seed=0)

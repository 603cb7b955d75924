"""The trainer with pipeline parallelism (parallel.pp = 2, gloo) equals the single-process run.

Tiny DMD2 (EMA on), 4 steps with generator_update_interval 2 (both phases run), dp = 1. Each rank
holds its stage's slice of every role.
* interleaved schedule: spawned ``build_run`` + ``Trainer`` (what ``launch/pretrain_dmd.py`` calls);
  the per-step logs (losses, grad norms, DMD statistics) of both ranks agree with the pp = 1 run
  within float32 round-off, the stages' final weights and EMA are slices of the pp = 1 ones, and
  resuming from its step-2 checkpoint (per-stage files) repeats steps 2-3 and the weights bit for bit.
* sequential schedule: the real entry point under the deepspeed launcher (2 CPU ranks); its
  ``log.jsonl`` losses agree with the pp = 1 run.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from _dist_spawn import spawn
from _tiny_run import ROOT, tiny_dmd2_dict

STEPS = 4
# Logged figures of the first step agree to RTOL; later steps are taken on weights that AdamW
# (beta1 = 0) may have moved by up to lr in elements whose gradient is round-off-sized (see
# assert_stage_weights), so they agree to RTOL_UPDATED (measured: 1.3e-5 on an AVX2-only CPU).
RTOL, ATOL = 1e-5, 1e-7
RTOL_UPDATED = 1e-4
MAX_LOOSE_FRACTION = 1e-2
LR = {"student": 1e-3, "critic": 2e-3}  # tiny_dmd2_dict's learning rates


def _config(output_dir, pp, schedule="interleaved", every=0, **parallel):
    from megadistill.config import config_from_dict

    d = tiny_dmd2_dict(output_dir, max_steps=STEPS, every=every)
    d["parallel"] = {"pp": pp, "pipeline_schedule": schedule, **parallel}
    d["logging"]["tensorboard"] = False
    return config_from_dict(d)


def _train(rank, world, output_dir, schedule, every, resume, result):
    from megadistill.train.builder import build_run
    from megadistill.train.trainer import Trainer

    run = build_run(_config(output_dir, world, schedule, every))
    if world > 1:
        names = set(run.bundle["student"].module.state_dict())
        assert ("head.head.weight" in names) == (rank == world - 1), sorted(names)[:5]
        assert ("patch_embedding.weight" in names) == (rank == 0)
    history = Trainer(run, output_dir, resume=resume, progress=False).fit()
    state = {role: {k: v.detach().clone() for k, v in run.bundle[role].module.state_dict().items()}
             for role in ("student", "critic")}
    state["ema"] = run.bundle["student"].ema.state_dict()
    torch.save({"history": history, "weights": state}, f"{result}.rank{rank}")


def train(tmp_path, tag, world, schedule="interleaved", every=0, resume=None, output_dir=None):
    result = str(tmp_path / tag)
    spawn(_train, world, str(output_dir or tmp_path / tag), schedule, every, resume, result)
    return [torch.load(f"{result}.rank{r}", weights_only=True) for r in range(world)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from megadistill.models.wan.family import load_text_encoder

    load_text_encoder("tiny", "cpu", text_len=16, text_dim=64)  # built once; the forked ranks inherit it
    (ref,) = train(tmp_path_factory.mktemp("pp1"), "pp1", world=1)
    history = dict(ref["history"])
    assert sorted(history) == list(range(STEPS))
    assert "generator_loss" in history[2] and "generator_loss" not in history[3]  # both phases ran
    return ref


def assert_same_history(got, ref, what, steps=None, exact=False):
    ref_hist, got_hist = dict(ref["history"]), dict(got["history"])
    assert sorted(got_hist) == sorted(steps or ref_hist), what
    for step in sorted(got_hist):
        assert sorted(got_hist[step]) == sorted(ref_hist[step]), (what, step)
        for key, value in ref_hist[step].items():
            want = value if exact else pytest.approx(value, rel=RTOL if step == 0 else RTOL_UPDATED, abs=ATOL)
            assert got_hist[step][key] == want, (what, step, key, got_hist[step][key], value)


def assert_stage_weights(stage_weights, ref_weights, what, exact=False):
    """Every tensor of a stage is the same-named tensor of the whole model. Across layouts to
    round-off, except that AdamW (beta1 = 0) divides each gradient element by its RMS, so an
    element whose gradient is round-off-sized may move by up to lr per update either way: such
    elements are rare (3.3e-3 of the critic's stage-0 elements on an AVX2-only CPU; at most
    MAX_LOOSE_FRACTION of them) and none moves further than that."""
    for role in ("student", "critic", "ema"):
        bound = 2 * LR["critic" if role == "critic" else "student"] * STEPS
        loose = total = 0
        for name, t in stage_weights[role].items():
            want = ref_weights[role][name]
            if exact:
                assert torch.equal(t, want), (what, role, name)
                continue
            diff = (t - want).abs()
            assert diff.max().item() <= bound, (what, role, name)
            loose += int((diff > 1e-6 + RTOL * want.abs()).sum())
            total += t.numel()
        assert loose <= MAX_LOOSE_FRACTION * total, (what, role, f"{loose} of {total} elements off")


def test_pp2_interleaved_equals_single_process_and_resumes_exactly(reference, tmp_path):
    ranks = train(tmp_path, "pp2", world=2, every=2)
    for rank, got in enumerate(ranks):
        assert_same_history(got, reference, f"pp=2 rank {rank}")
        assert_stage_weights(got["weights"], reference["weights"], f"pp=2 rank {rank}")
    # Resume from the step-2 checkpoint: per-stage slices, optimizer/scheduler/EMA states, each
    # rank's data position and RNG states.
    ckpt = tmp_path / "pp2" / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in ckpt.glob("student_stage*.safetensors")) == [
        "student_stage0.safetensors", "student_stage1.safetensors"]
    from safetensors.torch import load_file

    first = load_file(str(ckpt / "student_stage0.safetensors"))
    assert "patch_embedding.weight" in first and "head.head.weight" not in first
    resumed = train(tmp_path, "resumed", world=2, resume=str(ckpt))
    for rank, (again, full) in enumerate(zip(resumed, ranks)):
        assert_same_history(again, full, f"pp=2 resumed rank {rank}", steps=[2, 3], exact=True)
        assert_stage_weights(again["weights"], full["weights"], f"pp=2 resumed rank {rank}", exact=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_launcher_pp2_sequential_equals_single_process(reference, tmp_path):
    import yaml

    d = tiny_dmd2_dict(tmp_path / "out", max_steps=STEPS, every=0)
    d["logging"]["tensorboard"] = False
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(d))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
           str(_free_port()), "--no_local_rank", os.path.join(ROOT, "launch", "pretrain_dmd.py"),
           "--config", str(tmp_path / "run.yaml"), "--set", "parallel.pp=2",
           "--set", "parallel.pipeline_schedule=sequential"]
    p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, f"launcher failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    logged = {}
    for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        logged[record["step"] - 1] = record  # the log counts steps done; the history the step index
    ref = dict(reference["history"])
    assert sorted(logged) == sorted(ref)
    for step, logs in ref.items():
        for key, value in logs.items():
            assert logged[step][key] == pytest.approx(value, rel=RTOL if step == 0 else RTOL_UPDATED,
                                                      abs=ATOL), (step, key)
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints" / "step_00000004").glob("*.safetensors")) == [
        "critic_stage0.safetensors", "critic_stage1.safetensors", "ema_student_stage0.safetensors",
        "ema_student_stage1.safetensors", "student_stage0.safetensors", "student_stage1.safetensors"]


def test_stage_slices_are_slices_of_the_single_process_model(tmp_path):
    """A stage built alone (preset init or checkpoint) holds exactly the whole model's tensors."""
    import dataclasses

    from megadistill.models.wan import WanDiT, get_preset, init_weights
    from megadistill.models.wan.pipeline_stage import WanPipelineStage
    from megadistill.train.pipeline_run import build_stage_module

    cfg = _config(tmp_path, 2)
    full = init_weights(WanDiT(get_preset("tiny").replace(text_len=16)), seed=7)
    full.save_pretrained(tmp_path / "ckpt", format="native")
    from_path = dataclasses.replace(cfg.models["critic"], path=str(tmp_path / "ckpt"))
    for stage in range(2):
        want = WanPipelineStage(full, stage, 2).state_dict()
        for model_cfg in (cfg.models["critic"], from_path):
            got = build_stage_module(model_cfg, cfg, 7, stage, 2, "cpu").state_dict()
            assert sorted(got) == sorted(want)
            assert all(torch.equal(got[k], want[k]) for k in want), (stage, model_cfg.path)


def test_pipeline_layouts_the_trainer_refuses(tmp_path):
    from megadistill.config import ConfigError
    from megadistill.train.builder import check_parallel_layout

    with pytest.raises(ConfigError, match="stage 1 or 2"):
        check_parallel_layout(_config(tmp_path, 2), {"zero_optimization": {"stage": 3}})
    with pytest.raises(ConfigError, match="without --ds_config"):
        check_parallel_layout(_config(tmp_path, 2), {"zero_optimization": {"stage": 1}})
    with pytest.raises(ConfigError, match="tp = sp = 1"):
        check_parallel_layout(_config(tmp_path, 2, tp=2), None)
    with pytest.raises(ConfigError, match="does not divide training.micro_batch_size 2"):
        check_parallel_layout(_config(tmp_path, 2, microbatches=3), None)
    check_parallel_layout(_config(tmp_path, 2, "sequential", microbatches=1), None)

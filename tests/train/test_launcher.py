"""The real entry point under the deepspeed launcher, 2 CPU ranks (gloo) with ZeRO-3 (DMD2 with its GAN term):
kill one rank mid-checkpoint and resume exactly; two simulated nodes equal one node."""
import json
import math
import os
import socket
import subprocess
import sys

import pytest

from _tiny_run import ROOT, tiny_dmd2_dict

DS_CONFIG = os.path.join(ROOT, "configs", "ds", "zero3_cpu.json")
LAUNCH = os.path.join(ROOT, "launch", "pretrain_dmd.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path, output_dir):
    import yaml

    d = tiny_dmd2_dict(output_dir, max_steps=6, every=3)
    d["training"]["ema"] = {"decay": 0.9, "start_step": 2}  # a partitioned EMA under ZeRO-3
    d["training"]["micro_batch_size"] = 1
    d["logging"]["tensorboard"] = False
    # The end-of-run report gathers the partitioned EMA student; it measures synthetic-world runs.
    d["data"] = {"kind": "synthetic"}
    d["logging"]["quality_samples"] = 4
    # DMD2's GAN term: its realism head is trained (and checkpointed) in the partitioned critic.
    d["models"]["critic"]["realism_head"] = True
    d["method_config"].update(gan_generator_weight=0.003, gan_critic_weight=0.01)
    path.write_text(yaml.safe_dump(d))
    return path


def launch(config, output_dir, *launcher_args, env=None, resume=None, check=True):
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", *launcher_args, "--no_local_rank",
           LAUNCH, "--ds_config", DS_CONFIG, "--config", str(config), "--output_dir", str(output_dir)]
    if resume:
        cmd += ["--resume", resume]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    p = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"launcher failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def losses(output_dir):
    """Last logged record per step (a resumed run appends the steps it redoes)."""
    out = {}
    for line in (output_dir / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = {k: v for k, v in rec.items() if k.endswith("_loss")}
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    cfg = write_config(d / "run.yaml", d / "out")
    launch(cfg, d / "out", "--num_gpus", "2", "--master_port", str(free_port()))
    return cfg, losses(d / "out")


def test_two_ranks_zero3_runs_and_checkpoints(reference):
    cfg, ref = reference
    assert sorted(ref) == [1, 2, 3, 4, 5, 6]
    assert all(v["critic_loss"] > 0 for v in ref.values())
    assert all(v["gan_critic_loss"] > 0 for v in ref.values())
    assert sum("gan_generator_loss" in v for v in ref.values()) == 3  # generator steps 0, 2, 4
    # The quality report ran once (rank 0) on the student gathered from both ranks.
    report = json.loads((cfg.parent / "out" / "quality.json").read_text())
    assert {"real", "teacher_50", "teacher_4", "student_4", "noise_floor_fd", "wall_s"} == set(report)
    assert report["real"]["adherence"] == 1.0
    assert all(map(math.isfinite, report["student_4"].values()))


def test_kill_one_rank_mid_checkpoint_then_resume_exactly(reference, tmp_path):
    cfg, ref = reference
    out = tmp_path / "out"
    port = str(free_port())
    killed = launch(cfg, out, "--num_gpus", "2", "--master_port", port, check=False,
                    env={"MEGADISTILL_FAULT": "checkpoint_written:6:1"})
    assert killed.returncode != 0
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_00000003", "step_00000006.tmp"]  # the partial write stays partial
    launch(cfg, out, "--num_gpus", "2", "--master_port", str(free_port()), resume="auto")
    assert losses(out) == ref  # steps 4..6 redone from step 3, bit-identical
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]


def test_two_simulated_nodes_equal_one_node(reference, tmp_path):
    cfg, ref = reference
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = str(free_port())
    out = tmp_path / "out"
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
               f"--node_rank={node}", "--master_addr", "127.0.0.1", "--master_port", port,
               "--no_local_rank", LAUNCH, "--ds_config", DS_CONFIG, "--config", str(cfg),
               "--output_dir", str(out)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs[0][-2000:] + logs[1][-2000:]
    assert losses(out) == ref

"""The trainer under tensor-parallel and Ulysses sequence-parallel layouts (gloo, ZeRO-3) equals the
single-process run: tiny DMD2, 4 steps with generator_update_interval 2 (both phases run), dp = 1
in every layout so all of them see the same prompts and noise. Per-step losses and grad norms and
the final student / critic weights agree to float32 round-off; resuming an sp = 2 run from its
step-2 checkpoint continues it exactly."""
import dataclasses
import json
import os

import pytest
import torch

from _tiny_run import ROOT, tiny_dmd2_dict

from _dist_spawn import spawn

DS_CONFIG = os.path.join(ROOT, "configs", "ds", "zero3_cpu.json")
STEPS = 4
# Losses and grad norms (the logged global grad norm of every update) agree to float32 round-off of
# a different summation order. Weights: AdamW (betas (0, 0.999)) divides each gradient element by
# its running RMS, so an element whose gradient is itself round-off-sized may move by up to lr
# either way in the two runs. Such elements are rare (1e-4 to 3.3e-3 of them across the layouts
# here and the pipeline test's, by CPU: the round-off of a matmul depends on its kernels; a wrong
# shard or gradient moves most elements); every other element agrees to round-off. The
# logged figures of a step after the first are taken on those weights: they agree to RTOL_UPDATED
# (measured: 1.5e-5 on an AVX2-only CPU), those of the first step, before any update, to RTOL.
RTOL, ATOL = 1e-5, 1e-6
RTOL_UPDATED = 1e-4
MAX_LOOSE_FRACTION = 1e-2


LR = {"student": 1e-3, "critic": 2e-3}  # tiny_dmd2_dict's learning rates


def _config(output_dir, tp, sp, max_steps, every, pp=1):
    from megadistill.config import config_from_dict

    d = tiny_dmd2_dict(output_dir, max_steps=max_steps, every=every)
    d["parallel"] = {"tp": tp, "sp": sp, "pp": pp}
    d["logging"]["tensorboard"] = False
    return config_from_dict(d)


def _full_weights(handle) -> dict:
    """Every parameter of a role whole: ZeRO-3 partitions gathered, then tp shards. Collective."""
    import deepspeed

    import megadistill.distributed as md
    from megadistill.models.wan.parallel import gather_tp_tensor

    out = {}
    for name, p in handle.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            local = p.detach().clone()
        out[name] = gather_tp_tensor(name, local, md.get_tp_group()).clone()
    return out


def _check_layout(run, tp):
    """Every role is parallelized, holds its tp shard and is partitioned over dp x sp only."""
    import megadistill.distributed as md

    for h in run.bundle.roles.values():
        m = h.module
        assert m.parallelized and m.sp_group is md.get_sp_group()  # sp = 2 in every layout here
        assert m.tp_group is (md.get_tp_group() if tp > 1 else None)
        assert tuple(m.blocks[0].self_attn.q.weight.ds_shape) == (m.config.dim // tp, m.config.dim)
        for p in m.parameters():
            assert p.ds_process_group is md.get_dp_sp_group() and p.data.numel() == 0


def _train(rank, world, output_dir, tp, sp, max_steps, every, resume, result):
    from megadistill.train.builder import build_run
    from megadistill.train.trainer import Trainer

    with open(DS_CONFIG) as f:
        ds_config = json.load(f)
    run = build_run(_config(output_dir, tp, sp, max_steps, every), ds_config)
    if tp > 1 or sp > 1:
        _check_layout(run, tp)
    history = Trainer(run, output_dir, resume=resume, progress=False).fit()
    weights = {role: _full_weights(run.bundle[role]) for role in ("student", "critic")}
    if rank == 0:
        torch.save({"history": history, "weights": weights}, result)


def train(tmp_path, tag, world, tp=1, sp=1, max_steps=STEPS, every=0, resume=None, output_dir=None):
    output_dir = output_dir or tmp_path / tag
    result = str(tmp_path / f"{tag}.pt")
    spawn(_train, world, str(output_dir), tp, sp, max_steps, every, resume, result)
    return torch.load(result, weights_only=True)


def assert_same_run(got, ref, what, steps=None, exact=False):
    ref_hist, got_hist = dict(ref["history"]), dict(got["history"])
    for step in (steps or sorted(ref_hist)):
        assert sorted(got_hist[step]) == sorted(ref_hist[step]), (what, step)
        for key, value in ref_hist[step].items():
            expected = value if exact else pytest.approx(value, rel=RTOL if step == 0 else RTOL_UPDATED, abs=ATOL)
            assert got_hist[step][key] == expected, (what, step, key, got_hist[step][key], value)
    for role, tensors in ref["weights"].items():
        lr = LR[role]
        updates = sum(1 for s in ref_hist if role == "critic" or "generator_loss" in ref_hist[s])
        loose = total = 0
        for name, t in tensors.items():
            g = got["weights"][role][name]
            if exact:
                assert torch.equal(g, t), (what, role, name)
                continue
            diff = (g - t).abs()
            loose += int((diff > ATOL + RTOL * t.abs()).sum())
            total += t.numel()
            # no element further than the lr-sized steps of AdamW can take it
            assert diff.max().item() <= 2 * lr * updates, (what, role, name, diff.max().item())
        assert loose <= MAX_LOOSE_FRACTION * total, (what, role, f"{loose} of {total} elements off")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    # The tiny text encoder (a sentencepiece model trained on the fly) is built once here; the
    # forked ranks inherit it from the family's cache.
    from megadistill.models.wan.family import load_text_encoder

    load_text_encoder("tiny", "cpu", text_len=16, text_dim=64)
    d = tmp_path_factory.mktemp("single")
    ref = train(d, "single", world=1)
    history = dict(ref["history"])
    assert sorted(history) == list(range(STEPS))
    assert "generator_loss" in history[2] and "generator_loss" not in history[3]  # both phases ran
    return ref


def test_sp2_equals_single_process_and_resumes_exactly(reference, tmp_path):
    full = train(tmp_path, "sp2", world=2, sp=2, every=2)
    assert_same_run(full, reference, "sp=2")
    # Resume from the step-2 checkpoint (DeepSpeed engine checkpoints of each role, every rank's
    # data position and RNG states): steps 2 and 3 and the final weights repeat bit for bit.
    step2 = tmp_path / "sp2" / "checkpoints" / "step_00000002"
    second = train(tmp_path, "sp2_resumed", world=2, sp=2, resume=str(step2))
    assert sorted(dict(second["history"])) == [2, 3]
    assert_same_run(second, full, "sp=2 resumed", steps=[2, 3], exact=True)


def test_tp2_sp2_equals_single_process(reference, tmp_path):
    assert_same_run(train(tmp_path, "tp2sp2", world=4, tp=2, sp=2), reference, "tp=2 x sp=2")


def _build_from_checkpoint(rank, world, ckpt_dir, expected):
    import megadistill.distributed as md
    from megadistill.distributed.deepspeed_comm import init_deepspeed_comm
    from megadistill.models.wan.family import build_model
    from megadistill.methods.roles import RoleHandle
    from megadistill.train.builder import role_ds_config

    md.initialize(tp=2, sp=2, backend="gloo")
    init_deepspeed_comm("gloo")
    cfg = _config(ckpt_dir, 2, 2, STEPS, 0)
    role = dataclasses.replace(cfg.models["student"], path=str(ckpt_dir))
    with open(DS_CONFIG) as f:
        ds = role_ds_config(json.load(f), cfg, "student", True)
    model = build_model(role, cfg, seed=0, zero3_config=ds, mpu=md.mpu)
    got = _full_weights(RoleHandle(name="student", module=model, trainable=True))
    want = torch.load(expected, weights_only=True)
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert torch.equal(got[name], t), name


def test_tp2_sp2_zero3_build_from_checkpoint_holds_its_weights(tmp_path):
    """A role loaded from a checkpoint under tp2 x sp2 + ZeRO-3 (rank 0 of each dp x sp group reads
    its tp slice, DeepSpeed partitions it over that group) gathers back to the checkpoint's tensors."""
    from megadistill.models.wan import WanDiT, get_preset, init_weights

    model = init_weights(WanDiT(get_preset("tiny").replace(text_len=16)), seed=5)
    model.save_pretrained(tmp_path / "ckpt", format="native")
    torch.save({k: v.detach() for k, v in model.named_parameters()}, tmp_path / "expected.pt")
    spawn(_build_from_checkpoint, 4, str(tmp_path / "ckpt"), str(tmp_path / "expected.pt"))


def test_layouts_the_trainer_refuses(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from megadistill.config import ConfigError
    from megadistill.train.builder import check_parallel_layout
    from megadistill.train.trainer import Trainer

    with pytest.raises(ConfigError, match="ds_config"):
        check_parallel_layout(_config(tmp_path, 1, 2, STEPS, 0), None)  # sp needs DeepSpeed engines
    with pytest.raises(ConfigError, match="pipeline"):
        check_parallel_layout(_config(tmp_path, 1, 1, STEPS, 0, pp=2), {})
    check_parallel_layout(_config(tmp_path, 2, 2, STEPS, 0), {})
    # plain data parallel would run unsynchronised replicas: refused without DeepSpeed
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="data parallel"):
        check_parallel_layout(_config(tmp_path, 1, 1, STEPS, 0), None)
    check_parallel_layout(_config(tmp_path, 1, 1, STEPS, 0), {})
    monkeypatch.delenv("WORLD_SIZE")
    # a checkpoint resumes only under the layout that wrote it
    (tmp_path / "meta.json").write_text(json.dumps({"config": {"parallel": {"tp": 1, "sp": 2, "pp": 1}}}))
    trainer = Trainer.__new__(Trainer)
    trainer.run = SimpleNamespace(cfg=_config(tmp_path, 2, 1, STEPS, 0))
    with pytest.raises(ValueError, match="same parallel.tp/sp/pp"):
        trainer._check_layout(tmp_path)
    trainer.run = SimpleNamespace(cfg=_config(tmp_path, 1, 2, STEPS, 0))
    trainer._check_layout(tmp_path)

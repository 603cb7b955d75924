"""The pipeline executor runs DMD2 steps exactly as the single-process ``DMD2Method.train_step``.

Reference: ``train_step`` (pp = 1, the whole batch at once) on tiny Wan roles, steps 0 (generator
step: generator phase with teacher CFG, then the critic phase) and 1 (critic only), SGD so that
the updated weights are the gradients themselves, the student's grad clip active. Pipeline: the
same seeds and batch in 2 microbatches, each schedule, on pp = 1 (in process), pp = 2 and
pp = 2 x tp = 2 (gloo). Losses, grad norms and every updated weight agree within 1e-5.
"""
import pytest
import torch

import exec_helpers as H
from _dist_spawn import spawn
from megadistill.pipeline.executor import ExecutorError, PipelineExecutor, check_pipeline_zero_stage

TOL = 1e-5
SCHEDULES = ("sequential", "interleaved")


@pytest.fixture(scope="module")
def reference():
    out = H.reference_run()
    logs, weights = out[0]
    assert set(logs) >= {"generator_loss", "critic_loss", "generator_grad_norm"}
    assert logs["generator_grad_norm"] > H.GRAD_CLIP["student"]  # clipping is exercised
    start = H.tiny_model("student").state_dict()
    assert max((weights["student"][k] - v).abs().max().item() for k, v in start.items()) > 1e-3
    return out


def _check_step(logs, expected_logs, stage_module, expected_weights, role_tag, tp_group=None):
    for key, value in expected_logs.items():
        assert key in logs, f"{role_tag}: no {key} in {sorted(logs)}"
        assert abs(logs[key] - value) <= TOL * max(1.0, abs(value)), f"{role_tag} {key}: {logs[key]} != {value}"
    for name, tensor in stage_module.state_dict().items():
        want = expected_weights[name]
        if tp_group is not None and getattr(dict(stage_module.named_parameters()).get(name), "tensor_model_parallel",
                                            False):
            want = _tp_slice(name, want, tp_group)
        err = (tensor - want).abs().max().item()
        assert err <= TOL, f"{role_tag} {name}: max error {err}"


def _tp_slice(name, full, group):
    import torch.distributed as dist

    from megadistill.models.wan.keys import tp_split_dim

    dim, size, rank = tp_split_dim(name), dist.get_world_size(group), dist.get_rank(group)
    return full.chunk(size, dim=dim)[rank]


def _run_layout(reference, stage, num_stages, pp_group=None, mp_group=None, tp_group=None, tp_rank=0,
                schedules=SCHEDULES, method_config=None):
    from megadistill.methods.dmd2_pipeline import dmd2_pipeline_step

    for schedule in schedules:
        roles = H.stage_roles(stage, num_stages, tp_group)
        executor = PipelineExecutor(roles, stage, num_stages, pp_group, mp_group, tp_rank)
        # the method gives config, adapter and exit draws; its own networks are not called
        method = H.dmd2(H.reference_bundle(), method_config)
        for step in H.STEPS:
            torch.manual_seed(H.step_seed(step))
            raw = H.raw_batch(step, method.latents_source == "data")
            logs = dmd2_pipeline_step(method, executor, raw, step, H.MICROBATCHES, schedule)
            expected_logs, expected_weights = reference[step]
            for role in ("student", "critic"):
                _check_step(logs, expected_logs, roles[role].module, expected_weights[role],
                            f"{schedule} step {step} stage {stage} {role}", tp_group)


def test_single_stage_equals_train_step(reference):
    _run_layout(reference, 0, 1)


def test_single_stage_data_latent_without_guidance():
    config = {"rollout_mode": "data_latent"}  # no guidance: the teacher's cond prediction alone
    _run_layout(H.reference_run(config), 0, 1, schedules=("interleaved",), method_config=config)


def _pipeline_worker(rank, world, tp, reference):
    import megadistill.distributed as md

    md.initialize(tp=tp, pp=2, backend="gloo")
    _run_layout(reference, md.get_pp_rank(), 2, md.get_pp_group(), md.get_model_parallel_group(),
                md.get_tp_group() if tp > 1 else None, md.get_tp_rank())


def test_pp2_equals_train_step(reference):
    spawn(_pipeline_worker, 2, 1, reference)


def test_pp2_tp2_equals_train_step(reference):
    spawn(_pipeline_worker, 4, 2, reference)


# -- bad input -------------------------------------------------------------------------------------

def test_zero3_with_pipeline_is_refused():
    with pytest.raises(ValueError, match="stage 1 or 2"):
        check_pipeline_zero_stage(3, pp=2)
    check_pipeline_zero_stage(3, pp=1)
    check_pipeline_zero_stage(2, pp=4)


def test_microbatches_must_divide_the_batch():
    from megadistill.methods.dmd2_pipeline import split_raw_batch

    with pytest.raises(ValueError, match="must divide the batch size 4"):
        split_raw_batch(H.raw_batch(0), 4, 3)


def test_schedule_for_another_stage_count_is_refused():
    from megadistill.methods.dmd2_pipeline import DMD2PipelineStep
    from megadistill.pipeline.schedules import build_schedule

    method = H.dmd2(H.reference_bundle())
    graph, program = DMD2PipelineStep(method, H.raw_batch(1), 1, 2).phases[0]
    executor = PipelineExecutor(H.stage_roles(0, 1), 0, 1)
    with pytest.raises(ExecutorError, match="has 2 stages"):
        executor.run(build_schedule("sequential", graph, 2), program)


def test_stage_split_checks():
    from megadistill.models.wan.pipeline_stage import WanPipelineStage

    model = H.tiny_model("student")
    with pytest.raises(ValueError, match="cover 3 blocks"):
        WanPipelineStage(model, 0, 2, stage_blocks=[(0, 1), (1, 3)])
    with pytest.raises(ValueError, match="stage 1 is not in"):
        WanPipelineStage(model, 1, 1)
    first, last = WanPipelineStage(model, 0, 2, [(0, 1), (1, 4)]), WanPipelineStage(model, 1, 2, [(0, 1), (1, 4)])
    names = set(first.state_dict()) | set(last.state_dict())
    assert names == set(model.state_dict())  # native names; only the time path is on both stages
    shared = set(first.state_dict()) & set(last.state_dict())
    assert shared and all(n.startswith(("time_embedding.", "time_projection.")) for n in shared)

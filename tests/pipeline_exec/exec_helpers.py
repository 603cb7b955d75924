"""Shared pieces of the pipeline-executor tests: tiny Wan roles and the pp = 1 reference."""
from __future__ import annotations

import torch

from megadistill.diffusion import FlowMatchScheduler

LATENT_SHAPE = (16, 2, 4, 4)     # 8 tokens per sample with patch (1, 2, 2)
ROLES = (("student", True), ("teacher", False), ("critic", True))
SEEDS = {"student": 10, "teacher": 11, "critic": 12}
LR = 0.5                         # SGD: the update is the gradient itself (AdamW's first step is ~sign(g))
GRAD_CLIP = {"student": 0.05, "critic": 10.0}   # the student's clip is active, the critic's not
METHOD_CONFIG = {"guidance_scale": 3.0, "guidance_convention": "cfg"}
BATCH, MICROBATCHES = 4, 2
STEPS = (0, 1)                   # step 0: generator + critic phase; step 1: critic only


def tiny_config():
    from megadistill.models.wan import get_preset

    return get_preset("tiny").replace(num_layers=4)


def tiny_model(role: str):
    from megadistill.models.wan import WanDiT, init_weights

    return init_weights(WanDiT(tiny_config()), seed=SEEDS[role])


def adapter():
    from megadistill.models.wan.adapter import WanAdapter

    neg = torch.randn(6, 64, generator=torch.Generator().manual_seed(99))
    return WanAdapter(None, FlowMatchScheduler(1000, 5.0), latent_shape=LATENT_SHAPE, negative_text_states=neg)


def raw_batch(step: int, with_latents: bool = False) -> dict:
    g = torch.Generator().manual_seed(1000 + step)
    raw = {"text_states": torch.randn(BATCH, 8, 64, generator=g)}
    if with_latents:
        raw["latents"] = torch.randn(BATCH, *LATENT_SHAPE, generator=g)
    return raw


def step_seed(step: int) -> int:
    return 7 + step


def _optimizer(params):
    return torch.optim.SGD(params, lr=LR)


def reference_bundle(models=None):
    from megadistill.methods import ModelBundle, RoleHandle

    handles = {}
    for name, trainable in ROLES:
        net = tiny_model(name) if models is None else models[name]
        handles[name] = RoleHandle(name, net, trainable, optimizer=_optimizer(net.parameters()) if trainable else None,
                                   grad_clip=GRAD_CLIP.get(name))
    return ModelBundle(handles)


def dmd2(bundle, method_config=None):
    from megadistill.methods.dmd2 import DMD2Method

    return DMD2Method(bundle, adapter(), METHOD_CONFIG if method_config is None else method_config, seed=3)


def reference_run(method_config=None) -> dict:
    """pp = 1: ``train_step`` in this process. Returns logs and full student/critic weights per step."""
    method = dmd2(reference_bundle(), method_config)
    out = {}
    for step in STEPS:
        torch.manual_seed(step_seed(step))
        logs = method.train_step(raw_batch(step, method.latents_source == "data"), step)
        weights = {role: {k: v.detach().clone() for k, v in method.bundle[role].module.state_dict().items()}
                   for role in ("student", "critic")}
        out[step] = (logs, weights)
    return out


def stage_roles(stage: int, num_stages: int, tp_group=None):
    """This stage's StageRole per role, from the same seeded full models as the reference."""
    from megadistill.models.wan.parallel import parallelize_wan
    from megadistill.models.wan.pipeline_stage import WanPipelineStage
    from megadistill.pipeline.executor import StageRole

    roles = {}
    for name, trainable in ROLES:
        model = tiny_model(name)
        if not trainable:
            model.requires_grad_(False)
        if tp_group is not None:
            parallelize_wan(model, tp_group)
        part = WanPipelineStage(model, stage, num_stages)
        roles[name] = StageRole(name, part, _optimizer(part.parameters()) if trainable else None,
                                grad_clip=GRAD_CLIP.get(name), replicated=part.replicated_parameters())
    return roles

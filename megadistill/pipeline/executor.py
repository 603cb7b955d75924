"""The pipeline executor: runs one stage's instruction list (``Schedule.stages[s]``) for real.

Each pipeline rank holds, for every role, its stage's slice of the role's network (a
:class:`StageRole`) and runs its list with a dispatch table from instruction type to handler:

    Compute(forward | forward_nograd)   the role's slice on the op's input: on stage 0 the input
                                        the program builds from the op's dependencies, elsewhere
                                        the activations received from the previous stage. On the
                                        last stage the program turns the output into the op's
                                        result (an x0, a flow) and keeps what its losses need.
    Compute(backward)                   on the last stage the program's loss of the op, elsewhere
                                        the gradient received from the next stage, backpropagated
                                        through the slice's saved forward; the gradient w.r.t. the
                                        slice's inputs is what SendGrad sends on.
    SendActivation / SendGrad           ``isend`` of a hop's activations / gradients, or of an op's
                                        result to a consumer's entry stage (a loop message).
    RecvActivation / RecvGrad           blocking receive of one message (in schedule order).
    OptimizerStep                       marks the role's gradients complete on this stage.

What a stage needs beyond activations (noise, timesteps, conditioning) the *program* computes
identically on every stage from shared seeds (a method's pipeline program; see
``megadistill.methods.dmd2_pipeline``). The program interface (:class:`PipelineProgram`):

    stage_args(op) -> tuple             extra arguments of the stage call for ``op`` (every stage)
    model_input(op, deps) -> Tensor     the entry input of a forward op from its dependencies'
                                        results (stage 0; the last stage recomputes it where it
                                        needs it -- it has the same results)
    forward_output(op, out, deps)       last stage: ``out`` the last slice's output, returns the
                                        op's result (sent to consumers, or read by later ops)
    loss(op) -> Tensor                  last stage: the scalar a backward op starts from

A stage module is called ``module(inputs: tuple, *stage_args) -> tuple``: stage 0 gets the
program's model input, other stages the previous stage's outputs (e.g.
``megadistill.models.wan.pipeline_stage``).

Optimizer steps. Each role's update needs two reductions over the model-parallel (tp x pp) group:
the gradients of parameters replicated on every stage (a DiT's time path) are summed over the
pipeline group, and the global gradient norm (for clipping) is summed over tp x pp. A blocking
collective in the middle of the list can deadlock against a peer that is blocked in a receive
of a message this stage sends later, so the update of every role whose OptimizerStep was listed
runs when the stage's list is done and its sends are complete, in the graph's order of trainable
roles. No op of a role follows its OptimizerStep on a stage, so the result is that of stepping
in place. Updates of plain modules with torch optimizers only (ZeRO stage 1/2 over the
data-parallel group is not wired in; see :func:`check_pipeline_zero_stage`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Sequence

import torch
import torch.distributed as dist
from torch import nn

from megadistill import distributed as md

from .graph import BACKWARD, FORWARD, Op
from .instructions import (Compute, Message, OptimizerStep, RecvActivation, RecvGrad, Schedule, SendActivation,
                           SendGrad, task_inputs)
from .p2p import StageLink


class ExecutorError(RuntimeError):
    """The executor met a list or a program it cannot run (a missing message, a shape mismatch)."""


def check_pipeline_zero_stage(zero_stage: int, pp: int) -> None:
    """ZeRO-3 re-gathers every parameter for every op of every microbatch, and a pipeline stage
    runs many ops per step; with pp > 1 only ZeRO stage 0/1/2 (over the data-parallel group) is
    allowed."""
    if pp > 1 and zero_stage >= 3:
        raise ValueError(f"ZeRO stage {zero_stage} with parallel.pp = {pp}: pipeline parallelism supports ZeRO "
                         f"stage 1 or 2 only (set zero_optimization.stage to 1 or 2 in the DeepSpeed config, "
                         f"or parallel.pp to 1)")


@dataclass
class StageRole:
    """One role's slice on this stage and what updates it.

    ``replicated``: parameters every stage holds a copy of (their gradients are summed over the
    pipeline group). ``grad_clip``: max global gradient norm (None/0: no clipping; the norm is
    still computed). A frozen role has no optimizer."""

    name: str
    module: nn.Module
    optimizer: Optional[torch.optim.Optimizer] = None
    lr_scheduler: Optional[Any] = None
    grad_clip: Optional[float] = None
    replicated: Sequence[nn.Parameter] = ()

    @property
    def trainable(self) -> bool:
        return self.optimizer is not None


class PipelineProgram(Protocol):
    """What a method provides for one phase (see the module docstring)."""

    def stage_args(self, op: Op) -> tuple: ...

    def model_input(self, op: Op, deps: Mapping[str, torch.Tensor]) -> torch.Tensor: ...

    def forward_output(self, op: Op, out: torch.Tensor, deps: Mapping[str, torch.Tensor]) -> torch.Tensor: ...

    def loss(self, op: Op) -> torch.Tensor: ...


@dataclass
class _RunState:
    schedule: Schedule
    program: Any
    received: Dict[Message, tuple] = field(default_factory=dict)
    saved: Dict[str, tuple] = field(default_factory=dict)         # forward op -> (inputs, outputs)
    activations: Dict[str, tuple] = field(default_factory=dict)   # op -> hop outputs to send on
    input_grads: Dict[str, tuple] = field(default_factory=dict)   # backward op -> grads to send back
    results: Dict[str, torch.Tensor] = field(default_factory=dict)  # op -> result (last stage)
    stepped: List[str] = field(default_factory=list)


class PipelineExecutor:
    """Runs instruction lists on pipeline rank ``stage`` of ``num_stages``.

    ``roles``: this stage's :class:`StageRole` per role name. ``pp_group``: the pipeline group
    (None with one stage). ``model_parallel_group``: the tp x pp group the gradient norm is summed
    over. ``tp_rank``: this rank's tensor-parallel rank (parameters not marked
    ``tensor_model_parallel`` are whole on every tp rank and counted in the norm on tp rank 0 only).
    Both default to the initialized process grid's (without a grid: ``pp_group`` and 0).
    """

    def __init__(self, roles: Mapping[str, StageRole], stage: int, num_stages: int, pp_group=None,
                 model_parallel_group=None, tp_rank: Optional[int] = None, device=None):
        if not 0 <= stage < num_stages:
            raise ValueError(f"stage {stage} is not in [0, {num_stages})")
        if num_stages > 1 and pp_group is None:
            raise ValueError(f"{num_stages} stages need the pipeline process group (pp_group)")
        if pp_group is not None and dist.get_world_size(pp_group) != num_stages:
            raise ValueError(f"the pipeline group has {dist.get_world_size(pp_group)} ranks, not {num_stages}")
        if md.is_initialized() and md.get_dp_sp_size() > 1:
            raise NotImplementedError(f"the pipeline executor does not reduce gradients over the data-parallel "
                                      f"group yet (dp x sp = {md.get_dp_sp_size()}); run it with world = tp x pp")
        self.roles = dict(roles)
        self.stage, self.num_stages = stage, num_stages
        self.pp_group = pp_group
        grid = md.is_initialized()
        if model_parallel_group is None:
            model_parallel_group = md.get_model_parallel_group() if grid else pp_group
        self.mp_group = model_parallel_group
        self.tp_rank = tp_rank if tp_rank is not None else (md.get_tp_rank() if grid else 0)
        self.link = StageLink(pp_group, device)
        self.handlers: Dict[type, Callable] = {
            Compute: self._compute,
            SendActivation: self._send,
            SendGrad: self._send,
            RecvActivation: self._recv,
            RecvGrad: self._recv,
            OptimizerStep: self._optimizer_step,
        }

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    # -- the run -----------------------------------------------------------------------------------
    def run(self, schedule: Schedule, program: PipelineProgram) -> Dict[str, float]:
        """Run this stage's list of ``schedule`` with ``program``; then the optimizer steps of the
        roles it listed. Returns ``{"<role>_grad_norm": norm}`` of the roles stepped."""
        if schedule.num_stages != self.num_stages:
            raise ExecutorError(f"schedule {schedule.name!r} has {schedule.num_stages} stages, the executor "
                                f"{self.num_stages}")
        missing = sorted({op.role for op in schedule.graph.ops} - self.roles.keys())
        if missing:
            raise ExecutorError(f"schedule needs roles {missing} that this stage does not hold "
                                f"(it has {sorted(self.roles)})")
        state = _RunState(schedule, program)
        for instruction in schedule.stages[self.stage]:
            self.handlers[type(instruction)](instruction, state)
        self.link.wait_sends()
        if state.saved:
            raise ExecutorError(f"forwards without a backward on stage {self.stage}: {sorted(state.saved)}")
        logs: Dict[str, float] = {}
        for role in schedule.graph.trainable_roles:  # the same order on every stage
            if role in state.stepped:
                logs[f"{role}_grad_norm"] = self._step_role(self.roles[role])
        return logs

    def share_from_last_stage(self, values: Mapping[str, float], keys: Sequence[str]) -> Dict[str, float]:
        """``values`` (known on the last stage only, e.g. losses) on every stage: a broadcast over
        the pipeline group of the entries named in ``keys``. Collective: every stage calls it."""
        if self.is_last:
            absent = [k for k in keys if k not in values]
            if absent:
                raise ExecutorError(f"the last stage has no value for {absent}")
        if self.pp_group is None:
            return {k: float(values[k]) for k in keys}
        buf = torch.tensor([float(values[k]) if self.is_last else 0.0 for k in keys], dtype=torch.float64,
                           device=self.link.device)
        dist.broadcast(buf, src=self.link.ranks[-1], group=self.pp_group)
        return dict(zip(keys, buf.tolist()))

    # -- handlers ----------------------------------------------------------------------------------
    def _compute(self, ins: Compute, state: _RunState) -> None:
        op = state.schedule.graph[ins.op]
        if op.kind == BACKWARD:
            self._backward(op, state)
        else:
            self._forward(op, state)

    def _dependency_values(self, op: Op, state: _RunState) -> Dict[str, torch.Tensor]:
        """Results of ``op``'s data dependencies as seen on this stage (received or local)."""
        values = {}
        for (dep, _), msg in task_inputs(state.schedule.graph, op, self.stage, self.num_stages):
            if dep not in op.deps:
                continue
            if msg is not None:
                values[dep] = state.received.pop(msg)[0]
            elif dep in state.results:
                values[dep] = state.results[dep]
        return values

    def _hop_inputs(self, op: Op, state: _RunState, grad: bool) -> tuple:
        prev = self.stage + 1 if grad else self.stage - 1
        msg = Message(op.name, op.microbatch, prev, self.stage, grad=grad, loop=False)
        if msg not in state.received:
            raise ExecutorError(f"stage {self.stage} computes {op.name} before receiving {msg}")
        return state.received.pop(msg)

    def _forward(self, op: Op, state: _RunState) -> None:
        program = state.program
        with_grad = op.kind == FORWARD
        if self.stage == 0:
            inputs = (program.model_input(op, self._dependency_values(op, state)),)
        else:
            inputs = self._hop_inputs(op, state, grad=False)
            if with_grad:  # leaves, so the backward yields the gradient to send to the previous stage
                inputs = tuple(t.requires_grad_(True) if t.is_floating_point() else t for t in inputs)
        with torch.set_grad_enabled(with_grad):
            outputs = tuple(self.roles[op.role].module(inputs, *program.stage_args(op)))
            if self.is_last:
                deps = {d: state.results[d] for d in op.deps if d in state.results}
                state.results[op.name] = program.forward_output(op, outputs[0], deps)
        if not self.is_last:
            state.activations[op.name] = tuple(t.detach() for t in outputs)
        if with_grad:
            state.saved[op.name] = (inputs, outputs)

    def _backward(self, op: Op, state: _RunState) -> None:
        inputs, outputs = state.saved.pop(op.forward_of)
        if self.is_last:
            torch.autograd.backward(state.program.loss(op))
        else:
            grads = self._hop_inputs(op, state, grad=True)
            pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        if self.stage > 0:
            state.input_grads[op.name] = tuple(
                t.grad if t.grad is not None else torch.zeros_like(t) for t in inputs if t.is_floating_point())

    def _send(self, ins, state: _RunState) -> None:
        msg = ins.message
        if msg.loop:  # an op's result may go to several consumers; it stays for later ones
            tensors = (state.results[msg.op].detach(),)
        elif msg.grad:  # a hop is sent once; the link keeps the buffers until the sends complete
            tensors = state.input_grads.pop(msg.op)
        else:
            tensors = state.activations.pop(msg.op)
        self.link.send(tensors, msg.dst)

    def _recv(self, ins, state: _RunState) -> None:
        state.received[ins.message] = self.link.recv(ins.message.src)

    def _optimizer_step(self, ins: OptimizerStep, state: _RunState) -> None:
        role = self.roles[ins.role]
        if not role.trainable:
            raise ExecutorError(f"OptimizerStep of role {ins.role!r}, which has no optimizer on stage {self.stage}")
        state.stepped.append(ins.role)

    # -- the update --------------------------------------------------------------------------------
    def _step_role(self, role: StageRole) -> float:
        """Sum replicated gradients over the pipeline group, clip by the global norm over tp x pp
        (as ``torch.nn.utils.clip_grad_norm_`` on the whole model), step, zero the gradients.
        A non-finite norm skips the update (the gradients are dropped). Returns the norm."""
        replicated = {id(p) for p in role.replicated}
        if self.pp_group is not None and role.replicated:
            for p in role.replicated:  # every stage takes part, with a zero gradient if it has none
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            flat = torch.cat([p.grad.reshape(-1) for p in role.replicated])  # one collective for all
            dist.all_reduce(flat, group=self.pp_group)
            for p, g in zip(role.replicated, flat.split([p.numel() for p in role.replicated])):
                p.grad.copy_(g.view_as(p.grad))
        params = [p for p in role.module.parameters() if p.grad is not None]
        norm = self._global_norm(params, replicated)
        max_norm = role.grad_clip if role.grad_clip else math.inf
        if math.isfinite(norm):
            coef = min(max_norm / (norm + 1e-6), 1.0)
            if coef < 1.0:
                for p in params:
                    p.grad.mul_(coef)
            role.optimizer.step()
            if role.lr_scheduler is not None:
                role.lr_scheduler.step()
        role.optimizer.zero_grad(set_to_none=True)
        return norm

    def _global_norm(self, params, replicated: set) -> float:
        """L2 norm of the whole model's gradient: each tensor counted once over the tp x pp ranks."""
        total = torch.zeros((), dtype=torch.float64, device=params[0].device if params else None)
        for p in params:
            if id(p) in replicated and self.stage != 0:
                continue  # the summed copy is equal on every stage
            if not getattr(p, "tensor_model_parallel", False) and self.tp_rank != 0:
                continue  # whole on every tp rank
            total += p.grad.detach().double().pow(2).sum()
        if self.mp_group is not None:
            dist.all_reduce(total, group=self.mp_group)
        return float(total.sqrt())

"""Per-stage instruction lists: the plain-data output of the schedule builder.

A *task* is one op on one stage. A forward op runs on stages 0..P-1 and a backward on P-1..0;
consecutive stages of one op exchange a *hop* message (activations forward, gradients backward).
A data dependency whose output lives on another stage than the consumer's entry stage (a
forward's output is on the last stage, a forward's input enters on stage 0) is carried by a
*loop* message: the producer's output (the latent sample) sent to each consuming op.

p2p semantics (what an executor must implement and what the validator simulates): a send is
posted asynchronously (``isend``; its buffer is kept until the step ends), a receive blocks
until its message has arrived, and messages between one ordered pair of stages are matched in
the order they were posted (NCCL p2p has no tags), so every stage's receives from a peer must
list the peer's sends to it in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass

from .graph import BACKWARD, Op, OpGraph


@dataclass(frozen=True)
class Message:
    """One tensor sent from ``src`` to ``dst``: the output of ``op`` on ``src``, either a hop to
    the next stage of the same op or a loop message to the entry stage of ``consumer`` (one loop
    message per consuming op, so each receive feeds exactly one op)."""

    op: str
    microbatch: int
    src: int
    dst: int
    grad: bool
    loop: bool
    consumer: str | None = None

    def __str__(self) -> str:
        if self.loop:
            return f"out({self.op} => {self.consumer}) {self.src}->{self.dst}"
        return f"{'grad' if self.grad else 'act'}({self.op}) {self.src}->{self.dst}"


@dataclass(frozen=True)
class Compute:
    op: str
    role: str
    kind: str
    microbatch: int

    def __str__(self) -> str:
        return f"{self.kind:<14} {self.op}"


@dataclass(frozen=True)
class SendActivation:
    """Send a forward-direction tensor (a hop activation or a loop-back output)."""

    message: Message

    def __str__(self) -> str:
        return f"send_act       {self.message}"


@dataclass(frozen=True)
class RecvActivation:
    message: Message

    def __str__(self) -> str:
        return f"recv_act       {self.message}"


@dataclass(frozen=True)
class SendGrad:
    """Send a backward-direction tensor (the gradient w.r.t. the previous stage's output)."""

    message: Message

    def __str__(self) -> str:
        return f"send_grad      {self.message}"


@dataclass(frozen=True)
class RecvGrad:
    message: Message

    def __str__(self) -> str:
        return f"recv_grad      {self.message}"


@dataclass(frozen=True)
class OptimizerStep:
    """Step the optimizer of ``role``'s slice on this stage (after its last backward there)."""

    role: str

    def __str__(self) -> str:
        return f"optimizer_step {self.role}"


Instruction = Compute | SendActivation | RecvActivation | SendGrad | RecvGrad | OptimizerStep
SENDS = (SendActivation, SendGrad)
RECVS = (RecvActivation, RecvGrad)


def send_of(message: Message) -> SendActivation | SendGrad:
    return SendGrad(message) if message.grad else SendActivation(message)


def recv_of(message: Message) -> RecvActivation | RecvGrad:
    return RecvGrad(message) if message.grad else RecvActivation(message)


@dataclass(frozen=True)
class Schedule:
    """Instruction lists, one per stage, for one op graph."""

    name: str
    graph: OpGraph
    num_stages: int
    stages: tuple[tuple[Instruction, ...], ...]
    detail: str = ""  # how it was built (the interleaved builder's chosen priority rule)


def entry_stage(op: Op, num_stages: int) -> int:
    return num_stages - 1 if op.kind == BACKWARD else 0


def exit_stage(op: Op, num_stages: int) -> int:
    return 0 if op.kind == BACKWARD else num_stages - 1


def op_stages(op: Op, num_stages: int) -> range:
    """Stages in the order an op visits them."""
    return range(num_stages - 1, -1, -1) if op.kind == BACKWARD else range(num_stages)


Task = tuple[str, int]  # (op name, stage)


def task_inputs(graph: OpGraph, op: Op, stage: int, num_stages: int) -> list[tuple[Task, Message | None]]:
    """What task (op, stage) waits for: (task, message carrying its output here, or None when the
    dependency ran on this same stage)."""
    inputs: list[tuple[Task, Message | None]] = []
    backward = op.kind == BACKWARD
    if stage != entry_stage(op, num_stages):
        prev = stage + 1 if backward else stage - 1
        inputs.append(((op.name, prev), Message(op.name, op.microbatch, prev, stage, grad=backward, loop=False)))
    if op.forward_of is not None:
        inputs.append(((op.forward_of, stage), None))
    for dep in op.stage_deps:
        inputs.append(((dep, stage), None))
    if stage == entry_stage(op, num_stages):
        for dep in op.deps:
            producer = graph[dep]
            src = exit_stage(producer, num_stages)
            if src == stage:
                inputs.append(((dep, stage), None))
            else:
                msg = Message(dep, producer.microbatch, src, stage, grad=producer.kind == BACKWARD, loop=True,
                              consumer=op.name)
                inputs.append(((dep, src), msg))
    return inputs

"""Replay per-stage instruction lists with per-op costs.

Each stage runs its list in order. A compute or optimizer step occupies the stage for its cost;
a send is posted asynchronously at the stage's current time and its message arrives
``transfer_seconds(bytes)`` later (transfers do not contend); a receive waits until its message
has arrived. Messages on one ordered stage pair are matched first-posted, first-received, and a
receive that meets another message than the one it names is a schedule error, as is a state
where every unfinished stage waits on a receive (deadlock).

Reported per stage: busy time (computes and optimizer steps), bubble = 1 - busy / makespan, and
peak held activation bytes (a forward with grad holds its activations from its start until its
backward on that stage finishes; a forward without grad holds nothing past the op).
The overall bubble fraction is the mean over stages.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .costs import CostModel
from .graph import BACKWARD, FORWARD
from .instructions import RECVS, SENDS, Compute, Message, OptimizerStep, Schedule


class ScheduleError(ValueError):
    """A schedule is invalid: missing or repeated op, dependency order, p2p mismatch, deadlock."""


@dataclass(frozen=True)
class Event:
    stage: int
    name: str
    role: str
    kind: str  # an op kind or "optimizer_step"
    microbatch: int
    start: float
    end: float


@dataclass(frozen=True)
class Transfer:
    message: Message
    nbytes: int
    sent: float
    arrived: float


@dataclass(frozen=True)
class SimResult:
    schedule: str
    num_stages: int
    makespan: float
    busy_per_stage: tuple[float, ...]
    bubble_fraction_per_stage: tuple[float, ...]
    bubble_fraction: float
    peak_activation_bytes_per_stage: tuple[int, ...]
    events: tuple[Event, ...] = field(repr=False)
    transfers: tuple[Transfer, ...] = field(repr=False)

    def summary(self) -> dict:
        return {
            "schedule": self.schedule,
            "makespan": self.makespan,
            "bubble_fraction": self.bubble_fraction,
            "bubble_fraction_per_stage": list(self.bubble_fraction_per_stage),
            "busy_per_stage": list(self.busy_per_stage),
            "peak_activation_bytes_per_stage": list(self.peak_activation_bytes_per_stage),
        }


def message_bytes(schedule: Schedule, costs: CostModel, message: Message) -> int:
    op = schedule.graph[message.op]
    return costs.output_bytes(op) if message.loop else costs.hop_bytes(op)


def simulate(schedule: Schedule, costs: CostModel) -> SimResult:
    """Replay ``schedule`` under ``costs``; raises ScheduleError on mismatch or deadlock."""
    graph, p = schedule.graph, schedule.num_stages
    pc = [0] * p
    now = [0.0] * p
    busy = [0.0] * p
    held = [0] * p
    peak = [0] * p
    held_by: dict[tuple[str, int], int] = {}
    channels: dict[tuple[int, int], deque] = {}
    events: list[Event] = []
    transfers: list[Transfer] = []

    def step(s: int) -> bool:
        """Run stage s's next instruction; False if it waits on a message not yet sent."""
        ins = schedule.stages[s][pc[s]]
        if isinstance(ins, Compute):
            op = graph[ins.op]
            dur = costs.compute_seconds(op, s, p)
            if op.kind == FORWARD:
                held_by[(op.name, s)] = costs.held_activation_bytes(op, s, p)
                held[s] += held_by[(op.name, s)]
                peak[s] = max(peak[s], held[s])
            events.append(Event(s, op.name, op.role, op.kind, op.microbatch, now[s], now[s] + dur))
            now[s] += dur
            busy[s] += dur
            if op.kind == BACKWARD:
                held[s] -= held_by.pop((op.forward_of, s), 0)
        elif isinstance(ins, OptimizerStep):
            dur = costs.optimizer_seconds(ins.role, s, p)
            events.append(Event(s, f"optimizer_step/{ins.role}", ins.role, "optimizer_step", -1, now[s], now[s] + dur))
            now[s] += dur
            busy[s] += dur
        elif isinstance(ins, SENDS):
            msg = ins.message
            nbytes = message_bytes(schedule, costs, msg)
            arrival = now[s] + costs.transfer_seconds(nbytes)
            channels.setdefault((msg.src, msg.dst), deque()).append((msg, arrival))
            transfers.append(Transfer(msg, nbytes, now[s], arrival))
        elif isinstance(ins, RECVS):
            queue = channels.get((ins.message.src, s))
            if not queue:
                return False
            msg, arrival = queue.popleft()
            if msg != ins.message:
                raise ScheduleError(f"stage {s} instruction {pc[s]} receives {ins.message} but stage "
                                    f"{msg.src} sent {msg} first: sends and receives must be in the same order")
            now[s] = max(now[s], arrival)
        else:
            raise ScheduleError(f"stage {s} instruction {pc[s]}: unknown instruction {ins!r}")
        pc[s] += 1
        return True

    while any(pc[s] < len(schedule.stages[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            while pc[s] < len(schedule.stages[s]) and step(s):
                progressed = True
        if not progressed:
            waits = [f"stage {s} waits at instruction {pc[s]} ({schedule.stages[s][pc[s]]})"
                     for s in range(p) if pc[s] < len(schedule.stages[s])]
            raise ScheduleError("deadlock: " + "; ".join(waits))
    leftover = [str(m) for q in channels.values() for m, _ in q]
    if leftover:
        raise ScheduleError(f"messages sent but never received: {leftover[:5]}")

    makespan = max(now) if p else 0.0
    bubbles = tuple(1.0 - b / makespan if makespan > 0 else 0.0 for b in busy)
    return SimResult(
        schedule=schedule.name,
        num_stages=p,
        makespan=makespan,
        busy_per_stage=tuple(busy),
        bubble_fraction_per_stage=bubbles,
        bubble_fraction=sum(bubbles) / p,
        peak_activation_bytes_per_stage=tuple(peak),
        events=tuple(events),
        transfers=tuple(transfers),
    )

"""Schedule builder: op graph + P stages -> one instruction list per stage.

``sequential`` (the baseline)
    Each model call (a *step*: the same op over all microbatches) runs as its own pipeline pass,
    one pass after another, as a pipeline engine that runs one model per call would: a
    forward-only pass is GPipe (all microbatches forward), a forward with grad whose backwards
    are the very next step is Megatron's 1F1B, any other backward pass runs microbatch by
    microbatch from the last stage. A call takes its inputs from where they live when it starts:
    the loop-back sends of a pass's inputs go on the source stage right before that stage starts
    the pass, so a pass that consumes another model's output waits for the previous pass to
    drain from the last stage (fill and drain at every such boundary).

``interleaved``
    Event-driven list scheduling over all tasks (op, stage): whenever a stage is free it starts,
    among the tasks whose inputs have arrived, the one ranked first by a priority rule.
    Forward-only work (teacher, critic fake score, no-grad rollout steps) thus flows into the
    bubbles that the trainable roles' forwards and backwards leave, and microbatches overlap
    across model boundaries. The rules (``priority_rules``): longest remaining critical path
    (task cost plus the longest chain of tasks and transfers after it); or kind classes
    (trainable forward and backward before forward-only fill, backward first or second, with
    backwards held back on the first k stages so that upstream stages keep feeding forward work
    downstream) ordered within a class by microbatch then critical path, or by critical path
    then microbatch. The builder replays the schedule of every rule under the cost model and
    keeps the shortest (the cost model orders the work: FLOPs or measured times; unit costs by
    default).
    Memory: the forward-with-grad activations of one role and microbatch (an *activation group*:
    all its graded forwards, e.g. every block of a self-forcing rollout) are admitted on a stage
    only while at most ``max_inflight_activations`` groups (and ``max_activation_bytes`` reserved
    bytes) are held there; the whole group is reserved at its first forward and released as its
    backwards finish, so the held activations never exceed the cap.

With one stage there is nothing to overlap: both schedules are the graph's ops in order (the
interleaved one falls back to list scheduling only if that order breaks its activation cap).
An optimizer step of a trainable role follows that role's last op on each stage.

``validate_schedule`` checks every schedule (dependency order, matched p2p, no deadlock).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

from .costs import CostModel, UnitCostModel
from .graph import BACKWARD, FORWARD, Op, OpGraph
from .instructions import (RECVS, SENDS, Compute, Instruction, Message, OptimizerStep, Schedule, Task,
                           op_stages, recv_of, send_of, task_inputs)
from .simulator import ScheduleError, message_bytes, simulate

SCHEDULES = ("sequential", "interleaved")


# ----------------------------------------------------------------------------- assembly

def assemble(name: str, graph: OpGraph, num_stages: int, orders: list[list[str]],
             send_after: dict[Message, str] | None = None, detail: str = "") -> Schedule:
    """Turn per-stage compute orders into instruction lists.

    A message is sent right after its producer's compute on the source stage (or after the op
    ``send_after[message]``). On the destination stage the messages of one source are received in
    send order, each just before the first compute that needs it or a later message from that
    source (so posting order and receiving order agree).
    """
    if len(orders) != num_stages:
        raise ScheduleError(f"expected {num_stages} compute orders, got {len(orders)}")
    position = [{op: i for i, op in enumerate(order)} for order in orders]
    need: dict[Message, int] = {}
    for s, order in enumerate(orders):
        for i, op_name in enumerate(order):
            for _, msg in task_inputs(graph, graph[op_name], s, num_stages):
                if msg is not None and msg not in need:
                    need[msg] = i
    sends_after: dict[tuple[int, int], list[Message]] = defaultdict(list)
    for msg in need:
        anchor = (send_after or {}).get(msg, msg.op)
        if anchor not in position[msg.src]:
            raise ScheduleError(f"stage {msg.src} never computes {anchor}, which must send {msg}")
        sends_after[(msg.src, position[msg.src][anchor])].append(msg)
    by_pair: dict[tuple[int, int], list[Message]] = defaultdict(list)
    for key in sorted(sends_after):
        sends_after[key].sort(key=lambda m: (m.dst, need[m]))
        for msg in sends_after[key]:
            by_pair[(msg.src, msg.dst)].append(msg)
    recvs_before: dict[tuple[int, int], list[Message]] = defaultdict(list)
    for (src, dst), msgs in by_pair.items():
        at = len(orders[dst])
        placed = []
        for msg in reversed(msgs):  # suffix minimum keeps the receive order equal to the send order
            at = min(at, need[msg])
            placed.append((at, msg))
        for at, msg in reversed(placed):
            recvs_before[(dst, at)].append(msg)
    stages: list[tuple[Instruction, ...]] = []
    for s, order in enumerate(orders):
        trainable = graph.trainable_roles
        last_use = {graph[n].role: i for i, n in enumerate(order) if graph[n].role in trainable}
        out: list[Instruction] = []
        for i, op_name in enumerate(order):
            op = graph[op_name]
            out += [recv_of(m) for m in recvs_before.get((s, i), ())]
            out.append(Compute(op.name, op.role, op.kind, op.microbatch))
            out += [send_of(m) for m in sends_after.get((s, i), ())]
            if op.role in trainable and last_use[op.role] == i:
                out.append(OptimizerStep(op.role))
        stages.append(tuple(out))
    return Schedule(name, graph, num_stages, tuple(stages), detail)


# ----------------------------------------------------------------------------- sequential

def _one_f_one_b(forwards: list[Op], backwards: list[Op], stage: int, num_stages: int) -> list[str]:
    """Megatron's non-interleaved 1F1B order on one stage: warm-up forwards, then one forward
    one backward, then the remaining backwards."""
    m = len(forwards)
    warmup = min(num_stages - stage - 1, m)
    order = [op.name for op in forwards[:warmup]]
    for i in range(m - warmup):
        order += [forwards[warmup + i].name, backwards[i].name]
    return order + [op.name for op in backwards[m - warmup:]]


def _passes(graph: OpGraph) -> list[list[str]]:
    """Group the graph's steps into passes: a forward-with-grad step immediately followed by the
    step of its backwards forms one 1F1B pass, every other step is a pass of its own."""
    steps = graph.steps
    by_step = {step: sorted((op for op in graph.ops if op.step == step), key=lambda o: o.microbatch) for step in steps}
    passes, i = [], 0
    while i < len(steps):
        fwd = by_step[steps[i]]
        if i + 1 < len(steps):
            bwd = by_step[steps[i + 1]]
            fused = (fwd[0].kind == FORWARD and len(bwd) == len(fwd)
                     and all(b.kind == BACKWARD and b.forward_of == f.name for f, b in zip(fwd, bwd)))
            if fused:
                passes.append([steps[i], steps[i + 1]])
                i += 2
                continue
        passes.append([steps[i]])
        i += 1
    return passes


def sequential_schedule(graph: OpGraph, num_stages: int) -> Schedule:
    """Pass after pass (module docstring); with one stage, the graph's ops in order."""
    _check_stages(num_stages)
    if num_stages == 1:
        return assemble("sequential", graph, 1, [[op.name for op in graph.ops]])
    by_step = defaultdict(list)
    for op in graph.ops:
        by_step[op.step].append(op)
    for ops in by_step.values():
        ops.sort(key=lambda o: o.microbatch)
    orders: list[list[str]] = [[] for _ in range(num_stages)]
    pass_of: dict[str, int] = {}
    for k, steps in enumerate(_passes(graph)):
        for step in steps:
            for op in by_step[step]:
                pass_of[op.name] = k
        for s in range(num_stages):
            if len(steps) == 2:
                orders[s] += _one_f_one_b(by_step[steps[0]], by_step[steps[1]], s, num_stages)
            else:
                orders[s] += [op.name for op in by_step[steps[0]]]
    first_of_pass = [{} for _ in range(num_stages)]
    for s, order in enumerate(orders):
        for i, op_name in enumerate(order):
            first_of_pass[s].setdefault(pass_of[op_name], i)
    send_after: dict[Message, str] = {}
    for s, order in enumerate(orders):
        for op_name in order:
            for _, msg in task_inputs(graph, graph[op_name], s, num_stages):
                if msg is not None and msg.loop:
                    # the consuming call takes its input from the source stage when that stage
                    # starts the call, i.e. after the op just before the call's first op there
                    start = first_of_pass[msg.src][pass_of[op_name]]
                    send_after[msg] = orders[msg.src][start - 1]
    return assemble("sequential", graph, num_stages, orders, send_after)


# ----------------------------------------------------------------------------- interleaved

PriorityKey = Callable[[Op, int, float, int], tuple]


def _critical_path_rule(op: Op, stage: int, tail: float, index: int) -> tuple:
    return (tail, -op.microbatch, -index)


def _kind_rule(defer_backward_below: int, backward_first: bool, critical_path_first: bool) -> PriorityKey:
    """Kind classes first: trainable forward and backward (in either order) before forward-only
    fill work, and backwards last of all on the stages below ``defer_backward_below``; within a
    class the lower microbatch then the longer critical path, or the reverse."""
    rank = {FORWARD: 1, BACKWARD: 2} if backward_first else {FORWARD: 2, BACKWARD: 1}

    def key(op: Op, stage: int, tail: float, index: int) -> tuple:
        r = -1 if op.kind == BACKWARD and stage < defer_backward_below else rank.get(op.kind, 0)
        if critical_path_first:
            return (r, tail, -op.microbatch, -index)
        return (r, -op.microbatch, tail, -index)

    return key


def priority_rules(num_stages: int) -> list[tuple[str, PriorityKey]]:
    """The rules the interleaved builder tries (module docstring)."""
    rules = [("critical_path", _critical_path_rule)]
    for below in range(num_stages + 1):
        for backward_first in (False, True):
            for critical_path_first in (False, True):
                name = (f"kinds(defer_backward_below={below}, backward_first={backward_first}, "
                        f"then {'critical path' if critical_path_first else 'microbatch'})")
                rules.append((name, _kind_rule(below, backward_first, critical_path_first)))
    return rules


def _activation_group(graph: OpGraph, op: Op) -> tuple[str, int] | None:
    if op.kind == FORWARD:
        return (op.role, op.microbatch)
    if op.kind == BACKWARD:
        return (op.role, graph[op.forward_of].microbatch)
    return None


def _within_cap(graph: OpGraph, costs: CostModel, max_inflight_activations: int | None,
                max_activation_bytes: int | None) -> bool:
    """Whether running the graph's ops in order on one stage keeps the activation groups it holds
    (counted as whole groups from their first forward) within the caps."""
    first_forward, last_backward = {}, {}
    for i, op in enumerate(graph.ops):
        group = _activation_group(graph, op)
        if op.kind == FORWARD:
            first_forward.setdefault(group, i)
        elif op.kind == BACKWARD:
            last_backward[group] = i
    group_bytes: dict = defaultdict(int)
    for op in graph.ops:
        if op.kind == FORWARD:
            group_bytes[_activation_group(graph, op)] += costs.held_activation_bytes(op, 0, 1)
    for i in range(len(graph.ops)):
        live = [g for g in first_forward if first_forward[g] <= i <= last_backward[g]]
        if max_inflight_activations is not None and len(live) > max_inflight_activations:
            return False
        if max_activation_bytes is not None and sum(group_bytes[g] for g in live) > max_activation_bytes:
            return False
    return True


def interleaved_orders(graph: OpGraph, num_stages: int, costs: CostModel,
                       priority: PriorityKey = _critical_path_rule, max_inflight_activations: int | None = None,
                       max_activation_bytes: int | None = None) -> list[list[str]]:
    """List-schedule every task under ``priority`` (larger key first); returns per-stage compute orders."""
    p = num_stages
    if max_inflight_activations is not None and max_inflight_activations < 1:
        raise ScheduleError(f"max_inflight_activations must be >= 1, got {max_inflight_activations}")
    tasks: list[Task] = [(op.name, s) for op in graph.ops for s in op_stages(op, p)]  # topological
    inputs = {t: task_inputs(graph, graph[t[0]], t[1], p) for t in tasks}
    dur = {t: costs.compute_seconds(graph[t[0]], t[1], p) for t in tasks}
    sched = Schedule("interleaved", graph, p, ())  # for message_bytes

    def comm(msg: Message | None) -> float:
        return 0.0 if msg is None else costs.transfer_seconds(message_bytes(sched, costs, msg))

    succ: dict[Task, list[tuple[Task, float]]] = defaultdict(list)
    for t in tasks:
        for dep, msg in inputs[t]:
            succ[dep].append((t, comm(msg)))
    tail: dict[Task, float] = {}
    for t in reversed(tasks):
        tail[t] = dur[t] + max((c + tail[u] for u, c in succ[t]), default=0.0)
    index = {op.name: i for i, op in enumerate(graph.ops)}

    group_bytes: dict[tuple, int] = defaultdict(int)
    for op in graph.ops:
        if op.kind == FORWARD:
            for s in range(p):
                group_bytes[(_activation_group(graph, op), s)] += costs.held_activation_bytes(op, s, p)
    if max_activation_bytes is not None:
        for (group, s), nbytes in group_bytes.items():
            if nbytes > max_activation_bytes:
                raise ScheduleError(f"max_activation_bytes {max_activation_bytes} is below the {nbytes} bytes one "
                                    f"microbatch of {group[0]} holds on stage {s}; raise the cap or use smaller "
                                    f"microbatches")
    backwards_left: dict[tuple, int] = defaultdict(int)
    for op in graph.ops:
        if op.kind == BACKWARD:
            for s in range(p):
                backwards_left[(_activation_group(graph, op), s)] += 1

    admitted: list[set] = [set() for _ in range(p)]
    reserved = [0] * p

    def admissible(t: Task) -> bool:
        op, s = graph[t[0]], t[1]
        group = _activation_group(graph, op)
        if op.kind != FORWARD or group in admitted[s]:
            return True
        if max_inflight_activations is not None and len(admitted[s]) >= max_inflight_activations:
            return False
        return max_activation_bytes is None or reserved[s] + group_bytes[(group, s)] <= max_activation_bytes

    waiting = {t: len(inputs[t]) for t in tasks}
    ready_at = {t: 0.0 for t in tasks}
    ready: list[set] = [set() for _ in range(p)]
    for t in tasks:
        if waiting[t] == 0:
            ready[t[1]].add(t)
    free_at = [0.0] * p
    orders: list[list[str]] = [[] for _ in range(p)]
    for _ in range(len(tasks)):
        best = None
        for s in range(p):
            cands = [t for t in ready[s] if admissible(t)]
            if cands:
                when = max(free_at[s], min(ready_at[t] for t in cands))
                if best is None or when < best[0]:
                    best = (when, s, cands)
        if best is None:
            held = {s: sorted(admitted[s]) for s in range(p)}
            raise ScheduleError(f"interleaved schedule cannot progress under the activation cap "
                                f"(max_inflight_activations={max_inflight_activations}, max_activation_bytes="
                                f"{max_activation_bytes}); groups held per stage: {held}. Raise the cap.")
        when, s, cands = best
        chosen = max((t for t in cands if ready_at[t] <= when),
                     key=lambda t: priority(graph[t[0]], t[1], tail[t], index[t[0]]))
        op = graph[chosen[0]]
        group = _activation_group(graph, op)
        if op.kind == FORWARD and group not in admitted[s]:
            admitted[s].add(group)
            reserved[s] += group_bytes[(group, s)]
        if op.kind == BACKWARD:
            reserved[s] -= costs.held_activation_bytes(graph[op.forward_of], s, p)
            backwards_left[(group, s)] -= 1
            if backwards_left[(group, s)] == 0:
                admitted[s].discard(group)
        free_at[s] = when + dur[chosen]
        orders[s].append(op.name)
        ready[s].discard(chosen)
        for u, c in succ[chosen]:
            waiting[u] -= 1
            ready_at[u] = max(ready_at[u], free_at[s] + c)
            if waiting[u] == 0:
                ready[u[1]].add(u)
    return orders


def interleaved_schedule(graph: OpGraph, num_stages: int, costs: CostModel | None = None, *,
                         max_inflight_activations: int | None = None,
                         max_activation_bytes: int | None = None) -> Schedule:
    """Try every rule of ``priority_rules`` and keep the schedule whose replay under ``costs``
    (unit costs by default) has the smallest makespan. With one stage there are no bubbles to
    fill: the graph's ops in order, unless that order breaks the activation cap."""
    _check_stages(num_stages)
    costs = costs or UnitCostModel()
    if num_stages == 1:
        in_order = assemble("interleaved", graph, 1, [[op.name for op in graph.ops]], detail="graph order")
        if _within_cap(graph, costs, max_inflight_activations, max_activation_bytes):
            return in_order
    best: tuple[float, Schedule] | None = None
    for rule_name, rule in priority_rules(num_stages):
        orders = interleaved_orders(graph, num_stages, costs, rule, max_inflight_activations, max_activation_bytes)
        schedule = assemble("interleaved", graph, num_stages, orders, detail=f"priority {rule_name}")
        makespan = simulate(schedule, costs).makespan
        if best is None or makespan < best[0]:
            best = (makespan, schedule)
    return best[1]


def build_schedule(name: str, graph: OpGraph, num_stages: int, costs: CostModel | None = None, *,
                   max_inflight_activations: int | None = None, max_activation_bytes: int | None = None,
                   validate: bool = True) -> Schedule:
    """Build the schedule ``name`` (one of SCHEDULES) and validate it."""
    if name == "sequential":
        schedule = sequential_schedule(graph, num_stages)
    elif name == "interleaved":
        schedule = interleaved_schedule(graph, num_stages, costs, max_inflight_activations=max_inflight_activations,
                                        max_activation_bytes=max_activation_bytes)
    else:
        raise ValueError(f"unknown schedule {name!r}; choose one of {SCHEDULES}")
    if validate:
        validate_schedule(schedule)
    return schedule


def _check_stages(num_stages: int) -> None:
    if num_stages < 1:
        raise ScheduleError(f"num_stages must be >= 1, got {num_stages}")


# ----------------------------------------------------------------------------- validation

def validate_schedule(schedule: Schedule) -> None:
    """Raise ScheduleError unless: every op runs exactly once on every stage; every compute comes
    after its same-stage dependencies and after the receives of its messages; every message is
    sent once after its producer and received once, in the send order of its ordered stage pair;
    each trainable role steps its optimizer once per stage after its last backward there; and a
    replay with blocking receives finishes (no deadlock)."""
    graph, p = schedule.graph, schedule.num_stages
    if len(schedule.stages) != p:
        raise ScheduleError(f"schedule has {len(schedule.stages)} stage lists for {p} stages")
    sent: dict[tuple[int, int], list[Message]] = defaultdict(list)
    received: dict[tuple[int, int], list[Message]] = defaultdict(list)
    needed: set[Message] = set()
    for s, instrs in enumerate(schedule.stages):
        where = f"stage {s}"
        computed: dict[str, int] = {}
        got: set[Message] = set()
        stepped: dict[str, int] = {}
        for i, ins in enumerate(instrs):
            if isinstance(ins, Compute):
                if ins.op not in graph.by_name:
                    raise ScheduleError(f"{where}: computes unknown op {ins.op}")
                if ins.op in computed:
                    raise ScheduleError(f"{where}: computes {ins.op} twice")
                op = graph[ins.op]
                for dep, msg in task_inputs(graph, op, s, p):
                    if msg is None and dep[0] not in computed:
                        raise ScheduleError(f"{where}: {op.name} runs before its dependency {dep[0]}")
                    if msg is not None and msg not in got:
                        raise ScheduleError(f"{where}: {op.name} runs before receiving {msg}")
                    if msg is not None:
                        needed.add(msg)
                if op.role in stepped:
                    raise ScheduleError(f"{where}: {op.name} runs after the optimizer step of {op.role}")
                computed[ins.op] = i
            elif isinstance(ins, SENDS):
                msg = ins.message
                if msg.src != s:
                    raise ScheduleError(f"{where}: sends {msg}, which leaves stage {msg.src}")
                if msg.op not in computed:
                    raise ScheduleError(f"{where}: sends {msg} before computing {msg.op}")
                if type(ins) is not type(send_of(msg)):
                    raise ScheduleError(f"{where}: {ins} uses the wrong send kind for {msg}")
                sent[(msg.src, msg.dst)].append(msg)
            elif isinstance(ins, RECVS):
                msg = ins.message
                if msg.dst != s:
                    raise ScheduleError(f"{where}: receives {msg}, which goes to stage {msg.dst}")
                if type(ins) is not type(recv_of(msg)):
                    raise ScheduleError(f"{where}: {ins} uses the wrong receive kind for {msg}")
                if msg in got:
                    raise ScheduleError(f"{where}: receives {msg} twice")
                got.add(msg)
                received[(msg.src, msg.dst)].append(msg)
            elif isinstance(ins, OptimizerStep):
                if ins.role in stepped:
                    raise ScheduleError(f"{where}: steps the optimizer of {ins.role} twice")
                stepped[ins.role] = i
            else:
                raise ScheduleError(f"{where}: unknown instruction {ins!r}")
        expected = {op.name for op in graph.ops}
        if set(computed) != expected:
            missing = sorted(expected - set(computed))[:5]
            raise ScheduleError(f"{where}: ops never computed: {missing}")
        if set(stepped) != set(graph.trainable_roles):
            raise ScheduleError(f"{where}: optimizer steps for {sorted(stepped)}, trainable roles are "
                                f"{sorted(graph.trainable_roles)}")
    for pair in set(sent) | set(received):
        if sent[pair] != received[pair]:
            raise ScheduleError(f"stage {pair[0]} sends {[str(m) for m in sent[pair]][:6]} but stage {pair[1]} "
                                f"receives {[str(m) for m in received[pair]][:6]}: counts and order must match")
    all_sent = {m for msgs in sent.values() for m in msgs}
    if all_sent != needed or sum(len(v) for v in sent.values()) != len(all_sent):
        extra, missing = sorted(map(str, all_sent - needed))[:5], sorted(map(str, needed - all_sent))[:5]
        raise ScheduleError(f"messages sent and messages needed differ (or one is sent twice): extra {extra}, "
                            f"missing {missing}")
    simulate(schedule, UnitCostModel())  # raises on deadlock


# ----------------------------------------------------------------------------- printing

def format_schedule(schedule: Schedule) -> str:
    """One block per stage, one instruction per line."""
    detail = f" [{schedule.detail}]" if schedule.detail else ""
    lines = [f"schedule {schedule.name}{detail}: {schedule.graph.title}, {schedule.num_stages} stage(s), "
             f"{schedule.graph.num_microbatches} microbatch(es)"]
    for s, instrs in enumerate(schedule.stages):
        lines.append(f"stage {s}: {len(instrs)} instructions")
        lines += [f"  {i:4d}  {ins}" for i, ins in enumerate(instrs)]
    return "\n".join(lines)

"""Timeline output of a simulation: an ASCII chart and a Chrome trace (chrome://tracing, Perfetto)."""

from __future__ import annotations

import json
import os
import tempfile

from .graph import BACKWARD, FORWARD, FORWARD_NOGRAD
from .simulator import SimResult

_BACKWARD_CHAR = {"student": "B", "critic": "K", "teacher": "U"}


def op_char(role: str, kind: str) -> str:
    """Forward with grad: the role's initial in upper case; forward without grad: lower case;
    backward: B (student), K (critic), U (teacher), '<' (other roles); optimizer step: 'o'."""
    initial = role[:1] or "?"
    if kind == FORWARD:
        return initial.upper()
    if kind == FORWARD_NOGRAD:
        return initial.lower()
    if kind == BACKWARD:
        return _BACKWARD_CHAR.get(role, "<")
    return "o"


def ascii_timeline(result: SimResult, width: int = 100) -> str:
    """One row per stage, ``width`` columns over the makespan; each column shows the op running
    at the column's midpoint ('.' when the stage is idle)."""
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    rows = [["."] * width for _ in range(result.num_stages)]
    span = result.makespan or 1.0
    for ev in result.events:
        if ev.end <= ev.start:
            continue
        first = int(ev.start / span * width + 0.5)
        last = int(ev.end / span * width + 0.5)
        for col in range(first, min(last, width)):
            rows[ev.stage][col] = op_char(ev.role, ev.kind)
    roles = sorted({ev.role for ev in result.events if ev.kind != "optimizer_step"})
    legend = ", ".join(f"{op_char(r, k)}={r} {k}" for r in roles for k in (FORWARD, FORWARD_NOGRAD, BACKWARD)
                       if any(ev.role == r and ev.kind == k for ev in result.events))
    lines = [f"{result.schedule}: makespan {result.makespan:.4g}, bubble {result.bubble_fraction:.1%}"]
    lines += [f"stage {s:2d} |{''.join(row)}| bubble {result.bubble_fraction_per_stage[s]:.1%}"
              for s, row in enumerate(rows)]
    lines.append(f"  {legend}, .=idle")
    return "\n".join(lines)


def chrome_trace(result: SimResult, label: str | None = None) -> dict:
    """JSON trace-event format: one complete event ("ph": "X") per compute, one row (tid) per
    stage, times in microseconds of simulated time."""
    label = label or result.schedule
    events = [{"name": "process_name", "ph": "M", "pid": 0, "args": {"name": label}}]
    for s in range(result.num_stages):
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": s, "args": {"name": f"stage {s}"}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": s, "args": {"sort_index": s}})
    for ev in result.events:
        events.append({"name": ev.name, "cat": f"{ev.role}.{ev.kind}", "ph": "X", "pid": 0, "tid": ev.stage,
                       "ts": ev.start * 1e6, "dur": (ev.end - ev.start) * 1e6,
                       "args": {"role": ev.role, "kind": ev.kind, "microbatch": ev.microbatch}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chrome_trace(results: list[tuple[str, SimResult]], path: str) -> None:
    """Write one trace with a process (pid) per (label, simulation); atomically (temp + rename)."""
    events = []
    for pid, (label, result) in enumerate(results):
        for ev in chrome_trace(result, label)["traceEvents"]:
            events.append({**ev, "pid": pid})
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".trace-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise

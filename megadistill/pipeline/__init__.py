"""Pipeline-parallel schedule engine: op graphs of a training step, per-stage instruction lists,
a simulator of those lists and timeline output. Pure data; imports no model, method or torch."""

from .costs import (WAN_1_3B, WAN_14B, DiTShape, FlopsCostModel, MeasuredCostModel, UnitCostModel,
                    block_forward_flops, split_layers)
from .graph import (BACKWARD, FORWARD, FORWARD_NOGRAD, GraphError, Op, OpGraph, dmd2_critic_graph,
                    dmd2_generator_graph, self_forcing_critic_graph, self_forcing_generator_graph,
                    single_role_graph)
from .instructions import (Compute, Message, OptimizerStep, RecvActivation, RecvGrad, Schedule, SendActivation,
                           SendGrad)
from .schedules import (SCHEDULES, build_schedule, format_schedule, interleaved_schedule, sequential_schedule,
                        validate_schedule)
from .simulator import ScheduleError, SimResult, simulate
from .trace import ascii_timeline, chrome_trace, write_chrome_trace

__all__ = [
    "BACKWARD", "FORWARD", "FORWARD_NOGRAD", "SCHEDULES", "WAN_1_3B", "WAN_14B", "Compute", "DiTShape",
    "FlopsCostModel", "GraphError", "MeasuredCostModel", "Message", "Op", "OpGraph", "OptimizerStep",
    "RecvActivation", "RecvGrad", "Schedule", "ScheduleError", "SendActivation", "SendGrad", "SimResult",
    "UnitCostModel", "ascii_timeline", "block_forward_flops", "build_schedule", "chrome_trace",
    "dmd2_critic_graph", "dmd2_generator_graph", "format_schedule", "interleaved_schedule",
    "self_forcing_critic_graph", "self_forcing_generator_graph", "sequential_schedule", "simulate", "single_role_graph",
    "split_layers", "validate_schedule", "write_chrome_trace",
]

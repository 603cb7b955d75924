"""Small graphs for the pipeline tests."""

from megadistill.pipeline.graph import BACKWARD, FORWARD, Op, OpGraph


def train_graph(num_microbatches: int, role: str = "student") -> OpGraph:
    """One trainable role, forward then backward per microbatch (plain 1F1B training)."""
    ops = []
    for m in range(num_microbatches):
        fwd = Op(role, FORWARD, m, f"{role}.forward")
        ops += [fwd, Op(role, BACKWARD, m, f"{role}.backward", deps=(fwd.name,), forward_of=fwd.name)]
    return OpGraph(tuple(ops), title="train")

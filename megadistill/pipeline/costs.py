"""Per-op costs for the schedule builder and the simulator: compute time, held activation bytes,
p2p message bytes and transfer time. Plain numbers only (dims, layer counts, token counts).

FLOPs of one Wan DiT block forward, T query tokens, K self-attention key tokens, L text tokens,
hidden d, FFN width f (a multiply-add is 2 FLOPs):

    self-attn q,k,v,o       2*T*4*d^2
    self-attn scores + AV   4*T*K*d          (K = T for a full clip)
    cross-attn q,o          2*T*2*d^2
    cross-attn k,v of text  2*L*2*d^2
    cross-attn scores + AV  4*T*L*d
    FFN                     2*T*2*f*d

Stage 0 also runs the patch embedding (2*T*c_in*d, c_in = 16*1*2*2), the text embedding
(2*L*(4096*d + d^2)) and the time embedding; the last stage runs the head (2*T*d*c_out).
A backward costs ``backward_factor`` (2) times its forward.

Held activations of a forward with grad, per block and token, are estimated as
``18*d + 2*f`` elements (adaLN inputs, q/k/v before and after norm+RoPE, attention outputs and
log-sum-exp, cross-attention q/out, FFN input, hidden and GELU output) of ``dtype_bytes`` each,
with a flash-attention kernel (no T x K score matrix is kept).

A stage-to-stage message carries the hidden states plus the projected text context:
``(T + L)*d*dtype_bytes``; a loop-back message (a forward's output fed to the next model's
embedding) carries the latent: ``T*c_out*dtype_bytes``. Transfer time = latency + bytes/bandwidth;
transfers do not share bandwidth with each other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Protocol

from .graph import BACKWARD, FORWARD, OP_KINDS, Op

LATENT_ELEMS_PER_TOKEN = 16 * 1 * 2 * 2  # 16 latent channels, patch (1, 2, 2)


class CostModel(Protocol):
    def compute_seconds(self, op: Op, stage: int, num_stages: int) -> float: ...
    def held_activation_bytes(self, op: Op, stage: int, num_stages: int) -> int: ...
    def hop_bytes(self, op: Op) -> int: ...
    def output_bytes(self, op: Op) -> int: ...
    def transfer_seconds(self, nbytes: int) -> float: ...
    def optimizer_seconds(self, role: str, stage: int, num_stages: int) -> float: ...


def split_layers(num_layers: int, num_stages: int) -> list[int]:
    """Blocks per stage, as even as possible; the first ``num_layers % num_stages`` stages get one more."""
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if num_layers < num_stages:
        raise ValueError(f"cannot split {num_layers} blocks over {num_stages} pipeline stages; "
                         f"use at most {num_layers} stages")
    base, extra = divmod(num_layers, num_stages)
    return [base + (1 if s < extra else 0) for s in range(num_stages)]


@dataclass(frozen=True)
class DiTShape:
    """Sizes of one role's Wan DiT."""

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    text_dim: int = 4096
    freq_dim: int = 256
    in_elems_per_token: int = LATENT_ELEMS_PER_TOKEN
    out_elems_per_token: int = LATENT_ELEMS_PER_TOKEN

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if min(self.dim, self.ffn_dim, self.num_layers) < 1:
            raise ValueError(f"DiTShape sizes must be positive: {self}")


WAN_1_3B = DiTShape(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
WAN_14B = DiTShape(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)


def block_forward_flops(shape: DiTShape, tokens: int, kv_tokens: int, text_len: int) -> float:
    d, f, t, k, n = shape.dim, shape.ffn_dim, tokens, kv_tokens, text_len
    linear = 2 * t * (4 * d * d + 2 * d * d + 2 * f * d)
    self_attn = 4 * t * k * d
    cross_kv = 2 * n * 2 * d * d
    cross_scores = 4 * t * n * d
    return float(linear + self_attn + cross_kv + cross_scores)


def embed_forward_flops(shape: DiTShape, tokens: int, text_len: int) -> float:
    d = shape.dim
    patch = 2 * tokens * shape.in_elems_per_token * d
    text = 2 * text_len * (shape.text_dim * d + d * d)
    time = 2 * (shape.freq_dim * d + d * d) + 2 * d * 6 * d
    return float(patch + text + time)


def head_forward_flops(shape: DiTShape, tokens: int) -> float:
    return float(2 * tokens * shape.dim * shape.out_elems_per_token)


@dataclass(frozen=True)
class FlopsCostModel:
    """Analytic costs from the Wan FLOP count (module docstring) at ``flops_per_second`` per GPU."""

    roles: dict[str, DiTShape]
    tokens: int = 32760
    text_len: int = 512
    flops_per_second: float = 400e12
    p2p_bandwidth: float = 25e9
    p2p_latency: float = 20e-6
    dtype_bytes: int = 2
    backward_factor: float = 2.0
    optimizer_seconds_per_step: float = 0.0

    def __post_init__(self):
        if self.flops_per_second <= 0 or self.p2p_bandwidth <= 0 or self.p2p_latency < 0:
            raise ValueError("flops_per_second and p2p_bandwidth must be > 0 and p2p_latency >= 0")

    def shape(self, role: str) -> DiTShape:
        if role not in self.roles:
            raise KeyError(f"no DiT shape for role {role!r}; the cost model knows {sorted(self.roles)}")
        return self.roles[role]

    def _tokens(self, op: Op) -> tuple[int, int]:
        t = op.tokens if op.tokens is not None else self.tokens
        return t, op.kv_tokens if op.kv_tokens is not None else t

    def forward_flops(self, op: Op, stage: int, num_stages: int) -> float:
        shape = self.shape(op.role)
        t, k = self._tokens(op)
        blocks = split_layers(shape.num_layers, num_stages)[stage]
        flops = blocks * block_forward_flops(shape, t, k, self.text_len)
        if stage == 0:
            flops += embed_forward_flops(shape, t, self.text_len)
        if stage == num_stages - 1:
            flops += head_forward_flops(shape, t)
        return flops

    def compute_seconds(self, op: Op, stage: int, num_stages: int) -> float:
        factor = self.backward_factor if op.kind == BACKWARD else 1.0
        return factor * self.forward_flops(op, stage, num_stages) / self.flops_per_second

    def held_activation_bytes(self, op: Op, stage: int, num_stages: int) -> int:
        if op.kind != FORWARD:
            return 0
        shape = self.shape(op.role)
        t, _ = self._tokens(op)
        blocks = split_layers(shape.num_layers, num_stages)[stage]
        return blocks * t * (18 * shape.dim + 2 * shape.ffn_dim) * self.dtype_bytes

    def hop_bytes(self, op: Op) -> int:
        t, _ = self._tokens(op)
        return (t + self.text_len) * self.shape(op.role).dim * self.dtype_bytes

    def output_bytes(self, op: Op) -> int:
        t, _ = self._tokens(op)
        return t * self.shape(op.role).out_elems_per_token * self.dtype_bytes

    def transfer_seconds(self, nbytes: int) -> float:
        return self.p2p_latency + nbytes / self.p2p_bandwidth

    def optimizer_seconds(self, role: str, stage: int, num_stages: int) -> float:
        return self.optimizer_seconds_per_step


@dataclass(frozen=True)
class UnitCostModel:
    """Hand-checkable costs: forward 1, backward 2, no transfer time, 1 byte held per forward."""

    forward: float = 1.0
    backward: float = 2.0
    transfer: float = 0.0

    def compute_seconds(self, op: Op, stage: int, num_stages: int) -> float:
        return self.backward if op.kind == BACKWARD else self.forward

    def held_activation_bytes(self, op: Op, stage: int, num_stages: int) -> int:
        return 1 if op.kind == FORWARD else 0

    def hop_bytes(self, op: Op) -> int:
        return 1

    def output_bytes(self, op: Op) -> int:
        return 1

    def transfer_seconds(self, nbytes: int) -> float:
        return self.transfer

    def optimizer_seconds(self, role: str, stage: int, num_stages: int) -> float:
        return 0.0


def _per_stage(value, num_stages: int, where: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * num_stages
    if isinstance(value, list) and len(value) == num_stages and all(isinstance(v, (int, float)) for v in value):
        return [float(v) for v in value]
    raise ValueError(f"{where}: expected a number or a list of {num_stages} numbers (one per stage), got {value!r}")


@dataclass(frozen=True)
class MeasuredCostModel:
    """Per-op times measured on the target machine, read from JSON::

        {"num_stages": 4,
         "compute_seconds": {"student": {"forward": 0.18, "forward_nograd": 0.17, "backward": [..4..]},
                             "teacher": {"forward_nograd": 1.05}, ...},
         "activation_bytes": {"student": 2.2e10, ...},      # held per forward with grad
         "hop_bytes": {"student": 1.0e8, ...},              # one stage-to-stage message
         "output_bytes": 4.2e6,                             # one loop-back message
         "p2p_bandwidth": 25e9, "p2p_latency": 2e-5,
         "optimizer_seconds": {"student": 0.05}}

    Every value may be one number (all stages) or a list with one number per stage. Times are
    per (role, kind, stage): ops of one role and kind with different token counts (self-forcing
    blocks with growing KV cache) get the same time, so measure a representative op.
    """

    num_stages: int
    compute: dict[str, dict[str, list[float]]]
    activation_bytes: dict[str, list[float]] = field(default_factory=dict)
    hop: dict[str, float] = field(default_factory=dict)
    output: float = 0.0
    p2p_bandwidth: float = 25e9
    p2p_latency: float = 20e-6
    optimizer: dict[str, list[float]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict, source: str = "measured costs") -> "MeasuredCostModel":
        if "num_stages" not in data or "compute_seconds" not in data:
            raise ValueError(f"{source}: needs keys 'num_stages' and 'compute_seconds'")
        p = int(data["num_stages"])
        compute = {}
        for role, kinds in data["compute_seconds"].items():
            for kind in kinds:
                if kind not in OP_KINDS:
                    raise ValueError(f"{source}: compute_seconds.{role}.{kind}: kind must be one of {OP_KINDS}")
            compute[role] = {k: _per_stage(v, p, f"{source}: compute_seconds.{role}.{k}") for k, v in kinds.items()}
        return cls(
            num_stages=p,
            compute=compute,
            activation_bytes={r: _per_stage(v, p, f"{source}: activation_bytes.{r}")
                              for r, v in data.get("activation_bytes", {}).items()},
            hop={r: float(v) for r, v in data.get("hop_bytes", {}).items()},
            output=float(data.get("output_bytes", 0.0)),
            p2p_bandwidth=float(data.get("p2p_bandwidth", 25e9)),
            p2p_latency=float(data.get("p2p_latency", 20e-6)),
            optimizer={r: _per_stage(v, p, f"{source}: optimizer_seconds.{r}")
                       for r, v in data.get("optimizer_seconds", {}).items()},
        )

    @classmethod
    def from_json(cls, path: str) -> "MeasuredCostModel":
        with open(path) as f:
            return cls.from_dict(json.load(f), source=path)

    def _check_stages(self, num_stages: int) -> None:
        if num_stages != self.num_stages:
            raise ValueError(f"measured costs are for {self.num_stages} stages, the schedule has {num_stages}; "
                             f"measure with the same pipeline size")

    def compute_seconds(self, op: Op, stage: int, num_stages: int) -> float:
        self._check_stages(num_stages)
        try:
            return self.compute[op.role][op.kind][stage]
        except KeyError:
            raise KeyError(f"measured costs have no compute_seconds.{op.role}.{op.kind} "
                           f"(needed by {op.name})") from None

    def held_activation_bytes(self, op: Op, stage: int, num_stages: int) -> int:
        self._check_stages(num_stages)
        if op.kind != FORWARD:
            return 0
        return int(self.activation_bytes.get(op.role, [0.0] * self.num_stages)[stage])

    def hop_bytes(self, op: Op) -> int:
        return int(self.hop.get(op.role, 0.0))

    def output_bytes(self, op: Op) -> int:
        return int(self.output)

    def transfer_seconds(self, nbytes: int) -> float:
        return self.p2p_latency + nbytes / self.p2p_bandwidth

    def optimizer_seconds(self, role: str, stage: int, num_stages: int) -> float:
        return self.optimizer.get(role, [0.0] * self.num_stages)[stage]

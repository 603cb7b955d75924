"""Op graphs: one training step as model calls per microbatch.

A method describes one optimizer step as a graph of *ops*. An op is one full pass of one role's
DiT (embedding, all blocks, head) over one microbatch; under pipeline parallelism every op runs
on every stage, stage 0 -> P-1 for a forward and P-1 -> 0 for a backward.

Op kinds:
    forward         forward with autograd; holds its activations on every stage until its
                    backward has run there.
    forward_nograd  forward under no_grad (teacher, critic fake score, rollout steps before the
                    exit step, KV-cache writes); holds nothing once it finishes.
    backward        backward of one ``forward`` op (``forward_of``); starts on the last stage
                    where the loss is computed from the outputs of its ``deps``.

Two kinds of dependency:
    deps        data: the dependency's *output* is this op's *input*. A forward's output lives on
                the last stage (after the head), a backward's on stage 0; a forward's input
                enters on stage 0, a backward's on the last stage. When they differ the schedule
                carries the output across (a "loop-back" activation, e.g. the student sample
                from stage P-1 to the teacher's embedding on stage 0).
    stage_deps  state: the dependency left state on *every* stage that this op reads on the
                same stage (the causal student's KV cache written by a cache-write forward).

Ops are listed in a topological order: every dependency names an op listed earlier. Ops are
named ``mb{microbatch}/{step}``; ``step`` names the model call within one microbatch, the same
string for every microbatch (the sequential schedule runs one "pass" per step).

This module is pure data: no torch, no process groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FORWARD = "forward"
FORWARD_NOGRAD = "forward_nograd"
BACKWARD = "backward"
OP_KINDS = (FORWARD, FORWARD_NOGRAD, BACKWARD)


class GraphError(ValueError):
    """An op graph is malformed (unknown dependency, cycle, forward without backward...)."""


def op_name(microbatch: int, step: str) -> str:
    return f"mb{microbatch}/{step}"


@dataclass(frozen=True)
class Op:
    """One model call of one role on one microbatch (see the module docstring).

    ``tokens`` is the number of query tokens the call processes (None: the role's full clip) and
    ``kv_tokens`` the number of self-attention key tokens (None: same as ``tokens``; a causal
    block attending to a KV cache has ``kv_tokens`` = cache prefix + its own tokens).
    """

    role: str
    kind: str
    microbatch: int
    step: str
    deps: tuple[str, ...] = ()
    stage_deps: tuple[str, ...] = ()
    forward_of: str | None = None
    tokens: int | None = None
    kv_tokens: int | None = None

    def __post_init__(self):
        if self.kind not in OP_KINDS:
            raise GraphError(f"op {self.step!r}: kind {self.kind!r} is not one of {OP_KINDS}")
        if self.microbatch < 0:
            raise GraphError(f"op {self.step!r}: microbatch must be >= 0, got {self.microbatch}")
        if (self.kind == BACKWARD) != (self.forward_of is not None):
            raise GraphError(f"op {self.name}: a backward op needs forward_of, and only a backward op has one")
        for value, what in ((self.tokens, "tokens"), (self.kv_tokens, "kv_tokens")):
            if value is not None and value <= 0:
                raise GraphError(f"op {self.name}: {what} must be positive, got {value}")

    @property
    def name(self) -> str:
        return op_name(self.microbatch, self.step)

    @property
    def holds_activations(self) -> bool:
        return self.kind == FORWARD


@dataclass(frozen=True)
class OpGraph:
    """A validated, topologically ordered list of ops."""

    ops: tuple[Op, ...]
    title: str = ""
    by_name: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "ops", tuple(self.ops))
        by_name: dict[str, Op] = {}
        for op in self.ops:
            if op.name in by_name:
                raise GraphError(f"duplicate op {op.name}")
            for dep in op.deps + op.stage_deps + ((op.forward_of,) if op.forward_of else ()):
                if dep not in by_name:
                    raise GraphError(f"op {op.name} depends on {dep!r}, which is not an op listed before it")
            if op.forward_of is not None:
                fwd = by_name[op.forward_of]
                if fwd.kind != FORWARD or fwd.role != op.role:
                    raise GraphError(f"backward {op.name} must differentiate a forward of role {op.role}, "
                                     f"got {fwd.name} ({fwd.role}, {fwd.kind})")
            by_name[op.name] = op
        backward_of = [op.forward_of for op in self.ops if op.kind == BACKWARD]
        for op in self.ops:
            count = backward_of.count(op.name)
            if op.kind == FORWARD and count != 1:
                raise GraphError(f"forward {op.name} has {count} backward ops; a forward with grad needs "
                                 f"exactly one (use {FORWARD_NOGRAD!r} for a forward without backward)")
        object.__setattr__(self, "by_name", by_name)

    def __getitem__(self, name: str) -> Op:
        return self.by_name[name]

    def __len__(self) -> int:
        return len(self.ops)

    @property
    def num_microbatches(self) -> int:
        return 1 + max(op.microbatch for op in self.ops) if self.ops else 0

    @property
    def trainable_roles(self) -> tuple[str, ...]:
        """Roles with a backward op, in order of their first backward (each gets an optimizer step)."""
        roles: list[str] = []
        for op in self.ops:
            if op.kind == BACKWARD and op.role not in roles:
                roles.append(op.role)
        return tuple(roles)

    @property
    def steps(self) -> tuple[str, ...]:
        """Distinct step names in order of first appearance."""
        return tuple(dict.fromkeys(op.step for op in self.ops))


def _check_microbatches(num_microbatches: int) -> None:
    if num_microbatches < 1:
        raise GraphError(f"num_microbatches must be >= 1, got {num_microbatches}")


def single_role_graph(num_microbatches: int, title: str, role: str = "student") -> OpGraph:
    """One trained role, per microbatch ``<role>.denoise`` (forward) and ``<role>.backward``: the
    step of finetune and ODE-init."""
    _check_microbatches(num_microbatches)
    ops = []
    for m in range(num_microbatches):
        fwd = Op(role, FORWARD, m, f"{role}.denoise")
        ops += [fwd, Op(role, BACKWARD, m, f"{role}.backward", deps=(fwd.name,), forward_of=fwd.name)]
    return OpGraph(tuple(ops), title=title)


def dmd2_generator_graph(num_microbatches: int, *, cfg: bool = True, update_critic: bool = True,
                         student: str = "student", teacher: str = "teacher", critic: str = "critic") -> OpGraph:
    """DMD2 generator step (the iteration that updates the generator; with the two time-scale
    rule every ``generator_update_interval``-th one). Per microbatch m:

        student.rollout   forward         student maps noise to a sample x (few-step generator;
                                          the graded step).
        teacher.cond      forward_nograd  real score on noised x with the prompt; deps: rollout.
        teacher.uncond    forward_nograd  real score with the empty prompt (CFG; only if cfg).
        critic.fake       forward_nograd  fake score on noised x; deps: rollout.
        student.backward  backward        DMD loss 0.5*||x - sg(x - grad)||^2 on the last stage,
                                          then backward of rollout; deps: rollout, teacher.*,
                                          critic.fake.
    and, since the critic also updates at every iteration (``update_critic``), DMD2's critic turn
    on the same detached sample:
        critic.denoise    forward         critic's flow prediction on freshly noised sg(x);
                                          deps: rollout.
        critic.backward   backward        flow-matching MSE, backward of critic.denoise.
    Each trainable role steps its optimizer after its last op on a stage, so critic.fake always
    sees the critic's weights from before the update. ``update_critic=False`` gives the
    generator turn alone.
    """
    _check_microbatches(num_microbatches)
    ops: list[Op] = []
    for m in range(num_microbatches):
        rollout = Op(student, FORWARD, m, "student.rollout")
        scores = [Op(teacher, FORWARD_NOGRAD, m, "teacher.cond", deps=(rollout.name,))]
        if cfg:
            scores.append(Op(teacher, FORWARD_NOGRAD, m, "teacher.uncond", deps=(rollout.name,)))
        scores.append(Op(critic, FORWARD_NOGRAD, m, "critic.fake", deps=(rollout.name,)))
        backward = Op(student, BACKWARD, m, "student.backward",
                      deps=(rollout.name,) + tuple(s.name for s in scores), forward_of=rollout.name)
        ops += [rollout, *scores, backward]
        if update_critic:
            denoise = Op(critic, FORWARD, m, "critic.denoise", deps=(rollout.name,))
            ops += [denoise, Op(critic, BACKWARD, m, "critic.backward", deps=(denoise.name,),
                                forward_of=denoise.name)]
    title = "dmd2 generator step" + (" (with critic update)" if update_critic else " (generator turn only)")
    return OpGraph(tuple(ops), title=title)


def dmd2_critic_graph(num_microbatches: int, *, student: str = "student", critic: str = "critic") -> OpGraph:
    """DMD2 critic-only step (every iteration that does not update the generator). Per microbatch m:

        student.rollout  forward_nograd  student sample x, detached.
        critic.denoise   forward         critic's flow prediction on noised x; deps: rollout.
        critic.backward  backward        flow-matching MSE, backward of critic.denoise.
    The critic's optimizer step follows the last backward.
    """
    _check_microbatches(num_microbatches)
    ops: list[Op] = []
    for m in range(num_microbatches):
        rollout = Op(student, FORWARD_NOGRAD, m, "student.rollout")
        denoise = Op(critic, FORWARD, m, "critic.denoise", deps=(rollout.name,))
        backward = Op(critic, BACKWARD, m, "critic.backward", deps=(denoise.name,), forward_of=denoise.name)
        ops += [rollout, denoise, backward]
    return OpGraph(tuple(ops), title="dmd2 critic step")


def _self_forcing_rollout(m: int, student: str, num_blocks: int, num_denoise_steps: int, exit_step: int,
                          block_tokens: int, with_grad: bool) -> tuple[list[Op], list[Op]]:
    """Block-autoregressive rollout of one microbatch; returns (ops, exit ops one per block)."""
    if num_blocks < 1 or num_denoise_steps < 1:
        raise GraphError(f"num_blocks and num_denoise_steps must be >= 1, got {num_blocks}, {num_denoise_steps}")
    if not 0 <= exit_step < num_denoise_steps:
        raise GraphError(f"exit_step must be in [0, {num_denoise_steps}), got {exit_step}")
    ops: list[Op] = []
    exits: list[Op] = []
    cache: Op | None = None
    for k in range(num_blocks):
        kv = (k + 1) * block_tokens  # the block attends to the cache of blocks < k and to itself
        cache_dep = (cache.name,) if cache is not None else ()
        prev: Op | None = None
        for j in range(exit_step + 1):
            graded = with_grad and j == exit_step
            op = Op(student, FORWARD if graded else FORWARD_NOGRAD, m, f"student.block{k}.step{j}",
                    deps=(prev.name,) if prev is not None else (), stage_deps=cache_dep,
                    tokens=block_tokens, kv_tokens=kv)
            ops.append(op)
            prev = op
        exits.append(prev)
        if k + 1 < num_blocks:  # nothing reads the last block's cache
            cache = Op(student, FORWARD_NOGRAD, m, f"student.block{k}.cache", deps=(prev.name,),
                       stage_deps=cache_dep, tokens=block_tokens, kv_tokens=kv)
            ops.append(cache)
    return ops, exits


def self_forcing_generator_graph(num_microbatches: int, *, num_blocks: int = 7, num_denoise_steps: int = 4,
                                 exit_step: int | None = None, block_tokens: int = 4680, cfg: bool = True,
                                 student: str = "student", teacher: str = "teacher",
                                 critic: str = "critic") -> OpGraph:
    """Self-forcing DMD generator step. Per microbatch m and block k (``block_tokens`` tokens,
    attention over the KV cache of earlier blocks, ``kv_tokens = (k+1)*block_tokens``):

        student.block{k}.step{j}, j < exit   forward_nograd  denoising steps before the exit step;
                                             deps: step j-1 (its x0, re-noised);
                                             stage_deps: block{k-1}.cache.
        student.block{k}.step{exit}          forward         the graded step; same deps.
        student.block{k}.cache               forward_nograd  re-run of the clean output at t=0 to
                                             write block k's KV cache on every stage; deps: the
                                             exit step; stage_deps: block{k-1}.cache. Skipped for
                                             the last block (nothing reads it).
    then on the whole clip (``num_blocks*block_tokens`` tokens, bidirectional):
        teacher.cond / teacher.uncond / critic.fake  forward_nograd; deps: every block's exit step.
        student.block{k}.backward            backward of block k's exit step (the cache was
                                             written without grad, so blocks backpropagate
                                             independently); deps: exit step, teacher.*, critic.fake.

    ``exit_step`` (default: the last step) is drawn at random per training step and shared by
    all blocks and ranks.
    """
    _check_microbatches(num_microbatches)
    exit_step = num_denoise_steps - 1 if exit_step is None else exit_step
    clip = num_blocks * block_tokens
    ops: list[Op] = []
    for m in range(num_microbatches):
        rollout, exits = _self_forcing_rollout(m, student, num_blocks, num_denoise_steps, exit_step,
                                               block_tokens, with_grad=True)
        sample = tuple(e.name for e in exits)
        scores = [Op(teacher, FORWARD_NOGRAD, m, "teacher.cond", deps=sample, tokens=clip)]
        if cfg:
            scores.append(Op(teacher, FORWARD_NOGRAD, m, "teacher.uncond", deps=sample, tokens=clip))
        scores.append(Op(critic, FORWARD_NOGRAD, m, "critic.fake", deps=sample, tokens=clip))
        score_names = tuple(s.name for s in scores)
        backwards = [Op(student, BACKWARD, m, f"student.block{k}.backward", deps=(e.name,) + score_names,
                        forward_of=e.name, tokens=e.tokens, kv_tokens=e.kv_tokens)
                     for k, e in enumerate(exits)]
        ops += rollout + scores + backwards
    return OpGraph(tuple(ops), title="self-forcing generator step")


def self_forcing_critic_graph(num_microbatches: int, *, num_blocks: int = 7, num_denoise_steps: int = 4,
                              exit_step: int | None = None, block_tokens: int = 4680,
                              student: str = "student", critic: str = "critic") -> OpGraph:
    """Self-forcing critic step: the rollout of ``self_forcing_generator_graph`` all without grad,
    then critic.denoise (forward, whole clip; deps: every block's exit step) and critic.backward."""
    _check_microbatches(num_microbatches)
    exit_step = num_denoise_steps - 1 if exit_step is None else exit_step
    clip = num_blocks * block_tokens
    ops: list[Op] = []
    for m in range(num_microbatches):
        rollout, exits = _self_forcing_rollout(m, student, num_blocks, num_denoise_steps, exit_step,
                                               block_tokens, with_grad=False)
        denoise = Op(critic, FORWARD, m, "critic.denoise", deps=tuple(e.name for e in exits), tokens=clip)
        backward = Op(critic, BACKWARD, m, "critic.backward", deps=(denoise.name,), forward_of=denoise.name,
                      tokens=clip)
        ops += rollout + [denoise, backward]
    return OpGraph(tuple(ops), title="self-forcing critic step")

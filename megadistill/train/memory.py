"""Per-GPU memory of a distillation run under a parallel layout, from shapes alone.

Every number is computed from the Wan shape (:class:`WanConfig`), the run config, the DeepSpeed
config and the layout; no weights are read. Bytes per GPU for each role (student / teacher / critic):

Parameters (ZeRO-3 over the N = dp x sp ranks holding identical weights; tp and pp shards first):
    partition   sum over this rank's tensors of ceil(numel_local / N) * param_bytes
                (DeepSpeed pads every tensor to a multiple of N and keeps one slice)
    persistent  tensors with numel <= stage3_param_persistence_threshold stay whole on every rank
    gathered    the parameters all-gathered while a forward runs: a trainable role keeps at most
                stage3_max_live_parameters + one stage3_prefetch_bucket_size gathered (its later
                blocks are kept for their backward); a frozen role releases every block after its
                forward, so one block + one prefetch bucket (a planning bound, not measured)
Gradients (trainable roles): partition numel * grad dtype (DeepSpeed accumulates in the model dtype)
    plus the contiguous reduce bucket (reduce_bucket_size elements of the model dtype).
Optimizer (AdamW): exp_avg + exp_avg_sq in fp32 (8 B/element of the partition) and the fp32
    master partition (4 B). ZeRO-3 of DeepSpeed 0.19 keeps a separate master even for fp32
    parameters (measured; ZeRO-1/2 with fp32 parameters update them in place).
Activations saved for backward by one forward with grad (counted from the block's structure, see
    :func:`block_saved_elements`; validated against ``saved_tensors_hooks`` on CPU), per block:
        tokens x [22 C-wide tensors (10 of them float32: the LayerNorm inputs, the modulated/gated
                  float32 math, the q/k projections fed to the float32 RMSNorm)
                  + 2 FFN-wide (GELU input, FFN-out input) + log-sum-exp of 2 attentions
                  + 9 float32 row statistics (3 LayerNorms x mean/rstd, 3 RMSNorm rstd)]
        + text x [4 C-wide (cross k projection in float32, its normed forms, v) + 1 rstd]
        + 8 C float32 modulation vectors per sample and time group
    where C-wide tensors of the attention/FFN inner dims are divided by tp, and tokens are this
    sp rank's ceil(S / sp). Under Ulysses the all-to-all outputs (q, k, v, attention output) are
    saved instead of the local q/k/v, and the output projection's input is one more tensor.
    With activation checkpointing a block saves only its input x (tokens x C); its full set is
    rebuilt during backward (``recompute``, one block at a time).
KV cache (causal students): layers x 2 x cache tokens x C / (tp sp) x bytes, cache tokens = frames
    kept (all F, or sink + window) x tokens per frame; plus the prompt's cross-attention K/V
    (layers x 2 x text x C / tp x bytes).
Forward-only working set (teacher, and no-grad forwards of the others): the gathered parameters
    plus the live tensors of one block (an estimate: residual, its float32 copy, q/k/v/out or the
    FFN hidden pair, whichever is larger). The backward workspace of a trainable role (gradients
    live while one block runs backward) is estimated the same way.

A step of DMD2 / self-forcing has two phases; the total of a GPU is the sum of the static terms
(partitions, gradients, optimizer states, persistent parameters, reduce buckets, text encoder,
reserved runtime memory) plus the larger phase:
    generator phase: student forward with grad (its activations held) while the teacher (cond,
        uncond) and the critic run forward without grad, then the student backward
    critic phase:    critic forward with grad + backward (the student sample is detached)
A run fits when the total <= (1 - headroom) x GPU memory; the headroom covers allocator
fragmentation (10% by default).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, Optional

from megadistill.config import ConfigError, RunConfig, config_from_dict, parse_override
from megadistill.models.wan.checkpoint import native_shapes
from megadistill.models.wan.config import PRESETS, WanConfig
from megadistill.models.wan.keys import block_index, even_stage_blocks, tp_split_dim

GIB = 1024 ** 3
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
F32 = 4

# UMT5-XXL encoder (Wan's text encoder): vocab 256384, d_model 4096, d_ff 10240, 24 layers of
# self-attention (4 x 4096^2, no bias) and gated-GELU FFN (3 x 4096 x 10240), two norms each,
# per-layer relative position bias (32 buckets x 64 heads), final norm; stored in bf16.
UMT5_XXL_ENCODER_NUMEL = 256384 * 4096 + 24 * (4 * 4096 * 4096 + 3 * 4096 * 10240 + 2 * 4096 + 32 * 64) + 4096


# --- layout and DeepSpeed settings ------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """world = pp x dp x sp x tp ranks, ``gpus_per_node`` per node; dp is derived."""

    world: int
    tp: int = 1
    sp: int = 1
    pp: int = 1
    gpus_per_node: int = 8

    def __post_init__(self):
        for name in ("world", "tp", "sp", "pp", "gpus_per_node"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"layout: {name} must be a positive integer, got {v!r}")
        if self.world % (self.tp * self.sp * self.pp):
            raise ValueError(f"layout: world {self.world} is not divisible by tp*sp*pp = "
                             f"{self.tp}*{self.sp}*{self.pp}; change parallel.tp/sp/pp or the GPU count")

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.sp * self.pp)

    @property
    def zero_group(self) -> int:
        """Ranks ZeRO partitions over: dp x sp (they hold identical weights)."""
        return self.dp * self.sp

    def as_dict(self) -> dict:
        return {"world": self.world, "nodes": self.world // self.gpus_per_node if self.world % self.gpus_per_node == 0
                else self.world / self.gpus_per_node, "gpus_per_node": self.gpus_per_node,
                "tp": self.tp, "sp": self.sp, "pp": self.pp, "dp": self.dp, "zero_group": self.zero_group}


@dataclass(frozen=True)
class ZeroSettings:
    """The DeepSpeed settings that decide memory (DeepSpeed 0.19 defaults where a key is absent)."""

    stage: int = 3
    reduce_bucket_size: int = 500_000_000
    prefetch_bucket_size: int = 50_000_000
    max_live_parameters: int = 1_000_000_000
    param_persistence_threshold: int = 100_000
    contiguous_gradients: bool = True

    @classmethod
    def from_ds_config(cls, d: dict) -> "ZeroSettings":
        z = d.get("zero_optimization", {}) or {}
        stage = int(z.get("stage", 0))
        return cls(stage=stage,
                   reduce_bucket_size=int(float(z.get("reduce_bucket_size", 5e8))),
                   prefetch_bucket_size=int(float(z.get("stage3_prefetch_bucket_size", 5e7))),
                   max_live_parameters=int(float(z.get("stage3_max_live_parameters", 1e9))),
                   param_persistence_threshold=int(float(z.get("stage3_param_persistence_threshold", 1e5))),
                   contiguous_gradients=bool(z.get("contiguous_gradients", True)))


# --- parameters ---------------------------------------------------------------------------------

def parameter_shapes(cfg: WanConfig) -> list:
    """``[(native name, full shape)]`` of every tensor of a Wan T2V DiT."""
    return list(native_shapes(cfg).items())


def local_parameter_numels(cfg: WanConfig, tp: int = 1, pp: int = 1, stage: int = 0) -> list:
    """``[(name, numel on this tp rank)]`` of the tensors pipeline stage ``stage`` holds (embeddings on
    the first stage, the head on the last, the time path on every stage)."""
    lo, hi = even_stage_blocks(cfg.num_layers, pp)[stage]
    out = []
    for name, shape in parameter_shapes(cfg):
        b = block_index(name)
        if b is not None and not lo <= b < hi:
            continue
        if b is None and name.startswith("head.") and stage != pp - 1:
            continue
        if b is None and name.startswith(("patch_embedding", "text_embedding")) and stage != 0:
            continue
        numel = math.prod(shape)
        dim = tp_split_dim(name)
        if dim is not None:
            if shape[dim] % tp:
                raise ValueError(f"tp={tp} does not divide dimension {dim} of {name} {shape}")
            numel //= tp
        out.append((name, numel))
    return out


def zero3_partition_numel(numels, group: int) -> int:
    """Elements of this rank's ZeRO-3 partitions: ceil(numel / group) per tensor."""
    return sum(-(-n // group) for n in numels)


# --- activations --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Workload:
    """What one forward sees: ``batch`` samples of ``grid = (F, H, W)`` tokens, ``text_len`` text
    tokens, ``time_groups`` timestep groups per sample (1, or F for per-frame timesteps)."""

    batch: int
    grid: tuple
    text_len: int
    time_groups: int = 1
    num_frame_per_block: int = 3
    local_attn_frames: int = -1
    sink_frames: int = 0

    @property
    def tokens(self) -> int:
        return math.prod(self.grid)

    @classmethod
    def from_run_config(cls, run: RunConfig, wan: WanConfig) -> "Workload":
        p = run.pipeline_config
        _, f, h, w = p.latent_shape
        pt, ph, pw = wan.patch_size
        if f % pt or h % ph or w % pw:
            raise ValueError(f"pipeline_config.latent_shape {p.latent_shape} is not divisible by the patch "
                             f"{wan.patch_size}")
        return cls(batch=run.training.micro_batch_size, grid=(f // pt, h // ph, w // pw), text_len=p.text_len,
                   num_frame_per_block=p.num_frame_per_block, local_attn_frames=p.local_attn_size,
                   sink_frames=p.sink_size)


def _b(dtype: str) -> int:
    return DTYPE_BYTES[dtype]


def block_saved_elements(cfg: WanConfig, tp: int = 1, sp: int = 1) -> dict:
    """Tensors one block's forward saves for backward, as element counts per unit:
    ``{"token": {"act": n, "f32": n}, "text": {...}, "time": {...}}`` (per local token, per text
    token, per sample-and-time-group). ``act`` elements have the activation dtype, ``f32`` are
    float32 whatever it is.

    Per token (C = dim, Ct = C / tp, F = ffn_dim / tp, H = heads / tp):
      float32:  norm1 in, norm1 out (modulate), self q and k projections (RMSNorm in float32),
                self-attn output (gate), norm3 in, cross q projection, norm2 in, norm2 out,
                FFN output (gate)                                   -> 7 C + 3 Ct
                LayerNorm mean/rstd (3 x 2), RMSNorm rstd (3), log-sum-exp (2 H)
      act:      q/k/v input, norm3 out, FFN input (the column layers' whole inputs) -> 3 C;
                q/k normalized (before weight), q/k after RoPE, v, attention output (= o input),
                cross q normalized before and after weight, cross attention output -> 9 Ct;
                FFN hidden, GELU output -> 2 F
                (Ulysses: q, k, v, out all-to-all outputs replace q/k RoPE, v, out; o input
                is then one tensor more: + Ct)
    Per text token: cross k projection (float32), cross k normalized before and after weight, v
      -> f32 Ct + 1, act 3 Ct.
    Per sample and time group: 1 + scale1, 1 + scale2 and the six modulation vectors -> 8 C f32.
    """
    c, ct = cfg.dim, cfg.dim // tp
    ff, heads = cfg.ffn_dim // tp, cfg.num_heads // tp
    token_f32 = 7 * c + 3 * ct + 6 + 3 + 2 * heads
    token_act = 3 * c + 9 * ct + 2 * ff + (ct if sp > 1 else 0)
    return {"token": {"act": token_act, "f32": token_f32},
            "text": {"act": 3 * ct, "f32": ct + 1},
            "time": {"act": 0, "f32": 8 * c}}


def local_tokens(tokens: int, sp: int) -> int:
    """Tokens an sp rank holds: ceil(S / sp) (the sequence is padded to a multiple of sp)."""
    return -(-tokens // sp)


def activation_bytes(cfg: WanConfig, work: Workload, dtype: str, tp: int = 1, sp: int = 1,
                     checkpointing: bool = False, num_blocks: Optional[int] = None,
                     time_path_grad: bool = True) -> dict:
    """Bytes saved for backward by one forward with grad on one rank: ``{"blocks": ..., "model": ...,
    "recompute": ..., "saved": blocks + model}``. ``recompute`` is one block's full set, rebuilt
    during backward under activation checkpointing (0 without). ``num_blocks`` defaults to all
    layers (give a pipeline stage's count). ``time_path_grad``: the time embedding's weights are
    trainable (float32 copies of its bf16 weights are then saved)."""
    act = _b(dtype)
    n = local_tokens(work.tokens, sp)
    blocks = cfg.num_layers if num_blocks is None else num_blocks
    bt = work.batch * work.time_groups
    per = block_saved_elements(cfg, tp, sp)
    lowp = dtype != "fp32"
    one_block = (work.batch * n * (per["token"]["act"] * act + per["token"]["f32"] * F32)
                 + work.batch * work.text_len * (per["text"]["act"] * act + per["text"]["f32"] * F32)
                 + bt * per["time"]["f32"] * F32
                 + (2 * cfg.dim * F32 if lowp and cfg.cross_attn_norm else 0))  # norm3 weight/bias in float32
    c = cfg.dim
    s_pad = n * sp
    patch_in = cfg.in_dim * math.prod(cfg.patch_size)
    # the patch embedding saves its input: under sp with one sample a view of the whole (padded)
    # patch-token tensor this rank's chunk is cut from; otherwise this rank's tokens
    patch_tokens = s_pad if sp > 1 and work.batch == 1 else work.batch * n
    model = (patch_tokens * patch_in * act
             + work.batch * n * (c * act + (2 * c + 2) * F32)                          # head
             + work.batch * work.text_len * (cfg.text_dim + 3 * c) * act               # text embedding
             + bt * (cfg.freq_dim + 5 * c) * F32)                                      # time path, head scale
    if lowp and time_path_grad:
        model += 7 * c * c * F32  # float32 copies of time_embedding.2 and time_projection weights
    if checkpointing:
        per_block = work.batch * n * c * act           # the block input x
        model += bt * 6 * c * F32                      # e0, a checkpoint input of every block
        recompute = one_block
    else:
        per_block = one_block
        model += s_pad * cfg.head_dim * F32            # RoPE cos/sin (shared by the blocks)
        recompute = 0
    saved = blocks * per_block + model
    return {"blocks": blocks * per_block, "model": model, "saved": saved, "recompute": recompute,
            "per_block": per_block}


def forward_working_bytes(cfg: WanConfig, work: Workload, dtype: str, tp: int = 1, sp: int = 1) -> int:
    """Live tensors of one block's forward without grad (estimate): the residual x and its float32
    copy, plus the larger of (q, k, v, attention output [and their all-to-all buffers under sp])
    and (FFN hidden, GELU output); plus the text context and the block's text k/v."""
    act = _b(dtype)
    n = local_tokens(work.tokens, sp)
    c, ct, ff = cfg.dim, cfg.dim // tp, cfg.ffn_dim // tp
    attn = (4 * ct + (4 * ct if sp > 1 else 0)) * act
    ffn = 2 * ff * act
    per_token = c * act + c * F32 + max(attn, ffn)
    return work.batch * (n * per_token + work.text_len * (c + 2 * ct) * act)


def kv_cache_bytes(cfg: WanConfig, work: Workload, dtype: str, tp: int = 1, sp: int = 1) -> int:
    """Self-attention K/V cache of a causal student over all its layers (keys after RoPE), plus the
    prompt's cross-attention K/V: layers x 2 x tokens x C / tp / sp x bytes (Ulysses hands the
    cache every token of a head shard), and layers x 2 x text x C / tp x bytes (cross-attention
    runs on the rank's own tokens with all of its tp heads)."""
    f = work.grid[0]
    frames = f if work.local_attn_frames < 0 else min(f, work.sink_frames + work.local_attn_frames)
    per_frame = work.grid[1] * work.grid[2]
    self_kv = cfg.num_layers * 2 * frames * per_frame * (cfg.dim // (tp * sp))
    cross_kv = cfg.num_layers * 2 * work.text_len * (cfg.dim // tp)
    return work.batch * (self_kv + cross_kv) * _b(dtype)


# --- roles and the run --------------------------------------------------------------------------

@dataclass(frozen=True)
class RoleSpec:
    name: str
    wan: WanConfig
    dtype: str = "bf16"
    trainable: bool = True
    causal: bool = False
    zero3_partition: bool = True  # models.<role>.zero3_partition (a frozen role may stay whole)


@dataclass
class RoleEstimate:
    name: str
    static: Dict[str, int] = field(default_factory=dict)    # held all step long
    dynamic: Dict[str, int] = field(default_factory=dict)   # held while this role runs
    info: Dict[str, float] = field(default_factory=dict)

    @property
    def static_bytes(self) -> int:
        return sum(self.static.values())

    @property
    def dynamic_bytes(self) -> int:
        return sum(self.dynamic.values())

    @property
    def total(self) -> int:
        return self.static_bytes + self.dynamic_bytes


def _worst_stage(cfg: WanConfig, layout: Layout):
    stages = [local_parameter_numels(cfg, layout.tp, layout.pp, s) for s in range(layout.pp)]
    s = max(range(layout.pp), key=lambda i: sum(n for _, n in stages[i]))
    lo, hi = even_stage_blocks(cfg.num_layers, layout.pp)[s]
    return stages[s], hi - lo


def estimate_role(role: RoleSpec, work: Workload, layout: Layout, zero: ZeroSettings,
                  checkpointing: bool, zero3_frozen: bool = True) -> RoleEstimate:
    """Bytes per GPU of one role on the pipeline stage holding the most parameters."""
    cfg, est = role.wan, RoleEstimate(role.name)
    pbytes = _b(role.dtype)
    if role.causal:  # one timestep per latent frame: modulation vectors per frame
        work = dataclasses.replace(work, time_groups=work.grid[0])
    params, blocks = _worst_stage(cfg, layout)
    numels = [n for _, n in params]
    total = sum(numels)
    largest_block = max((sum(n for name, n in params if block_index(name) == b)
                         for b in {block_index(name) for name, _ in params if block_index(name) is not None}),
                        default=0)
    partitioned = zero.stage == 3 and (role.trainable or (zero3_frozen and role.zero3_partition))
    n_group = layout.zero_group
    est.info.update(parameters_local=total, blocks_local=blocks, zero3=partitioned)
    if partitioned:
        part = zero3_partition_numel(numels, n_group)
        persistent = sum(n for n in numels if n <= zero.param_persistence_threshold)
        est.static["params_partition"] = part * pbytes
        est.static["params_persistent"] = persistent * pbytes
        if role.trainable:
            live = min(total, zero.max_live_parameters + zero.prefetch_bucket_size)
        else:
            live = min(total, largest_block + zero.prefetch_bucket_size)
        est.dynamic["params_gathered"] = max(0, live - persistent) * pbytes
    else:
        part = total
        est.static["params"] = total * pbytes
    if role.trainable:
        grad_numel = part if zero.stage >= 2 else total
        opt_numel = part if zero.stage >= 1 else total
        est.static["grads"] = grad_numel * pbytes
        if zero.stage >= 1 and zero.contiguous_gradients:
            est.static["grad_reduce_bucket"] = min(zero.reduce_bucket_size, total) * pbytes
        est.static["optim_adam_moments"] = opt_numel * 2 * F32
        # ZeRO-3 (DeepSpeed 0.19) clones the partition into a float32 master even for fp32 models
        # (its "already fp32 on this device" shortcut compares a torch.device with a str)
        master = role.dtype != "fp32" or zero.stage == 3
        est.static["optim_fp32_master"] = opt_numel * F32 if master else 0
        # every pipeline stage holds pp microbatches in flight at most (1F1B warm-up of stage 0)
        inflight = layout.pp
        acts = activation_bytes(cfg, work, role.dtype, layout.tp, layout.sp, checkpointing, blocks)
        est.dynamic["activations_saved"] = inflight * acts["saved"]
        est.dynamic["activations_recompute"] = acts["recompute"]
        # gradient tensors live while one block runs backward: as many as a forward's live tensors
        # (residual gradient and its float32 copy, the q/k/v/out or FFN-hidden gradients); estimate
        est.dynamic["backward_workspace"] = forward_working_bytes(cfg, work, role.dtype, layout.tp, layout.sp)
        est.info["activations_per_block"] = acts["per_block"]
    else:
        est.dynamic["forward_working_set"] = forward_working_bytes(cfg, work, role.dtype, layout.tp, layout.sp)
    if role.causal:
        est.dynamic["kv_cache"] = kv_cache_bytes(cfg, work, role.dtype, layout.tp, layout.sp)
    return est


@dataclass
class RunEstimate:
    layout: Layout
    roles: Dict[str, RoleEstimate]
    shared: Dict[str, int]
    phases: Dict[str, int]
    gpu_mem_bytes: int
    headroom: float
    checkpointing: bool

    @property
    def total(self) -> int:
        return (sum(r.static_bytes for r in self.roles.values()) + sum(self.shared.values())
                + max(self.phases.values(), default=0))

    @property
    def budget(self) -> int:
        return int(self.gpu_mem_bytes * (1 - self.headroom))

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def as_dict(self) -> dict:
        per_gpu = {name: r.total for name, r in self.roles.items()}
        per_gpu["total"] = self.total
        return {"per_gpu_bytes": per_gpu,
                "per_gpu_gib": {k: round(v / GIB, 3) for k, v in per_gpu.items()},
                "breakdown": {name: {"static": dict(r.static), "dynamic": dict(r.dynamic), "info": dict(r.info)}
                              for name, r in self.roles.items()},
                "shared": dict(self.shared), "phases": dict(self.phases),
                "layout": self.layout.as_dict(), "activation_checkpointing": self.checkpointing,
                "gpu_mem_bytes": self.gpu_mem_bytes, "headroom": self.headroom, "budget_bytes": self.budget,
                "fits": self.fits}


def estimate_run(roles: Dict[str, RoleSpec], work: Workload, layout: Layout, zero: ZeroSettings,
                 checkpointing: bool, gpu_mem_bytes: int, headroom: float = 0.10, text_encoder_bytes: int = 0,
                 reserved_bytes: int = 0, zero3_frozen: bool = True) -> RunEstimate:
    """Every role, the shared terms and the two phases of a step (see the module docstring)."""
    for r in roles.values():
        if r.wan.num_heads % (layout.tp * layout.sp):
            raise ValueError(f"{r.name}: num_heads={r.wan.num_heads} is not divisible by tp*sp = "
                             f"{layout.tp}*{layout.sp}; choose a layout whose tp*sp divides the heads")
        if r.wan.ffn_dim % layout.tp:
            raise ValueError(f"{r.name}: tp={layout.tp} does not divide ffn_dim={r.wan.ffn_dim}")
    est = {n: estimate_role(r, work, layout, zero, checkpointing, zero3_frozen) for n, r in roles.items()}
    dyn = {n: e.dynamic_bytes for n, e in est.items()}
    phases = {}
    if "student" in est:
        others = [dyn[n] for n in ("teacher", "critic") if n in est]
        # the critic runs its fake-score forward without grad here; its no-grad working set, not its
        # training activations, is what adds to the student's
        if "critic" in est:
            c = est["critic"]
            others[-1] = c.dynamic.get("params_gathered", 0) + forward_working_bytes(
                roles["critic"].wan, work, roles["critic"].dtype, layout.tp, layout.sp)
        phases["generator"] = dyn["student"] + max(others, default=0)
    if "critic" in est:
        phases["critic"] = dyn["critic"]
    shared = {"text_encoder": text_encoder_bytes, "reserved_runtime": reserved_bytes}
    return RunEstimate(layout, est, shared, phases, gpu_mem_bytes, headroom, checkpointing)


# --- run config without weights -----------------------------------------------------------------

def _preset_for_path(path: str) -> Optional[str]:
    base = os.path.basename(os.path.normpath(path)).lower()
    return base if base in PRESETS else None


def wan_config_from_folder(path: str) -> Optional[WanConfig]:
    """The shape in ``path/config.json`` (Wan native or diffusers), or None without one."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else None
    if not file or not os.path.isfile(file):
        return None
    with open(file, encoding="utf-8") as f:
        d = json.load(f)
    return WanConfig.from_diffusers(d) if "num_attention_heads" in d else WanConfig.from_dict(d)


def resolve_shapes(data: dict, overrides=(), source: str = "<config>"):
    """``(RunConfig, {role: WanConfig}, text_encoder)`` from a parsed recipe, without weights.

    Overrides (``KEY.PATH=VALUE``) apply first. A role's ``path`` becomes its shape: the folder's
    ``config.json`` when the folder exists, else the preset whose name is the folder's name (case
    ignored: ``checkpoints/Wan2.1-T2V-14B`` -> ``wan2.1-t2v-14b``), else its ``preset``. Paths
    that memory does not depend on (data, text encoder, resume) are dropped before the config's
    checks run. ``text_encoder`` is the recipe's value (None, "tiny" or a path)."""
    import copy

    data = copy.deepcopy(data)
    for text in overrides:
        key, value = parse_override(text, source)
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(source, key, f"cannot set {key}: {p} is not a mapping")
        node[last] = value
    shapes = {}
    for role, mc in (data.get("models") or {}).items():
        mc = dict(mc or {})
        path = mc.get("path")
        wan = None
        if path:
            wan = wan_config_from_folder(path)
            if wan is None:
                preset = _preset_for_path(path)
                if preset is not None:
                    wan = PRESETS[preset]
                elif not mc.get("preset"):
                    raise ConfigError(source, f"models.{role}.path",
                                      f"{path!r}: no config.json there and the folder name is no preset "
                                      f"({sorted(PRESETS)}); set models.{role}.preset=NAME")
        if wan is None:
            name = mc.get("preset")
            if name not in PRESETS:
                raise ConfigError(source, f"models.{role}.preset",
                                  f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
            wan = PRESETS[name]
            mc["preset"] = name
        else:
            mc["preset"] = mc.get("preset") or "tiny"  # validated below; the shape is `wan`
        mc["path"] = None
        data["models"][role] = mc
        shapes[role] = wan
    pc = data.setdefault("pipeline_config", {}) or {}
    text_encoder = pc.get("text_encoder")
    pc["text_encoder"] = None
    data["data"] = {"kind": "synthetic"}
    data.setdefault("checkpoint", {})
    if isinstance(data["checkpoint"], dict):
        data["checkpoint"]["resume"] = None
    run = config_from_dict(data, source=source)
    shapes = {r: w.replace(text_len=run.pipeline_config.text_len) for r, w in shapes.items()}
    return run, shapes, text_encoder


def text_encoder_bytes(text_encoder: Optional[str]) -> int:
    """Memory of the text encoder each rank holds: UMT5-XXL in bf16 for a real encoder, 0 for none
    or the tiny test encoder."""
    if text_encoder is None or str(text_encoder).startswith("tiny"):
        return 0
    return UMT5_XXL_ENCODER_NUMEL * 2


def roles_of(run: RunConfig, shapes: Dict[str, WanConfig]) -> Dict[str, RoleSpec]:
    return {name: RoleSpec(name, shapes[name], mc.dtype, bool(mc.trainable), mc.causal, mc.zero3_partition)
            for name, mc in run.models.items()}


__all__ = ["DTYPE_BYTES", "GIB", "Layout", "RoleEstimate", "RoleSpec", "RunEstimate", "UMT5_XXL_ENCODER_NUMEL",
           "Workload", "ZeroSettings", "activation_bytes", "block_saved_elements", "estimate_role", "estimate_run",
           "forward_working_bytes", "kv_cache_bytes", "local_parameter_numels", "local_tokens", "parameter_shapes",
           "resolve_shapes", "roles_of", "text_encoder_bytes", "tp_split_dim",
           "wan_config_from_folder", "zero3_partition_numel"]

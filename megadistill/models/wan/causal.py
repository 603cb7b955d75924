"""Block-causal Wan DiT with a KV cache: the student of self-forcing.

A clip of F latent frames is cut into blocks of ``n = num_frame_per_block`` frames. Token i of
frame f_i sees token j of frame f_j iff ``f_j // n <= f_i // n`` (its own block and every earlier
one). With a local window of W frames and K sink frames a key must also satisfy
``f_j >= e_i - W or f_j < K``, where ``e_i = (f_i // n + 1) * n`` is the end of the query's block:
the window is measured from the end of the query's block and includes that block.

Two execution paths compute the same function (to float rounding):

- masked path, ``model(latents, t_per_frame, text)``: the whole clip at once with the mask above
  (``block_causal_tokens = n * T``, ``window_tokens = W * T``, ``sink_tokens = K * T`` for T tokens
  per frame). Used for teacher forcing, ODE-init and evaluation of whole clips.
- cached path, ``model.forward_block(x_block, t_block, text, cache, start_frame)``: one block,
  attending to the keys/values of earlier blocks held in a :class:`KVCache`. Keys are stored after
  RoPE, and RoPE of a block is offset by its absolute start frame, so a cached key is exactly the
  key the masked path computes. Every key the cache holds is visible to the whole block, so the
  cached attention needs no mask.

Cache layout (per layer ``k``/``v`` of shape ``[B, storage_frames * T, H_local, D]``; H_local is
the head count the layer's projections produce, the head shard under tensor or Ulysses sequence
parallel): frame f lives at frame slot ``slot(f) = f`` without a window, and
``slot(f) = f if f < K else K + (f - K) mod W`` with one (a ring of W frames behind K sink slots).
After writing a block that ends at frame e, the first ``min(e, storage_frames) * T`` tokens of the
storage are exactly the keys the block may see: frames ``[0, e)`` while nothing was evicted, the
K sinks and frames ``[e - W, e)`` afterwards. Attention order over keys is irrelevant (no mask).

The cached path writes with ``no_grad`` (the cache holds detached tensors: gradient never flows
into earlier blocks through the cache, as in self-forcing). Under grad the block attends to an
out-of-place copy in which its own slots are the live (graph) keys/values, so later in-place cache
writes cannot corrupt a pending backward; under activation checkpointing the recompute reuses that
copy instead of the cache, which may have moved on (evicted or refreshed) by then.

Cross-attention K/V of the prompt are computed once per cache (first call) and reused by calls
without grad; a call under grad projects them again so that the text embedding and the
cross-attention k/v weights get their gradient.

Parallel: ``parallelize_wan(model, tp_group, sp_group)`` keeps the class. Under tensor parallel the
layers hold head shards and so does the cache; under Ulysses each rank runs its chunk of the
clip's or block's tokens and the cache write runs inside the wrapped ``attn_fn``, after the
all-to-all, on the full block sequence of a head shard.
"""
from __future__ import annotations

import torch

from megadistill.distributed.comm import group_rank, group_size
from megadistill.kernels import attention

from .dit import WanAttention, WanDiT, rope_cos_sin
from .parallel import _local_time, chunk_bounds, gather_chunks, local_chunk

_MASK_KWARGS = ("block_causal_tokens", "q_offset", "key_lens", "window_tokens", "sink_tokens")


class KVCache:
    """Self-attention K/V (after RoPE) of the frames generated so far, and the prompt's
    cross-attention K/V, for every layer of a :class:`CausalWanDiT`.

    Attributes:
        k, v: per layer ``[B, storage_frames * tokens_per_frame, H_local, D]`` (allocated at the
            first write, with the dtype/device/head count of the layer's keys), or None.
        cross_k, cross_v: per layer ``[B, text_len, H_local, D]`` or None.
        end_frame: exclusive end (absolute frame) of the latest block written.
        slot_frame: the absolute frame held by each frame slot, -1 where empty.
        storage_frames, sink_frames, window_frames, max_frames: the geometry (see module doc);
            ``max_frames`` None means unbounded (only with a window).
    """

    def __init__(self, num_layers: int, batch: int, storage_frames: int, *, sink_frames: int = 0,
                 window_frames: int | None = None, max_frames: int | None = None):
        if window_frames is None and sink_frames:
            raise ValueError("KVCache: sink_frames need window_frames")
        if window_frames is None:
            if max_frames not in (None, storage_frames):
                raise ValueError(f"KVCache: without a window the storage holds max_frames={max_frames} "
                                 f"frames, got storage_frames={storage_frames}")
            max_frames = storage_frames
        self.num_layers, self.batch = int(num_layers), int(batch)
        self.storage_frames = int(storage_frames)
        self.sink_frames = int(sink_frames)
        self.window_frames = None if window_frames is None else int(window_frames)
        self.max_frames = None if max_frames is None else int(max_frames)
        self.tokens_per_frame = None
        self.k = [None] * self.num_layers
        self.v = [None] * self.num_layers
        self.reset()

    def reset(self):
        """Forget every frame and the prompt; the storage stays allocated and is overwritten."""
        self.end_frame = 0
        self.slot_frame = [-1] * self.storage_frames
        self.cross_k = [None] * self.num_layers
        self.cross_v = [None] * self.num_layers
        self.text = None

    @property
    def evicted(self) -> bool:
        """True once a frame was overwritten by a later one (the ring has wrapped)."""
        return self.end_frame > self.storage_frames

    @property
    def frames(self) -> list:
        """The absolute frames the cache holds, ascending."""
        return sorted(f for f in self.slot_frame if f >= 0)

    def slot_of(self, frame: int) -> int:
        k, w = self.sink_frames, self.window_frames
        if w is None or frame < k:
            return frame
        return k + (frame - k) % w

    def plan_block(self, start_frame: int, num_frames: int, tokens_per_frame: int, device) -> "BlockWrite":
        """Check that a block ``[start_frame, start_frame + num_frames)`` may be written now and
        return the write: which token slots it takes and how many keys are visible after it."""
        start, end = int(start_frame), int(start_frame) + int(num_frames)
        if start > self.end_frame:
            raise ValueError(f"block at start_frame={start} leaves a gap: the cache holds frames up to "
                             f"{self.end_frame}; run blocks in order (next start_frame={self.end_frame})")
        if self.max_frames is not None and end > self.max_frames:
            raise ValueError(f"KV cache overflow: block [{start}, {end}) exceeds max_frames={self.max_frames}; "
                             f"make the cache with new_cache(batch, max_frames>={end}) or give the model a "
                             "local_window_frames (then any length fits)")
        if end < self.end_frame and self.evicted:
            raise ValueError(f"block at start_frame={start} needs frames the cache has evicted (it holds "
                             f"{self.frames[:3]}...{self.frames[-3:]}); once the window has wrapped only the "
                             f"latest block (start_frame={self.end_frame - num_frames}) can be re-run")
        if self.tokens_per_frame != tokens_per_frame:
            if self.end_frame > 0:
                raise ValueError(f"block has {tokens_per_frame} tokens per frame, the cache holds frames of "
                                 f"{self.tokens_per_frame}; call cache.reset() before changing resolution")
            self.tokens_per_frame = int(tokens_per_frame)
            self.k = [None] * self.num_layers
            self.v = [None] * self.num_layers
        slots = [self.slot_of(f) for f in range(start, end)]
        index = (torch.tensor(slots)[:, None] * tokens_per_frame + torch.arange(tokens_per_frame)).flatten()
        visible = min(end, self.storage_frames) * tokens_per_frame
        return BlockWrite(self, start, end, slots, index.to(device), visible)

    def storage(self, layer: int, k: torch.Tensor):
        """Layer ``layer``'s (k, v) storage, allocated like ``k`` ``[B, S, H_local, D]`` on first use."""
        b, _, h, d = k.shape
        shape = (self.batch, self.storage_frames * self.tokens_per_frame, h, d)
        if b != self.batch:
            raise ValueError(f"keys have batch {b}, the cache was made for batch {self.batch}")
        held = self.k[layer]
        fits = held is not None and (tuple(held.shape), held.dtype, held.device) == (shape, k.dtype, k.device)
        if not fits and self.end_frame == 0:  # first block after creation or reset: (re)allocate
            self.k[layer] = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.v[layer] = torch.zeros(shape, dtype=k.dtype, device=k.device)
        elif not fits:
            raise ValueError(f"layer {layer}: keys {tuple(k.shape)} {k.dtype} on {k.device} do not fit the "
                             f"cache's {tuple(held.shape)} {held.dtype} on {held.device} (heads per rank or "
                             "dtype changed mid-rollout?); call cache.reset() to start a new rollout")
        return self.k[layer], self.v[layer]

    def commit(self, write: "BlockWrite"):
        """Record the block as written (after every layer wrote its slots)."""
        missing = [i for i in range(self.num_layers) if i not in write.written]
        if missing:
            raise RuntimeError(f"layers {missing} did not write the KV cache: their self_attn.attn_fn no "
                               "longer routes through CausalSelfAttentionFn (a wrapper such as Ulysses "
                               "must wrap the existing attn_fn, not replace it)")
        if write.end < self.end_frame:  # an earlier block re-run: later frames are dropped
            self.slot_frame = [f if f < write.end else -1 for f in self.slot_frame]
        for slot, frame in zip(write.slots, range(write.start, write.end)):
            self.slot_frame[slot] = frame
        self.end_frame = write.end


class BlockWrite:
    """One block's write into a :class:`KVCache` (passed to every layer's attention)."""

    def __init__(self, cache: KVCache, start: int, end: int, slots, index: torch.Tensor, visible: int):
        self.cache, self.start, self.end, self.slots = cache, start, end, slots
        self.index, self.visible = index, visible
        self.written = set()
        self._recompute = {}

    def write_and_read(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write the block's ``k, v`` ``[B, S_block, H_local, D]`` into its slots and return the
        keys/values the block attends to, ``[B, visible, H_local, D]``."""
        if k.shape[1] != self.index.numel():
            raise ValueError(f"layer {layer}: block has {k.shape[1]} key tokens, the cache write expects "
                             f"{self.index.numel()} (sequence-sharded keys reached the cache?)")
        if layer in self.written:  # activation-checkpoint recompute: the cache may have moved on
            kp, vp = self._recompute[layer]
            return kp.index_copy(1, self.index, k), vp.index_copy(1, self.index, v)
        ks, vs = self.cache.storage(layer, k)
        with torch.no_grad():
            ks.index_copy_(1, self.index, k.detach())
            vs.index_copy_(1, self.index, v.detach())
        self.written.add(layer)
        ks, vs = ks[:, :self.visible], vs[:, :self.visible]
        if not (torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)):
            return ks, vs
        k_all, v_all = ks.index_copy(1, self.index, k), vs.index_copy(1, self.index, v)
        self._recompute[layer] = (k_all.detach(), v_all.detach())
        return k_all, v_all


class CausalSelfAttentionFn:
    """``attn_fn`` of layer ``layer_index``'s self-attention in a :class:`CausalWanDiT`.

    Without ``kv_cache_write`` it is ``inner`` (the masked path passes its mask kwargs through).
    With one it writes the block's keys/values into the cache and attends over the visible cached
    keys with no mask. A Ulysses wrapper around it hands it the full block sequence of a head shard,
    so the cache holds that shard."""

    def __init__(self, layer_index: int, inner=attention):
        self.layer_index, self.inner = layer_index, inner

    def __call__(self, q, k, v, *, kv_cache_write: BlockWrite | None = None, **kwargs):
        if kv_cache_write is None:
            return self.inner(q, k, v, **kwargs)
        given = [n for n in _MASK_KWARGS if kwargs.get(n) is not None and not _is_zero(kwargs[n])]
        if given:
            raise ValueError(f"the cached path takes no attention mask, got {given}; under Ulysses the "
                             "block's token count must divide by the sequence-parallel size (no padding)")
        k_all, v_all = kv_cache_write.write_and_read(self.layer_index, k, v)
        return self.inner(q, k_all, v_all, **kwargs)


def _is_zero(value) -> bool:
    return isinstance(value, int) and value == 0


class CrossKV:
    """Cross-attention K/V for one ``forward_block`` call, served from the cache (see module doc)."""

    def __init__(self, cache: KVCache, context: torch.Tensor | None, fresh: bool):
        self.cache, self.context, self.fresh = cache, context, fresh

    def kv(self, layer: int, attn: WanAttention):
        c = self.cache
        if self.fresh or c.cross_k[layer] is None:
            k, v = attn.project_kv(self.context)
            if c.cross_k[layer] is None:
                c.cross_k[layer], c.cross_v[layer] = k.detach(), v.detach()
            if self.fresh:
                return k, v
        return c.cross_k[layer], c.cross_v[layer]


class CachedCrossAttention(WanAttention):
    """Wan cross-attention (same parameters) that also takes its K/V from a :class:`CrossKV`."""

    def __init__(self, dim: int, head_dim: int, eps: float, layer_index: int):
        super().__init__(dim, head_dim, eps)
        self.layer_index = layer_index

    def forward(self, x, context=None, rope=None, **attn_kwargs):
        if not isinstance(context, CrossKV):
            return super().forward(x, context=context, rope=rope, **attn_kwargs)
        k, v = context.kv(self.layer_index, self)
        return self.o(self.attn_fn(self.project_q(x), k, v, **attn_kwargs).flatten(-2))


class CausalWanDiT(WanDiT):
    """Block-causal Wan DiT: the parameters (and names) of :class:`WanDiT`, a masked whole-clip
    forward and a cached block-by-block forward that agree (see the module doc).

    Args:
        num_frame_per_block: latent frames per causal block (self-forcing: 3).
        local_window_frames: attention window W in latent frames, measured from the end of the
            query's block (so W >= num_frame_per_block); None attends to the whole prefix.
        sink_frames: the first K latent frames, always visible (needs a window).
    """

    def __init__(self, config, num_frame_per_block: int = 3, local_window_frames: int | None = None,
                 sink_frames: int = 0):
        super().__init__(config)
        if int(num_frame_per_block) < 1:
            raise ValueError(f"num_frame_per_block must be >= 1, got {num_frame_per_block}")
        if config.patch_size[0] != 1:
            raise ValueError(f"CausalWanDiT needs a temporal patch of 1 (one token frame per latent "
                             f"frame), got patch_size={config.patch_size}")
        if local_window_frames is not None and int(local_window_frames) < int(num_frame_per_block):
            raise ValueError(f"local_window_frames={local_window_frames} is smaller than "
                             f"num_frame_per_block={num_frame_per_block}: the window includes the query's "
                             "own block; use a window of at least one block (or None)")
        if int(sink_frames) < 0 or (sink_frames and local_window_frames is None):
            raise ValueError(f"sink_frames={sink_frames}: sinks must be >= 0 and need local_window_frames")
        self.num_frame_per_block = int(num_frame_per_block)
        self.local_window_frames = None if local_window_frames is None else int(local_window_frames)
        self.sink_frames = int(sink_frames)
        for i, block in enumerate(self.blocks):
            block.self_attn.attn_fn = CausalSelfAttentionFn(i)
            block.cross_attn = CachedCrossAttention(config.dim, config.head_dim, config.eps, layer_index=i)

    @classmethod
    def from_pretrained(cls, path, num_frame_per_block: int = 3, local_window_frames: int | None = None,
                        sink_frames: int = 0, dtype=None):
        """Loads any checkpoint :meth:`WanDiT.from_pretrained` reads (same parameter names)."""
        from .checkpoint import open_wan_checkpoint
        from .loading import build_on_meta, load_parameters

        with open_wan_checkpoint(path) as ckpt:
            model = build_on_meta(cls, ckpt.config, num_frame_per_block=num_frame_per_block,
                                  local_window_frames=local_window_frames, sink_frames=sink_frames)
            load_parameters(model, ckpt, dtype=dtype)
        return model

    # -- masks and checks --

    def _blocks_and_head(self, x, e, e0, context, rope, grid, attn_kwargs):
        """The blocks and the head over tokens ``x [B, S, C]`` -> ``[B, 16, F, H, W]``. Under Ulysses
        (``parallelize_wan`` with an sp group sets ``self.sp_group``) each rank runs its chunk of
        the S tokens, as ``ParallelWanDiT`` does: time and RoPE of its tokens, padded keys masked
        through ``valid_len``, the output chunks all-gathered at the end."""
        sp = getattr(self, "sp_group", None)
        if group_size(sp) == 1:
            x = self.run_blocks(x, e0, context, rope, attn_kwargs)
            return self.unpatchify(self.head(x, e), grid)
        num_tokens = x.shape[1]
        start, n, _ = chunk_bounds(num_tokens, group_rank(sp), group_size(sp))
        e, e0 = _local_time(e, e0, grid, start, n)
        rope = tuple(local_chunk(r, sp, dim=0) for r in rope)
        x = self.run_blocks(local_chunk(x, sp), e0, context, rope, {**attn_kwargs, "valid_len": num_tokens})
        return self.unpatchify(gather_chunks(self.head(x, e), num_tokens, sp), grid)

    def mask_kwargs(self, tokens_per_frame: int) -> dict:
        """Attention kwargs of the masked path for frames of ``tokens_per_frame`` tokens."""
        kw = {"block_causal_tokens": self.num_frame_per_block * tokens_per_frame}
        if self.local_window_frames is not None:
            kw.update(window_tokens=self.local_window_frames * tokens_per_frame,
                      sink_tokens=self.sink_frames * tokens_per_frame)
        return kw

    def _frame_time(self, t, batch: int, frames: int, device):
        e, e0 = self.embed_time(t.to(device) if torch.is_tensor(t) else t, batch)
        if e.shape[1] not in (1, frames):
            raise ValueError(f"per-frame timestep has {e.shape[1]} entries, the latents have {frames} "
                             "frames: pass [B] or [B, F]")
        return e, e0

    # -- masked path --

    def forward(self, latents, t_per_frame, text):
        """Whole clip ``[B,16,F,H,W]`` with block-causal (windowed) self-attention; ``t_per_frame``
        ``[B, F]`` or ``[B]``; returns the flow prediction ``[B,16,F,H,W]``."""
        grid = self.token_grid(latents)
        if grid[0] % self.num_frame_per_block:
            raise ValueError(f"latents have {grid[0]} frames, not a multiple of num_frame_per_block="
                             f"{self.num_frame_per_block}; pad or trim the clip to whole blocks")
        x = self.embed_tokens(latents.to(self.patch_embedding.weight.dtype))
        e, e0 = self._frame_time(t_per_frame, latents.shape[0], grid[0], x.device)
        context = self.embed_text(text.to(x.dtype))
        rope = rope_cos_sin(self.config, grid, x.device)
        return self._blocks_and_head(x, e, e0, context, rope, grid, self.mask_kwargs(grid[1] * grid[2]))

    # -- cached path --

    def new_cache(self, batch: int, max_frames: int | None = None) -> KVCache:
        """An empty cache. Without a window it stores ``max_frames`` frames (required) and a block
        past them is an overflow error. With a window it stores ``sink + window`` frames (or
        ``max_frames`` if smaller, which then bounds the length) and any length can be generated."""
        if int(batch) < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        if max_frames is not None and int(max_frames) < self.num_frame_per_block:
            raise ValueError(f"max_frames={max_frames} is less than one block "
                             f"({self.num_frame_per_block} frames)")
        if self.local_window_frames is None:
            if max_frames is None:
                raise ValueError("new_cache needs max_frames when the model has no local window")
            storage = int(max_frames)
        else:
            storage = self.sink_frames + self.local_window_frames
            storage = storage if max_frames is None else min(storage, int(max_frames))
        return KVCache(len(self.blocks), batch, storage, sink_frames=self.sink_frames,
                       window_frames=self.local_window_frames, max_frames=max_frames)

    def forward_block(self, latents_block, t_block, text, cache: KVCache, start_frame: int):
        """One block ``[B,16,num_frame_per_block,H,W]`` at absolute frame ``start_frame``, attending
        to the cached prefix; writes the block's K/V into ``cache`` (re-running a block at the same
        ``start_frame`` overwrites exactly its slots). ``t_block`` ``[B, n]`` or ``[B]``; ``text``
        the prompt's states, or None to reuse the cached prompt. Returns the block's flow."""
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache from model.new_cache, got {type(cache).__name__}")
        if (cache.num_layers, cache.window_frames, cache.sink_frames) != \
                (len(self.blocks), self.local_window_frames, self.sink_frames):
            raise ValueError("the cache was made for another layer count / window / sinks; use model.new_cache")
        grid = self.token_grid(latents_block)
        batch = latents_block.shape[0]
        if grid[0] != self.num_frame_per_block:
            raise ValueError(f"latents_block has {grid[0]} frames; a block has num_frame_per_block="
                             f"{self.num_frame_per_block}")
        if int(start_frame) < 0 or int(start_frame) % self.num_frame_per_block:
            raise ValueError(f"start_frame={start_frame} is not at a block boundary (a non-negative "
                             f"multiple of num_frame_per_block={self.num_frame_per_block})")
        if batch != cache.batch:
            raise ValueError(f"latents_block has batch {batch}, the cache was made for batch {cache.batch}")
        x = self.embed_tokens(latents_block.to(self.patch_embedding.weight.dtype))
        write = cache.plan_block(int(start_frame), grid[0], grid[1] * grid[2], x.device)
        e, e0 = self._frame_time(t_block, batch, grid[0], x.device)
        cross = self._cross_kv(text, cache, x.dtype)
        rope = rope_cos_sin(self.config, grid, x.device, frame_offset=int(start_frame))
        out = self._blocks_and_head(x, e, e0, cross, rope, grid, {"kv_cache_write": write})
        cache.commit(write)
        return out

    def _cross_kv(self, text, cache: KVCache, dtype) -> CrossKV:
        if text is None:
            if cache.text is None:
                raise ValueError("the first forward_block of a prompt needs its text states")
            text = cache.text
        elif cache.text is not None and text is not cache.text and not (
                text.shape == cache.text.shape and torch.equal(text, cache.text)):
            raise ValueError("text differs from the prompt whose cross-attention K/V the cache holds; "
                             "call cache.reset() (or make a new cache) for a new prompt")
        fresh = torch.is_grad_enabled()
        needs_context = fresh or any(k is None for k in cache.cross_k)
        context = self.embed_text(text.to(dtype)) if needs_context else None
        cache.text = text
        return CrossKV(cache, context, fresh)

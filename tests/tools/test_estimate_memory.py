"""The memory planner (megadistill/train/memory.py, tools/estimate_memory.py) against what runs.

Measured on CPU, within 10%:
  * bytes saved for backward by one forward with grad (unique storages seen by
    torch.autograd.graph.saved_tensors_hooks, parameters excluded) of a tiny WanDiT, fp32 and bf16,
    with and without activation checkpointing, in one process and under tp2 / sp2 / tp2 x sp2;
  * ZeRO-3 partitions of DeepSpeed over 2 gloo ranks: parameter partition, persistent parameters,
    gradient partition, optimizer states (AdamW moments and the fp32 master);
  * the KV cache a causal student allocates.
"""
import json
import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

from megadistill.models.wan.config import PRESETS, get_preset
from megadistill.models.wan.dit import WanDiT, init_weights
from megadistill.train.memory import (Layout, RoleSpec, Workload, ZeroSettings, activation_bytes, estimate_role,
                                      kv_cache_bytes, local_parameter_numels, parameter_shapes, tp_split_dim)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import estimate_memory  # noqa: E402

TOL = 0.10
GRID = (2, 2, 3)                 # latent frames 2, 4 x 6 latents -> 12 tokens (patch 1, 2, 2)
TEXT = 32
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def close(measured, estimated, what):
    assert measured > 0, f"{what}: nothing measured"
    err = abs(estimated - measured) / measured
    assert err <= TOL, f"{what}: estimated {estimated} vs measured {measured} bytes ({err:.1%} off)"


def tiny(layers=3, dtype="fp32"):
    cfg = get_preset("tiny").replace(num_layers=layers)
    return cfg, init_weights(WanDiT(cfg), seed=0).to(DTYPES[dtype])


def inputs(dtype):
    g = torch.Generator().manual_seed(0)
    f, h, w = GRID
    lat = torch.randn(1, 16, f, 2 * h, 2 * w, generator=g).to(DTYPES[dtype])
    return lat, torch.tensor([500.0]), torch.randn(1, TEXT, 64, generator=g).to(DTYPES[dtype])


def saved_bytes(model, run):
    """Bytes of the unique non-parameter storages saved for backward while ``run()`` executes."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(x):
        st = x.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = run()
    assert out.requires_grad
    return sum(seen.values())


# --- shapes ---------------------------------------------------------------------------------------

def test_parameter_table_matches_the_model_and_the_tp_plan():
    from megadistill.models.wan.keys import tp_split_dim as model_split_dim

    for name in ("tiny", "wan2.1-t2v-1.3b"):
        cfg = PRESETS[name]
        model = WanDiT(cfg.replace(num_layers=2)) if name != "tiny" else WanDiT(cfg)
        table = dict(parameter_shapes(model.config))
        assert table == {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert all(tp_split_dim(k) == model_split_dim(k) for k in table)
    big = PRESETS["wan2.1-t2v-14b"]
    assert sum(n for _, n in local_parameter_numels(big)) == sum(
        torch.Size(s).numel() for _, s in parameter_shapes(big))
    assert 14.0e9 < sum(n for _, n in local_parameter_numels(big)) < 14.4e9  # "14B"


# --- activations, one process -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_saved_activations_single_process(dtype, ckpt):
    work = Workload(batch=1, grid=GRID, text_len=TEXT)
    measured = {}
    for layers in (2, 3):
        cfg, model = tiny(layers, dtype)
        model.activation_checkpointing = ckpt
        lat, t, text = inputs(dtype)
        measured[layers] = saved_bytes(model, lambda: model(lat, t, text))
        est = activation_bytes(cfg, work, dtype, checkpointing=ckpt)
        close(measured[layers], est["saved"], f"{dtype} ckpt={ckpt} {layers} blocks")
    # one more block adds what the planner counts per block
    close(measured[3] - measured[2], est["per_block"], f"{dtype} ckpt={ckpt} per block")


# --- multi-process helpers ----------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world, port, args):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import megadistill.distributed as md
    try:
        fn(rank, world, *args)
    finally:
        md.destroy()


def spawn(fn, world, *args):
    mp.start_processes(_entry, args=(fn, world, _free_port(), args), nprocs=world, join=True,
                       start_method="spawn" if torch.cuda.is_initialized() else "fork")


# --- activations under tp / sp ----------------------------------------------------------------------

def _parallel_activation_worker(rank, world, tp, sp):
    import megadistill.distributed as md
    from megadistill.models.wan.parallel import local_chunk, parallelize_wan, patchify

    md.initialize(tp=tp, sp=sp, backend="gloo")
    work = Workload(batch=1, grid=GRID, text_len=TEXT)
    for dtype in ("fp32", "bf16"):
        for ckpt in (False, True):
            cfg, model = tiny(2, dtype)
            model.activation_checkpointing = ckpt
            parallelize_wan(model, md.get_tp_group(), md.get_sp_group())
            lat, t, text = inputs(dtype)
            tokens = local_chunk(patchify(lat, cfg.patch_size), md.get_sp_group())
            got = saved_bytes(model, lambda: model(tokens, t, text, grid=GRID))
            est = activation_bytes(cfg, work, dtype, tp, sp, ckpt)["saved"]
            close(got, est, f"rank {rank} tp{tp} sp{sp} {dtype} ckpt={ckpt}")
            local = sum(p.numel() for p in model.parameters())
            assert local == sum(n for _, n in local_parameter_numels(cfg, tp)), "tp shard sizes"


@pytest.mark.parametrize("tp,sp", [(2, 1), (1, 2), (2, 2)])
def test_saved_activations_under_tp_and_sp(tp, sp):
    spawn(_parallel_activation_worker, tp * sp, tp, sp)


# --- ZeRO-3 partitions ------------------------------------------------------------------------------

def _zero3_worker(rank, world):
    import deepspeed

    import megadistill.distributed as md
    md.initialize(backend="gloo")
    from megadistill.distributed.deepspeed_comm import init_deepspeed_comm
    init_deepspeed_comm("gloo")
    threshold = 200  # biases and norm weights (128 wide) stay whole on every rank
    for dtype in ("fp32", "bf16"):
        cfg, model = tiny(3, "fp32")
        for module in (model.time_embedding, model.time_projection):  # read by embed_time, not called
            for p in module.parameters():
                deepspeed.zero.register_external_parameter(model, p)
        ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": threshold,
                                    "reduce_bucket_size": 4096},
              "bf16": {"enabled": dtype == "bf16"}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10**9}
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4),
                                          config=ds, mpu=md.mpu)
        lat, t, text = inputs(dtype)
        engine.backward(engine(lat, t, text).float().square().mean())
        engine.step()
        opt = engine.optimizer
        params = list(engine.module.parameters())
        measured = {
            "params_partition": sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params),
            "params_persistent": sum(p.ds_numel * p.element_size() for p in params if p.ds_persist),
            "grads": opt.grad_partitions_flat_buffer.numel() * opt.grad_partitions_flat_buffer.element_size(),
            "optim_adam_moments": sum(v.numel() * v.element_size() for s in opt.optimizer.state.values()
                                      for v in s.values() if torch.is_tensor(v) and v.dim() > 0),
            "optim_fp32_master": sum(b.numel() * b.element_size()
                                     for a, b in zip(opt.fp16_partitioned_groups_flat, opt.fp32_partitioned_groups_flat)
                                     if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()),
        }
        zero = ZeroSettings.from_ds_config(ds)
        est = estimate_role(RoleSpec("student", cfg, dtype, trainable=True), Workload(1, GRID, TEXT),
                            Layout(world), zero, checkpointing=False)
        for term, got in measured.items():
            close(got, est.static[term], f"rank {rank} {dtype} {term}")
        engine.destroy()


def test_zero3_partitions_two_ranks():
    spawn(_zero3_worker, 2)


# --- KV cache --------------------------------------------------------------------------------------

@pytest.mark.parametrize("window,sinks", [(None, 0), (3, 1)])
def test_kv_cache_of_a_causal_student(window, sinks):
    from megadistill.models.wan.causal import CausalWanDiT

    cfg = get_preset("tiny")
    frames = 6
    model = init_weights(CausalWanDiT(cfg, num_frame_per_block=3, local_window_frames=window, sink_frames=sinks))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, frames, 4, 6, generator=g)
    t = torch.full((1, frames), 500.0)
    text = torch.randn(1, 8, cfg.text_dim, generator=g)
    cache = model.new_cache(1, None if window else frames)
    with torch.no_grad():
        for s in range(0, frames, 3):
            model.forward_block(x[:, :, s:s + 3], t[:, s:s + 3], text, cache, s)
    got = sum(x.numel() * x.element_size() for x in (*cache.k, *cache.v, *cache.cross_k, *cache.cross_v))
    work = Workload(1, (frames, 2, 3), cfg.text_len, local_attn_frames=window or -1, sink_frames=sinks)
    close(got, kv_cache_bytes(cfg, work, "fp32"), f"kv cache window={window}")


# --- the command line ------------------------------------------------------------------------------

RECIPE = os.path.join(ROOT, "configs", "wan2.1_t2v_1.3B_from_14B_dmd2_4step.yaml")
DS = os.path.join(ROOT, "configs", "ds", "zero3_gpu_bf16.json")


def run_tool(capsys, *argv):
    assert estimate_memory.main(list(argv)) == 0
    return capsys.readouterr().out


def test_cli_json_for_the_14b_recipe(capsys):
    out = run_tool(capsys, "--config", RECIPE, "--ds_config", DS, "--nodes", "8", "--gpus-per-node", "8",
                   "--shapes-only", "--set", "parallel.sp=2", "--set", "models.teacher.zero3_partition=true",
                   "--json")
    d = json.loads(out)
    assert set(d["per_gpu_bytes"]) == {"student", "teacher", "critic", "total"}
    assert d["layout"] == {"world": 64, "nodes": 8, "gpus_per_node": 8, "tp": 1, "sp": 2, "pp": 1, "dp": 32,
                           "zero_group": 64}
    assert d["workload"]["tokens"] == 32760 and isinstance(d["fits"], bool)
    assert d["shapes"]["teacher"]["dim"] == 5120 and d["shapes"]["student"]["dim"] == 1536
    teacher = d["breakdown"]["teacher"]["static"]["params_partition"]
    # 14B teacher in bf16, ZeRO-3 over 64 ranks
    assert abs(teacher - 14.29e9 * 2 / 64) / teacher < 0.01
    assert d["fits"] == (d["per_gpu_bytes"]["total"] <= d["budget_bytes"])
    assert d["per_gpu_bytes"]["total"] == (sum(sum(b["static"].values()) for b in d["breakdown"].values())
                                           + sum(d["shared"].values()) + max(d["phases"].values()))


def test_cli_keeps_a_whole_teacher_as_the_recipe_says(capsys):
    """The 14B recipe sets models.teacher.zero3_partition: false: the planner holds it whole."""
    out = run_tool(capsys, "--config", RECIPE, "--ds_config", DS, "--nodes", "8", "--gpus-per-node", "8",
                   "--shapes-only", "--json")
    teacher = json.loads(out)["breakdown"]["teacher"]["static"]
    assert "params_partition" not in teacher
    assert abs(teacher["params"] - 14.29e9 * 2) / teacher["params"] < 0.01


def test_cli_needs_shapes_only_for_missing_weights(capsys):
    with pytest.raises(SystemExit, match="--shapes-only"):
        estimate_memory.main(["--config", RECIPE, "--ds_config", DS, "--nodes", "1", "--gpus-per-node", "8"])


def test_cli_reads_config_json_and_preset_overrides(tmp_path, capsys):
    folder = tmp_path / "my_dit"
    folder.mkdir()
    custom = get_preset("tiny").replace(dim=256, num_heads=8, num_layers=3)
    (folder / "config.json").write_text(json.dumps(custom.to_native()))
    tiny_cfg = os.path.join(ROOT, "configs", "tiny_dmd2.yaml")
    out = run_tool(capsys, "--config", tiny_cfg, "--ds_config", os.path.join(ROOT, "configs", "ds", "zero3_cpu.json"),
                   "--nodes", "1", "--gpus-per-node", "2", "--set", f"models.student.path={folder}",
                   "--set", "models.teacher.preset=wan2.1-t2v-1.3b", "--json")
    d = json.loads(out)
    assert d["shapes"]["student"] == {"dim": 256, "ffn_dim": 256, "num_heads": 8, "num_layers": 3}
    assert d["shapes"]["teacher"]["dim"] == 1536 and d["shapes"]["critic"]["dim"] == 128


def test_cli_sweep_table(capsys):
    out = run_tool(capsys, "--config", RECIPE, "--ds_config", DS, "--nodes", "8", "--gpus-per-node", "8",
                   "--shapes-only", "--sweep", "tp1sp1,tp2sp2", "--checkpointing", "both")
    rows = [r for r in out.splitlines() if r.strip().startswith(("1", "2"))]
    assert len(rows) == 4 and all(r.split()[-1] in ("yes", "no") for r in rows)


def test_layout_errors_name_the_fix():
    with pytest.raises(ValueError, match="not divisible by tp\\*sp"):
        from megadistill.train.memory import estimate_run
        estimate_run({"student": RoleSpec("student", PRESETS["wan2.1-t2v-1.3b"])}, Workload(1, (21, 30, 52), 512),
                     Layout(64, tp=8, sp=1), ZeroSettings(), False, gpu_mem_bytes=80 * 10**9)


def test_text_encoder_is_umt5_xxl():
    from transformers import UMT5Config, UMT5EncoderModel

    from megadistill.train.memory import UMT5_XXL_ENCODER_NUMEL, text_encoder_bytes

    cfg = UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                     feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)
    with torch.device("meta"):
        model = UMT5EncoderModel(cfg)
    assert UMT5_XXL_ENCODER_NUMEL == sum(p.numel() for p in model.parameters())
    assert text_encoder_bytes("tiny") == 0 and text_encoder_bytes(None) == 0
    assert text_encoder_bytes("/x/umt5") == 2 * UMT5_XXL_ENCODER_NUMEL


def test_causal_student_holds_its_kv_cache():
    cfg = PRESETS["wan2.1-t2v-1.3b"]
    work = Workload(1, (21, 30, 52), 512)
    layout = Layout(64, tp=1, sp=4)
    causal = estimate_role(RoleSpec("student", cfg, "bf16", causal=True), work, layout, ZeroSettings(), True)
    plain = estimate_role(RoleSpec("student", cfg, "bf16"), work, layout, ZeroSettings(), True)
    # 30 layers x (k, v) x 21 frames x 1560 tokens x 1536 / sp4, bf16; plus the text K/V (all heads)
    assert causal.dynamic["kv_cache"] == 30 * 2 * (32760 * 1536 // 4 + 512 * 1536) * 2
    assert "kv_cache" not in plain.dynamic
    assert causal.dynamic["activations_saved"] > plain.dynamic["activations_saved"]  # per-frame modulation

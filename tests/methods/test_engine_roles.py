"""A DMD2 step whose student and critic are DeepSpeed ZeRO-3 engines (one gloo process, CPU).

Runs in a subprocess: DeepSpeed initializes a process group that must not leak into the other
tests of the session."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

SCRIPT = r'''
import json, sys, torch
import deepspeed
from deepspeed.runtime.zero import GatheredParameters
sys.path.insert(0, sys.argv[1])
from methods_helpers import ToyAdapter, ToyFlow
from megadistill.methods import DMD2Method, ModelBundle, RoleHandle

from megadistill.distributed.deepspeed_comm import init_deepspeed_comm
init_deepspeed_comm("gloo")
torch.manual_seed(0)
config = {"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 10.0,
          "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
handles = {"teacher": RoleHandle("teacher", ToyFlow(0.3), False)}
for name, w in (("student", 0.5), ("critic", 0.7)):
    net = ToyFlow(w)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    engine, *_ = deepspeed.initialize(model=net, optimizer=opt, config=config)
    handles[name] = RoleHandle(name, None, True, engine=engine)
method = DMD2Method(ModelBundle(handles), ToyAdapter(),
                    {"guidance_scale": 2.0, "guidance_convention": "cfg", "generator_update_interval": 2})
logs = [method.train_step({"cond": torch.tensor([1.0, -1.0])}, step) for step in range(2)]
weights = {}
for name in ("student", "critic"):
    p = handles[name].module.weight
    with GatheredParameters([p]):
        weights[name] = p.detach().item()
print("RESULT " + json.dumps({"logs": logs, "weights": weights}))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(script: str) -> dict:
    """Run ``script`` as a one-rank gloo job; returns the JSON it printed after ``RESULT ``."""
    here = Path(__file__).parent
    env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(here.parents[1]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script, str(here)], env=env, capture_output=True, text=True,
                          timeout=240)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_dmd2_step_with_deepspeed_engine_roles():
    result = run_script(SCRIPT)
    gen_step, critic_only = result["logs"]
    assert {"generator_loss", "generator_grad_norm", "critic_loss", "critic_grad_norm"} <= set(gen_step)
    assert "generator_loss" not in critic_only and "critic_grad_norm" in critic_only
    assert result["weights"]["student"] != 0.5 and result["weights"]["critic"] != 0.7


GAN_SCRIPT = r'''
import json, sys, torch
import deepspeed
from deepspeed.runtime.zero import GatheredParameters
sys.path.insert(0, sys.argv[1])
from methods_helpers import tiny_wan, wan_adapter, wan_batch
from megadistill.methods import DMD2Method, ModelBundle, RoleHandle

from megadistill.distributed.deepspeed_comm import init_deepspeed_comm
init_deepspeed_comm("gloo")
config = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1e9,
          "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}


def run(engines):
    handles = {"teacher": RoleHandle("teacher", tiny_wan(11), False)}
    for i, name in enumerate(("student", "critic")):
        net = tiny_wan(20 + i)
        if name == "critic":
            net.add_realism_head(seed=5)
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        if engines:
            engine, *_ = deepspeed.initialize(model=net, optimizer=opt, config=config)
            handles[name] = RoleHandle(name, None, True, engine=engine)
        else:
            handles[name] = RoleHandle(name, net, True, optimizer=opt)
    method = DMD2Method(ModelBundle(handles), wan_adapter(),
                        {"guidance_scale": 2.0, "guidance_convention": "cfg", "generator_update_interval": 1,
                         "gan_generator_weight": 0.5, "gan_critic_weight": 0.5})
    if not engines:  # the reference drops whatever the generator phase left in the critic, by hand
        student_step = handles["student"].step

        def step_then_clear_critic(*args):
            norm = student_step(*args)
            handles["critic"].module.zero_grad(set_to_none=True)
            return norm
        handles["student"].step = step_then_clear_critic
    torch.manual_seed(0)
    logs = method.train_step(wan_batch(with_latents=True), 0)
    out = {}
    for name in ("student", "critic"):
        params = list(handles[name].module.parameters())
        with GatheredParameters(params):
            out[name] = {n: p.detach().clone() for n, p in handles[name].module.named_parameters()}
    return logs, out


plain_logs, plain = run(False)
ds_logs, ds = run(True)
diff = {name: max((plain[name][k] - ds[name][k]).abs().max().item() for k in plain[name]) for name in plain}
moved = {name: max((plain[name][k] - tiny).abs().max().item() for k, tiny in
                   (tiny_wan(20 + i).named_parameters() if name == "student" else
                    tiny_wan(21).add_realism_head(seed=5).named_parameters()))
         for i, name in enumerate(("student", "critic"))}
print("RESULT " + json.dumps({"plain": plain_logs, "ds": ds_logs, "diff": diff, "moved": moved}))
'''


def test_dmd2_gan_step_under_zero3_equals_plain_roles():
    """The generator's GAN loss backpropagates through the critic to the student: under ZeRO-3 too
    the critic must keep no gradient from it (its update equals the plain-torch one)."""
    result = run_script(GAN_SCRIPT)
    plain, ds = result["plain"], result["ds"]
    for key in ("generator_loss", "gan_generator_loss", "critic_loss", "gan_critic_loss"):
        assert abs(plain[key] - ds[key]) <= 1e-5 * max(1.0, abs(plain[key])), (key, plain[key], ds[key])
    assert result["moved"]["student"] > 1e-4 and result["moved"]["critic"] > 1e-4  # both roles updated
    assert result["diff"]["student"] < 1e-5 and result["diff"]["critic"] < 1e-5, result["diff"]

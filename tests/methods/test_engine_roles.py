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

deepspeed.init_distributed(dist_backend="gloo")
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


def test_dmd2_step_with_deepspeed_engine_roles():
    here = Path(__file__).parent
    env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(here.parents[1]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(here)], env=env, capture_output=True, text=True,
                          timeout=240)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    gen_step, critic_only = result["logs"]
    assert {"generator_loss", "generator_grad_norm", "critic_loss", "critic_grad_norm"} <= set(gen_step)
    assert "generator_loss" not in critic_only and "critic_grad_norm" in critic_only
    assert result["weights"]["student"] != 0.5 and result["weights"]["critic"] != 0.7

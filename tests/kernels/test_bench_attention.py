"""The benchmark harness: a CPU smoke run emits well-formed JSON; without CUDA a full run refuses."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "bench_attention.py")


def _run(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU paths of the tool")
def test_bench_cpu_smoke_and_refusal(tmp_path):
    out = tmp_path / "bench.json"
    r = _run("--quick", "--reps", "1", "--json", str(out))
    assert r.returncode == 0, r.stderr
    payload = json.loads(r.stdout)
    assert payload == json.loads(out.read_text())
    assert payload["smoke"] is True and payload["device"] == "cpu"
    blocked = next(x for x in payload["results"] if x["case"] == "block_causal")
    # 256 queries, 64-token blocks: block b sees 64 * (b + 1) keys -> (1+2+3+4)/16 of all pairs
    assert blocked["visible_fraction"] == pytest.approx(10 / 16)
    fwd = blocked["modes"]["fwd"]["sdpa"]
    assert fwd["tflops_dense"] == pytest.approx(fwd["tflops_effective"] * 16 / 10)

    r = _run()
    assert r.returncode == 2 and "no CUDA device" in r.stderr

"""tools/bench_pipeline_step.py runs both schedules on 2 gloo stages and writes its JSON."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_pipeline_step_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "bench_pipeline_step.py"), "--repeats", "1", "--warmup", "0",
           "--json", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["stages"] == 2 and result["batch"] == 2 and result["microbatches"] == 2
    for schedule in ("sequential", "interleaved"):
        for kind in ("generator_step", "critic_step"):
            entry = result["schedules"][schedule][kind]
            assert len(entry["samples_s"]) == 1 and entry["median_s"] > 0
            assert len(entry["median_recv_wait_s_per_rank"]) == 2
    assert set(result["interleaved_over_sequential"]) == {"generator_step", "critic_step"}

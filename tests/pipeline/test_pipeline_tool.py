import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "plan_pipeline.py")


def test_plan_pipeline_json_from_another_directory(tmp_path):
    trace = tmp_path / "trace.json"
    out = subprocess.run([sys.executable, TOOL, "--stages", "2", "--microbatches", "2", "--method", "dmd2", "--json",
                          "--chrome-trace", str(trace)], cwd=tmp_path, capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    for step in ("generator", "critic"):
        for name in ("sequential", "interleaved"):
            r = data["steps"][step][name]
            assert len(r["bubble_fraction_per_stage"]) == 2 and len(r["peak_activation_bytes_per_stage"]) == 2
            assert 0.0 <= r["bubble_fraction"] < 1.0 and r["makespan"] > 0
    assert data["cycle"]["generator_update_interval"] == 5
    assert json.loads(trace.read_text())["traceEvents"]


def test_plan_pipeline_text_ascii_self_forcing(capsys):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import plan_pipeline
    finally:
        sys.path.pop(0)
    assert plan_pipeline.main(["--stages", "2", "--microbatches", "2", "--method", "self_forcing", "--num-blocks", "2",
                               "--tokens", "9360", "--schedule", "interleaved", "--step", "generator", "--ascii",
                               "--ascii-width", "40", "--max-inflight", "1"]) == 0
    text = capsys.readouterr().out
    assert "generator step: self-forcing generator step" in text
    assert "stage  1 |" in text and "bubble" in text

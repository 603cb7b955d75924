"""tools/convert_checkpoint.py run as a program, from outside the repository."""
import subprocess
import sys
from pathlib import Path

import torch

from megadistill.models.wan.checkpoint import open_wan_checkpoint

from ckpt_helpers import leftovers

TOOL = Path(__file__).resolve().parents[2] / "tools" / "convert_checkpoint.py"


def _run(*args, cwd):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_cli_converts_and_reports_errors(tmp_path, native_dir, tiny_state):
    out = tmp_path / "md"
    r = _run("--src", native_dir, "--dst", out, "--to", "megadistill", "--tp", "2", "--pp", "2", "--dtype", "bf16",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("converted native -> megadistill tp=2 pp=2: 69 tensors,") and "bf16" in r.stdout
    with open_wan_checkpoint(out) as ck:
        assert all(torch.equal(ck.load(n), t.bfloat16()) for n, t in tiny_state.items())

    r = _run("--src", native_dir, "--dst", out, "--to", "native", cwd=tmp_path)  # destination exists
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith("error: destination") and "--overwrite" in r.stderr

    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "w.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    r = _run("--src", tmp_path / "junk", "--dst", tmp_path / "x", "--to", "diffusers", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "truncated" in r.stderr
    assert not (tmp_path / "x").exists() and leftovers(tmp_path) == []

"""Peak memory of the converter on a >= 1 GB checkpoint stays near one tensor (slow; needs /usr/bin/time)."""
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megadistill.models.wan.checkpoint import native_shapes, save_wan_checkpoint
from megadistill.models.wan.config import PRESETS

REPO = Path(__file__).resolve().parents[2]
TIME = shutil.which("time") or "/usr/bin/time"
SLACK = 64 * 2**20  # allocator and interpreter noise; the writers hold no shard, only one tensor


def _peak_rss(cmd) -> int:
    r = subprocess.run([TIME, "-v", *cmd], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1)) * 1024


@pytest.mark.slow
@pytest.mark.skipif(not Path(TIME).is_file(), reason="needs GNU time (/usr/bin/time -v)")
def test_peak_rss_is_about_one_tensor(tmp_path):
    cfg = PRESETS["wan2.1-t2v-1.3b"].replace(num_layers=6)  # 1.3B widths, 1.2 GB in fp32
    shapes = native_shapes(cfg)
    g = torch.Generator().manual_seed(0)
    save_wan_checkpoint(((n, torch.randn(s, generator=g)) for n, s in shapes.items()), tmp_path / "native",
                        format="native", config=cfg)
    assert (tmp_path / "native" / "diffusion_pytorch_model.safetensors").stat().st_size >= 10**9
    largest = max(math.prod(s) for s in shapes.values()) * 4
    baseline = _peak_rss([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); "
                          "import torch, megadistill.models.wan.checkpoint"])
    tool = [sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), "--no-progress"]
    for args in (["--to", "megadistill", "--tp", "2", "--pp", "2"], ["--to", "diffusers"]):
        dst = tmp_path / args[1]
        peak = _peak_rss([*tool, "--src", str(tmp_path / "native"), "--dst", str(dst), *args])
        assert peak < baseline + 3 * largest + SLACK, (args, peak, baseline, largest)

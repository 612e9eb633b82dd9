"""CMakeLists.txt reads the one source list in csrc/build.json (configure only: fast)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_configures_with_build_json_sources(tmp_path):
    spec = json.loads((ROOT / "csrc" / "build.json").read_text())
    out = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(tmp_path), f"-DPython_EXECUTABLE={sys.executable}"],
        capture_output=True, text=True, env={"PATH": "/usr/bin:/bin:/usr/local/bin", "ONP_FAST_NO_CUDA": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(l for l in out.stdout.splitlines() if "onp_fast sources:" in l)
    listed = line.split("onp_fast sources:", 1)[1].strip().split(";")
    assert listed == spec["sources"]

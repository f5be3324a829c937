"""The type stubs (python/xgen/_xgen.pyi) match the installed module: every class, method,
parameter and default (mypy's stubtest)."""
import subprocess
import sys


def test_stubs_match_the_module():
    out = subprocess.run([sys.executable, "-m", "mypy.stubtest", "xgen"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr

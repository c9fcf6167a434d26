"""Test scripts run in a fresh Python interpreter, for process-wide settings that must
not leak into the test session (bsnas.train.host_memory's malloc thresholds)."""
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Linux with glibc's malloc: where bsnas.train.host_memory.keep_freed_memory applies.
GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def run_python(script, *args, env=None, timeout=300):
    """Runs `python -c script args...` in the repository root with bsnas importable, none
    of this environment's glibc malloc settings (`MALLOC_*`, `GLIBC_TUNABLES`) and the
    variables in `env` (a None value unsets one); returns the CompletedProcess (stdout and
    stderr as text)."""
    full = {k: v for k, v in os.environ.items()
            if not (k.startswith("MALLOC_") or k == "GLIBC_TUNABLES")}
    full.update(env or {})
    full = {k: v for k, v in full.items() if v is not None}
    full["PYTHONPATH"] = ROOT + os.pathsep + full.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", script, *args], env=full, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)

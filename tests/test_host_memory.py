"""bsnas.train.host_memory: freed memory kept for reuse on glibc. Each case runs in a fresh
interpreter (the setting is process-wide and must not leak into the test session)."""
import json

import pytest

from fresh_interpreter import GLIBC, run_python

# Allocates and fills a 40 MB tensor ten times and prints the median page faults of the
# last five (glibc maps blocks this large afresh on every allocation by default).
_PROBE = """
import json, resource, sys
import torch
from bsnas.train import host_memory
from bsnas.train.runtime import Dist, pick_device
applied = None
if sys.argv[1] == "call":
    applied = host_memory.keep_freed_memory()
    assert host_memory.keep_freed_memory() == applied  # idempotent
elif sys.argv[1] == "config":
    pick_device("cpu", Dist(), keep_freed_memory=True)
    applied = host_memory._applied
counts = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(10 << 20).fill_(1.0)
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# the heap settles within the first few; the median of the last five
print(json.dumps({"applied": applied, "faults": sorted(counts[5:])[2]}))
"""


def _probe(mode, env_extra=None):
    out = run_python(_PROBE, mode, env=env_extra, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc malloc only")
def test_freed_memory_is_reused_without_page_faults():
    plain, kept = _probe("none"), _probe("call")
    assert kept["applied"] is True
    # 40 MB is 9766 pages: glibc maps it afresh each time by default
    assert plain["faults"] > 5000, plain
    assert kept["faults"] < 100, kept


@pytest.mark.skipif(not GLIBC, reason="glibc malloc only")
def test_cpu_device_applies_it_and_environment_settings_win():
    assert _probe("config")["applied"] is True
    # a user's own malloc settings are left alone
    tuned = _probe("call", {"MALLOC_TRIM_THRESHOLD_": "131072"})
    assert tuned["applied"] is False and tuned["faults"] > 5000, tuned

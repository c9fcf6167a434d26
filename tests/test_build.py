"""What the build contains."""
import os

import torch

import bsnas


def test_cuda_kernels_compiled_in_ci():
    """CI has a CUDA build of torch and nvcc: the CUDA kernels must be in the build, so a
    kernel that stops compiling cannot land."""
    if os.environ.get("CI") == "true" and torch.version.cuda:
        assert bsnas.cuda_compiled(), "CI build lacks the CUDA kernels"
    assert isinstance(bsnas.cuda_compiled(), bool)


def test_ops_registered_for_built_backends():
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    for op in ("bsnas::masked_dwconv2d", "bsnas::masked_pwconv2d",
               "bsnas::_masked_dwconv2d_backward", "bsnas::_masked_pwconv2d_backward"):
        assert has(op, "CPU")
        assert has(op, "CUDA") == bsnas.cuda_compiled()


def test_cpu_cache_size_setting():
    """BSNAS_CPU_LLC_BYTES sets the cache size the CPU kernels' streaming thresholds read
    against (bytes, or K / M / G); anything else is an error naming the variable. Each
    case in a fresh interpreter: the size is read once per process."""
    from fresh_interpreter import run_python

    script = "import bsnas; print(bsnas._C.cpu_llc_bytes())"
    for value, want in (("33554432", 32 << 20), ("32M", 32 << 20), ("1536K", 1536 << 10),
                        ("1G", 1 << 30)):
        out = run_python(script, env={"BSNAS_CPU_LLC_BYTES": value})
        assert out.returncode == 0 and int(out.stdout) == want, (value, out.stderr[-2000:])
    for bad in ("32MB", "abc", "-5", "0", "12", "99999999999999999999"):
        out = run_python(script, env={"BSNAS_CPU_LLC_BYTES": bad})
        assert out.returncode != 0 and "BSNAS_CPU_LLC_BYTES must be" in out.stderr, bad
    # Unset or empty: the last-level cache Linux lists for cpu0; where that is more than
    # 16 MiB a CPU sharing it (a VM listing its host's cache), 8 MiB a sharing CPU but at
    # least 16 MiB; 32 MiB where nothing is listed.
    for unset in (None, ""):
        out = run_python(script, env={"BSNAS_CPU_LLC_BYTES": unset})
        assert out.returncode == 0, out.stderr[-2000:]
        assert int(out.stdout) == _listed_cache_bound()


def _listed_cache_bound():
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    best = None  # (level, bytes, sharing CPUs)
    for i in range(8):
        d = f"/sys/devices/system/cpu/cpu0/cache/index{i}"
        try:
            level = int(open(f"{d}/level").read())
            size = open(f"{d}/size").read().strip()
        except (OSError, ValueError):
            continue
        try:
            cpus = open(f"{d}/shared_cpu_list").read().strip()
        except OSError:
            cpus = ""  # not listed: no bound
        nbytes = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
        sharing = sum(int(b) - int(a) + 1 if b else 1
                      for p in cpus.split(",") if p for a, _, b in [p.partition("-")])
        if best is None or level >= best[0]:
            best = (level, nbytes, sharing)
    if best is None:
        return 32 << 20
    level, nbytes, sharing = best
    if sharing and nbytes > (16 << 20) * sharing:  # the host's cache: an assumed share
        return max(16 << 20, (8 << 20) * sharing)
    return nbytes

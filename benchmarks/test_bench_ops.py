"""CPU benchmarks of the masked variable-width convolution ops.

Each op (``masked_dwconv2d``, ``masked_pwconv2d``), forward (``fwd``) and
forward + backward (``fwdbwd``: grads of the input and of the full weight), at
MobileNet-like shapes, against two baselines:

- ``masked``  -- ours: ``bsnas.masked_*conv2d`` on the active-width input with the
  full weight and an active width.
- ``slicing`` -- ``F.conv2d`` on a slice of the weight (``weight[:c]`` for depthwise,
  ``weight[:o, :i]`` for pointwise), as Once-for-All does; the weight gradient flows
  back through the slice into the full weight.
- ``masking`` -- the full width is computed on a full-width input (its inactive
  channels zero) and a 0/1 channel mask is multiplied on the channel dimension that
  varies: the output for depthwise and for pointwise "expand", the input for pointwise
  "project" (whose output width is fixed).

Shapes (H x W / C_max): 112x112/c96, 56x56/c144, 28x28/c240, 14x14/c480, 7x7/c960.
Depthwise: kernel 3, 5, 7; width 25/50/100 % of C_max; "same" padding; stride 1 (and
2 with ``BSNAS_BENCH_STRIDES=1,2``: the kernel field then reads ``k5s2``).
Pointwise: "expand" in = round8(C/6) -> out = width of C; "project" in = width of C
-> out = round8(C/6); width 25/50/100 %.
Layouts: NCHW and channels_last (input and output gradient), float32.

Benchmark names look like ``dw-fwd-56x56-c144-k5-w50-nchw-masked`` and
``pw-fwdbwd-28x28-c240-expand-w25-cl-slicing``; ``benchmark.group`` is the name
without the method, so every group holds the three methods. ``extra_info`` carries
the fields (op, pass, shape, ..., method) for ``benchmarks/ratio_table.py``.

Not part of ``make test``: run it explicitly, e.g. ``benchmarks/run_cpu_bench.sh`` or
``python -m pytest benchmarks/ --benchmark-json=out.json``.

Environment:
- ``BSNAS_BENCH_N``        batch size (default 8, sized for a 2-vCPU machine; the GPU
                           benchmark's batch is 64).
- ``BSNAS_BENCH_QUICK=1``  a handful of cases (well under a minute).
- ``BSNAS_BENCH_STRIDES``  depthwise strides, "1" (default), "2" or "1,2".
- ``BSNAS_BENCH_TARGET_S`` measured seconds aimed at per benchmark (default 0.5);
                           rounds = clamp(target / time of one call, MIN, MAX).
- ``BSNAS_BENCH_MIN_ROUNDS`` / ``BSNAS_BENCH_MAX_ROUNDS`` (defaults 3 / 50).
- ``BSNAS_BENCH_KEEP_FREED=1`` keep freed memory for reuse (``bsnas.train.host_memory``, as
                           training runs do): glibc otherwise maps every output of 32 MB
                           and more afresh, and page faults then dominate the 112x112
                           calls of every method alike.
- ``BSNAS_BENCH_QUIET_CPU`` CPU (in cores) that other processes may use for the machine
                           to count as quiet (default 0.15), and
  ``BSNAS_BENCH_MAX_WAIT_S`` how long one benchmark waits for quiet (default 120).

Timing: each benchmark first waits (up to ``BSNAS_BENCH_MAX_WAIT_S``) until other
processes use less than ``BSNAS_BENCH_QUIET_CPU`` cores (from ``/proc/stat`` minus this
process's CPU time, steal included): with two cores and torch's OpenMP threads, any
other busy process (a compile, another test run) slows the ops 10-70x. Then two
un-measured calls (the first pays one-off costs such as oneDNN primitive creation),
then ``benchmark.pedantic`` with one iteration per round. ``extra_info`` records the
CPU other processes used during the measurement (``other_cpu``, cores) and the wait;
``ratio_table.py`` marks groups where it exceeded 0.25 cores, and
``run_cpu_bench.sh`` reruns those groups once. Only ratios measured in the same run
(same machine, same load) are meaningful.

Busy shared machine: ``BSNAS_BENCH_RT=1`` (Linux, root or CAP_SYS_NICE) skips the wait
and instead raises every thread of this process to ``SCHED_FIFO`` priority 1 for each
benchmark's warm-up + measurement, back to ``SCHED_OTHER`` after it, then sleeps
``BSNAS_BENCH_RT_GAP`` x that time (default 0.3) so other processes keep progressing
(they get the idle core time while we measure, the kernel's 5 % RT throttle and the
gaps). Background jobs, even niced ones, otherwise slow torch's oneDNN/OpenMP kernels
by up to 60x on two cores while the bsnas kernels slow far less, which skews the
ratios. In RT mode ``other_cpu`` only shows what others ran on cores we left idle
(e.g. a kernel that uses one of two cores), so groups are not marked as contended.
"""
from __future__ import annotations

import os
import sys
import time

import pytest
import torch
import torch.nn.functional as F

try:
    import bsnas
except ImportError:  # run as `pytest benchmarks/` without the repo root on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import bsnas

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # any import mode
from ratio_table import cpu_setup  # noqa: E402

N = int(os.environ.get("BSNAS_BENCH_N", "8"))
QUICK = os.environ.get("BSNAS_BENCH_QUICK", "0") not in ("", "0")
TARGET_S = float(os.environ.get("BSNAS_BENCH_TARGET_S", "0.5"))
MIN_ROUNDS = int(os.environ.get("BSNAS_BENCH_MIN_ROUNDS", "3"))
MAX_ROUNDS = int(os.environ.get("BSNAS_BENCH_MAX_ROUNDS", "50"))
QUIET_CPU = float(os.environ.get("BSNAS_BENCH_QUIET_CPU", "0.15"))
MAX_WAIT_S = float(os.environ.get("BSNAS_BENCH_MAX_WAIT_S", "120"))
RT = os.environ.get("BSNAS_BENCH_RT", "0") not in ("", "0")
RT_GAP = float(os.environ.get("BSNAS_BENCH_RT_GAP", "0.3"))
KEEP_FREED = os.environ.get("BSNAS_BENCH_KEEP_FREED", "0") not in ("", "0")
if KEEP_FREED:
    from bsnas.train.host_memory import keep_freed_memory
    KEEP_FREED = keep_freed_memory()
STRIDES = [int(v) for v in os.environ.get("BSNAS_BENCH_STRIDES", "1").split(",") if v.strip()]
if not STRIDES or any(v not in (1, 2) for v in STRIDES):
    raise ValueError(f"BSNAS_BENCH_STRIDES must be a comma list of 1 and/or 2, got "
                     f"{os.environ.get('BSNAS_BENCH_STRIDES')!r}")

SHAPES = [(112, 96), (56, 144), (28, 240), (14, 480), (7, 960)]  # (H == W, C_max)
KERNELS = [3, 5, 7]
WIDTHS = [25, 50, 100]  # percent of C_max
LAYOUTS = ["nchw", "cl"]
PASSES = ["fwd", "fwdbwd"]
METHODS = ["masked", "slicing", "masking"]  # ours first
PW_KINDS = ["expand", "project"]

_FORMATS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}


def _ext_stamp() -> str:
    """mtime (UTC) of the loaded bsnas._C library: which build was measured."""
    try:
        path = bsnas._C.__file__
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(os.path.getmtime(path)))
    except (AttributeError, OSError, TypeError):
        return "?"


EXT_STAMP = _ext_stamp()


CPU_SETUP = cpu_setup()


def _round8(v: int) -> int:
    return max(8, int(round(v / 8.0)) * 8)


def _pw_dims(c: int, kind: str, width_pct: int):
    """(Cin_max, Cout_max, in_width, out_width) of a pointwise case."""
    small = _round8(c / 6)
    active = c * width_pct // 100
    if kind == "expand":
        return small, c, small, active
    return c, small, active, small


# --------------------------------------------------------------------------- cases


def _dw_cases():
    for pas in PASSES:
        for hw, c in SHAPES:
            for k, st in ((k, st) for k in KERNELS for st in STRIDES):
                kvar = f"k{k}" + (f"s{st}" if st != 1 else "")
                for wp in WIDTHS:
                    for layout in LAYOUTS:
                        group = f"dw-{pas}-{hw}x{hw}-c{c}-{kvar}-w{wp}-{layout}"
                        for m in METHODS:
                            yield dict(op="dw", pas=pas, hw=hw, c=c, k=k, stride=st, wp=wp,
                                       layout=layout, method=m, group=group)


def _pw_cases():
    for pas in PASSES:
        for hw, c in SHAPES:
            for kind in PW_KINDS:
                for wp in WIDTHS:
                    for layout in LAYOUTS:
                        group = f"pw-{pas}-{hw}x{hw}-c{c}-{kind}-w{wp}-{layout}"
                        for m in METHODS:
                            yield dict(op="pw", pas=pas, hw=hw, c=c, kind=kind, wp=wp,
                                       layout=layout, method=m, group=group)


# The quick subset: a handful of groups, cheap shapes, both layouts and passes.
_QUICK_GROUPS = {
    "dw-fwd-28x28-c240-k3-w50-nchw",
    "dw-fwd-14x14-c480-k5-w50-cl",
    "dw-fwdbwd-28x28-c240-k3-w50-cl",
    "dw-fwdbwd-14x14-c480-k5-w50-nchw",
    "pw-fwd-28x28-c240-expand-w50-nchw",
    "pw-fwd-14x14-c480-project-w50-cl",
    "pw-fwdbwd-28x28-c240-project-w50-nchw",
    "pw-fwdbwd-14x14-c480-expand-w50-cl",
}


def _select(cases):
    cases = list(cases)
    if QUICK:
        cases = [cs for cs in cases if cs["group"] in _QUICK_GROUPS]
    return [pytest.param(cs, id=f"{cs['group']}-{cs['method']}") for cs in cases]


# --------------------------------------------------------------------------- builders


def _mask(c: int, active: int) -> torch.Tensor:
    m = torch.zeros(1, c, 1, 1)
    m[:, :active] = 1.0
    return m


def _zero_inactive(x: torch.Tensor, active: int) -> torch.Tensor:
    x = x.clone(memory_format=torch.preserve_format)
    x[:, active:] = 0.0
    return x


def _build_dw(cs):
    """Returns (fn, inputs-needing-grad, output-shape) for one depthwise case."""
    hw, c, k, method = cs["hw"], cs["c"], cs["k"], cs["method"]
    st = cs.get("stride", 1)
    mf = _FORMATS[cs["layout"]]
    width = c * cs["wp"] // 100
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(c, 1, k, k, generator=g)
    pad = k // 2
    ho = (hw + 2 * pad - k) // st + 1
    if method == "masking":
        x = _zero_inactive(torch.randn(N, c, hw, hw, generator=g), width)
        x = x.contiguous(memory_format=mf)
        mask = _mask(c, width)

        def fn(x, w):
            return F.conv2d(x, w, None, st, pad, 1, c) * mask
        out_c = c
    else:
        x = torch.randn(N, width, hw, hw, generator=g).contiguous(memory_format=mf)
        if method == "masked":
            def fn(x, w):
                return bsnas.masked_dwconv2d(x, w, width, st, pad, 1)
        else:
            def fn(x, w):
                return F.conv2d(x, w[:width], None, st, pad, 1, width)
        out_c = width
    return fn, x, weight, (N, out_c, ho, ho), mf


def _build_pw(cs):
    hw, c, kind, method = cs["hw"], cs["c"], cs["kind"], cs["method"]
    mf = _FORMATS[cs["layout"]]
    cin_max, cout_max, iw, ow = _pw_dims(c, kind, cs["wp"])
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(cout_max, cin_max, 1, 1, generator=g)
    if method == "masking":
        x = _zero_inactive(torch.randn(N, cin_max, hw, hw, generator=g), iw)
        x = x.contiguous(memory_format=mf)
        if kind == "expand":  # output width varies: mask the output
            mask = _mask(cout_max, ow)

            def fn(x, w):
                return F.conv2d(x, w) * mask
        else:  # input width varies: mask the input, output is full
            mask = _mask(cin_max, iw)

            def fn(x, w):
                return F.conv2d(x * mask, w)
        out_c = cout_max
    else:
        x = torch.randn(N, iw, hw, hw, generator=g).contiguous(memory_format=mf)
        if method == "masked":
            def fn(x, w):
                return bsnas.masked_pwconv2d(x, w, iw, ow)
        else:
            def fn(x, w):
                return F.conv2d(x, w[:ow, :iw])
        out_c = ow
    return fn, x, weight, (N, out_c, hw, hw), mf


# --------------------------------------------------------------------------- load guard

_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_sample():
    """(wall s, machine busy CPU-s incl. steal, this process's CPU-s) or None."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    busy = (sum(vals) - vals[3] - vals[4]) / _HZ  # all but idle and iowait
    t = os.times()
    return time.monotonic(), busy, t.user + t.system


def _other_cpu(a, b):
    """Average cores used by other processes between two samples (None if unknown)."""
    if a is None or b is None or b[0] <= a[0]:
        return None
    return max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / (b[0] - a[0]))


_last_quiet = [None]  # monotonic time at which the last measurement ended quiet


def _wait_for_quiet():
    """Sleep until other processes use < QUIET_CPU cores; returns seconds waited.
    Skipped when the previous measurement ended quiet less than a second ago."""
    start = time.monotonic()
    if _last_quiet[0] is not None and start - _last_quiet[0] < 1.0:
        return 0.0
    while True:
        a = _cpu_sample()
        time.sleep(0.3)
        other = _other_cpu(a, _cpu_sample())
        waited = time.monotonic() - start
        if other is None or other < QUIET_CPU or waited >= MAX_WAIT_S:
            return waited
        time.sleep(0.7)


def _set_rt(on: bool) -> bool:
    """SCHED_FIFO 1 (on) or SCHED_OTHER (off) for every thread of this process;
    False if not permitted / not supported."""
    if not hasattr(os, "sched_setscheduler"):
        return False
    policy = os.SCHED_FIFO if on else os.SCHED_OTHER
    param = os.sched_param(1 if on else 0)
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    ok = True
    for tid in tids:
        try:
            os.sched_setscheduler(tid, policy, param)
        except ProcessLookupError:
            pass
        except OSError:
            ok = False
    return ok


# --------------------------------------------------------------------------- runner


def _run(benchmark, cs, built):
    fn, x, weight, out_shape, mf = built
    if cs["pas"] == "fwd":
        def call():
            with torch.no_grad():
                return fn(x, weight)
    else:
        x.requires_grad_(True)
        weight.requires_grad_(True)
        grad_out = torch.randn(out_shape, generator=torch.Generator().manual_seed(1))
        grad_out = grad_out.contiguous(memory_format=mf)

        def call():
            # autograd.grad: no accumulation into .grad, same work for every method
            return torch.autograd.grad(fn(x, weight), (x, weight), grad_out)

    rt = RT and _set_rt(True)
    if RT and not rt:
        _set_rt(False)
    waited = 0.0 if rt else _wait_for_quiet()
    w0 = time.monotonic()
    call()  # one-off costs (allocator, oneDNN primitive creation)
    t0 = time.perf_counter()
    call()
    one = time.perf_counter() - t0
    rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, int(TARGET_S / max(one, 1e-6))))

    benchmark.group = cs["group"]
    benchmark.extra_info.update({key: cs[key] for key in cs if key != "group"})
    benchmark.extra_info.update(n=N, dtype="float32", threads=torch.get_num_threads(),
                                torch=torch.__version__, ext_built=EXT_STAMP,
                                keep_freed=KEEP_FREED, **CPU_SETUP)
    if cs["op"] == "pw":
        cin_max, cout_max, iw, ow = _pw_dims(cs["c"], cs["kind"], cs["wp"])
        benchmark.extra_info.update(cin_max=cin_max, cout_max=cout_max,
                                    in_width=iw, out_width=ow)
    a = _cpu_sample()
    try:
        benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0)
    finally:
        b = _cpu_sample()
        if rt:
            _set_rt(False)
    other = _other_cpu(a, b)
    _last_quiet[0] = b[0] if other is not None and other < QUIET_CPU else None
    benchmark.extra_info.update(other_cpu=None if other is None else round(other, 3),
                                waited_s=round(waited, 1), rt=rt)
    if rt:
        time.sleep(RT_GAP * (time.monotonic() - w0))


@pytest.mark.parametrize("cs", _select(_dw_cases()))
def test_dw(benchmark, cs):
    _run(benchmark, cs, _build_dw(cs))


@pytest.mark.parametrize("cs", _select(_pw_cases()))
def test_pw(benchmark, cs):
    _run(benchmark, cs, _build_pw(cs))

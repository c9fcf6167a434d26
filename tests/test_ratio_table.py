"""benchmarks/ratio_table.py's run line: what a table was measured with."""
import importlib.util
import os

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "ratio_table.py")
_spec = importlib.util.spec_from_file_location("ratio_table", _PATH)
ratio_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ratio_table)


def _data(**info):
    base = {"torch": "2.14.1", "threads": 2, "ext_built": "2026-12-05T18:52:07Z", "n": 8,
            "rt": True, "keep_freed": False}
    groups = {("dw", "fwd", 14, 480, "k3", 100, "cl"): {"info": {**base, **info}}}
    data = {"datetime": "2026-12-05T19:00:00", "benchmarks": [{}, {}, {}],
            "machine_info": {"cpu": {"brand_raw": "Some CPU", "count": 2}}}
    return groups, data


def test_header_names_isa_and_cache_size():
    line = ratio_table.header(*_data(isa="avx512", llc_bytes=16 << 20))
    assert "CPU kernels avx512" in line
    assert "streaming thresholds read a 16 MiB last-level cache" in line
    assert "SCHED_FIFO while measuring" in line and line.endswith("3 benchmarks.")


def test_header_of_older_runs_without_them():
    # JSON written before the fields existed: the line leaves them out.
    line = ratio_table.header(*_data())
    assert "CPU kernels" not in line and "last-level cache" not in line
    assert "bsnas._C built 2026-12-05T18:52:07Z" in line


def test_cpu_setup_reads_the_extension():
    setup = ratio_table.cpu_setup()
    import bsnas
    assert setup == {"isa": bsnas._C.cpu_isa(), "llc_bytes": bsnas._C.cpu_llc_bytes()}
    assert ratio_table.cpu_setup_bits(setup)[0] == f"CPU kernels {setup['isa']}"

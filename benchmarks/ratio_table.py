#!/usr/bin/env python
"""Ratio tables from a pytest-benchmark JSON of ``benchmarks/test_bench_ops.py``.

Usage: python benchmarks/ratio_table.py FILE.json [MORE.json ...] [--out FILE.md]
       python benchmarks/ratio_table.py FILE.json --list-contended

With several files, a group (the three methods of one case) found in a later file
replaces the same group of earlier ones (e.g. a rerun of contended groups), so every
ratio still compares timings of one run.

One markdown table per (op, pass): rows = shape / kernel or pw kind / width / layout;
columns = median time of ours (``masked``, ms), slicing/ours and masking/ours (ratios
of medians; > 1 means ours is faster). Then a summary: min ratio vs slicing, min ratio
vs masking at width 50 %, and how many cases meet the CPU targets:
masked ops >= 1.0x slicing at every shape, >= 1.5x masking at width 50 %.
A ratio that misses its target is marked with ``!``; a row whose measurements saw
other processes use more than 0.25 cores on average (``extra_info.other_cpu``) is
marked ``(contended)`` (not in ``BSNAS_BENCH_RT`` runs, where the process held the
CPU at real-time priority). ``--list-contended`` prints the pytest node ids of the
contended groups, one per line, for a rerun.
"""
from __future__ import annotations

import argparse
import json
import sys

SLICING_TARGET = 1.0
MASKING_TARGET = 1.5
MASKING_TARGET_WIDTH = 50
CONTENDED_CPU = 0.25  # cores used by other processes during a measurement

OPS = [("dw", "masked_dwconv2d"), ("pw", "masked_pwconv2d")]
PASSES = [("fwd", "forward"), ("fwdbwd", "forward + backward")]


def _parse_name(name: str) -> dict:
    """Fallback when extra_info is missing: parse the test id
    (``test_dw[dw-fwd-56x56-c144-k5-w50-nchw-masked]``)."""
    cid = name[name.index("[") + 1:name.rindex("]")] if "[" in name else name
    parts = cid.split("-")
    op, pas, shape, c, var, w, layout, method = parts
    info = dict(op=op, pas=pas, hw=int(shape.split("x")[0]), c=int(c[1:]),
                wp=int(w[1:]), layout=layout, method=method)
    if op == "dw":  # "k5" or "k5s2"
        k, _, st = var[1:].partition("s")
        info["k"], info["stride"] = int(k), int(st or 1)
    else:
        info["kind"] = var
    return info


def load(paths):
    """Returns ({group key: {"info": extra_info, "other": max other_cpu,
    "names": [test names], method: median seconds}}, metadata of the first file)."""
    groups: dict = {}
    first = None
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        first = first or data
        file_groups: dict = {}
        for b in data.get("benchmarks", []):
            info = dict(b.get("extra_info") or {})
            if "method" not in info:
                info.update(_parse_name(b["name"]))
            if info["op"] == "dw":
                st = info.get("stride", 1)
                var = f"k{info['k']}" + (f"s{st}" if st != 1 else "")
            else:
                var = info["kind"]
            key = (info["op"], info["pas"], info["hw"], info["c"], var, info["wp"],
                   info["layout"])
            g = file_groups.setdefault(key, {"info": info, "other": 0.0, "names": []})
            g[info["method"]] = b["stats"]["median"]
            g["names"].append(b.get("fullname") or b["name"])
            if info.get("other_cpu") is not None and not info.get("rt"):
                g["other"] = max(g["other"], info["other_cpu"])
        groups.update(file_groups)
    return groups, first or {}


def _sort_key(key):
    op, pas, hw, c, var, wp, layout = key
    return (-hw, var, wp, 0 if layout == "nchw" else 1)


def _fmt_ratio(r, target):
    if r is None:
        return "n/a"
    s = f"{r:.2f}x"
    return s + " !" if target is not None and r < target else s


def _case(key):
    op, pas, hw, c, var, wp, layout = key
    return f"{op}-{pas}-{hw}x{hw}-c{c}-{var}-w{wp}-{layout}"


def cpu_setup() -> dict:
    """What the bsnas CPU kernels run with, for a benchmark to record: their instruction
    set and the last-level cache size their streaming thresholds read (BSNAS_CPU_ISA,
    BSNAS_CPU_LLC_BYTES or sysfs); {} without the extension."""
    try:
        import bsnas
        return {"isa": bsnas._C.cpu_isa(), "llc_bytes": int(bsnas._C.cpu_llc_bytes())}
    except (ImportError, AttributeError, RuntimeError):
        return {}


def cpu_setup_bits(info) -> list:
    """cpu_setup()'s fields, as the run lines of the op and block tables say them."""
    bits = []
    if info.get("isa"):
        bits.append(f"CPU kernels {info['isa']}")
    if info.get("llc_bytes"):
        bits.append(f"streaming thresholds read a {info['llc_bytes'] / 2**20:g} MiB "
                    f"last-level cache")
    return bits


def header(groups, data) -> str:
    info = next(iter(groups.values()))["info"] if groups else {}
    cpu = (data.get("machine_info") or {}).get("cpu") or {}
    bits = [f"{data.get('datetime', '?')}",
            f"CPU {cpu.get('brand_raw', '?')} ({cpu.get('count', '?')} logical CPUs)",
            f"torch {info.get('torch', '?')}", f"torch threads {info.get('threads', '?')}",
            "bsnas._C built " + " and ".join(
                sorted({str(g["info"].get("ext_built", "?")) for g in groups.values()})),
            f"N={info.get('n', '?')}", f"{info.get('dtype', 'float32')}",
            *cpu_setup_bits(info),
            "SCHED_FIFO while measuring (BSNAS_BENCH_RT=1)" if info.get("rt")
            else "normal priority",
            "freed memory kept (BSNAS_BENCH_KEEP_FREED=1)" if info.get("keep_freed")
            else "glibc's default for freed memory",
            f"{len(data.get('benchmarks', []))} benchmarks"]
    return "Run: " + ", ".join(bits) + "."


def render(groups, data) -> str:
    out = [header(groups, data), ""]
    rows_all = []  # (key, ours, r_slicing, r_masking)
    for op, op_name in OPS:
        for pas, pas_name in PASSES:
            keys = sorted((k for k in groups if k[0] == op and k[1] == pas), key=_sort_key)
            if not keys:
                continue
            var_head = "k" if op == "dw" else "pw kind (in->out)"
            out.append(f"### `{op_name}` {pas_name}\n")
            out.append(f"| shape | C_max | {var_head} | width | layout | ours (ms) "
                       f"| slicing / ours | masking / ours |")
            out.append("|---|---|---|---|---|---:|---:|---:|")
            for key in keys:
                g = groups[key]
                _, _, hw, c, var, wp, layout = key
                ours = g.get("masked")
                rs = g["slicing"] / ours if ours and "slicing" in g else None
                rm = g["masking"] / ours if ours and "masking" in g else None
                rows_all.append((key, ours, rs, rm))
                info = g["info"]
                if op == "pw" and "in_width" in info:
                    var_s = f"{var} ({info['in_width']}->{info['out_width']})"
                else:
                    var_s = var[1:] if op == "dw" else var
                m_target = MASKING_TARGET if wp == MASKING_TARGET_WIDTH else None
                ours_s = f"{ours * 1e3:.3f}" if ours else "n/a"
                if g["other"] > CONTENDED_CPU:
                    ours_s += " (contended)"
                out.append(f"| {hw}x{hw} | {c} | {var_s} | {wp}% | {layout} | {ours_s} "
                           f"| {_fmt_ratio(rs, SLICING_TARGET)} | {_fmt_ratio(rm, m_target)} |")
            out.append("")
    out.extend(summary(rows_all))
    contended = [k for k in groups if groups[k]["other"] > CONTENDED_CPU]
    out.append(f"Contended groups (other processes > {CONTENDED_CPU} cores during a "
               f"measurement): {len(contended)}/{len(groups)}.")
    return "\n".join(out) + "\n"


def summary(rows_all):
    lines = ["### Summary\n"]
    sl = [(r[2], r[0]) for r in rows_all if r[2] is not None]
    ma = [(r[3], r[0]) for r in rows_all
          if r[3] is not None and r[0][5] == MASKING_TARGET_WIDTH]
    if not sl:
        return lines + ["No complete groups.", ""]
    sl_min = min(sl)
    sl_ok = sum(1 for r, _ in sl if r >= SLICING_TARGET)
    line = (f"**Summary:** min ratio vs slicing {sl_min[0]:.2f}x ({_case(sl_min[1])}); ")
    if ma:
        ma_min = min(ma)
        ma_ok = sum(1 for r, _ in ma if r >= MASKING_TARGET)
        line += (f"min ratio vs masking at width {MASKING_TARGET_WIDTH}% {ma_min[0]:.2f}x "
                 f"({_case(ma_min[1])}); ")
    line += (f"targets: >= {SLICING_TARGET:.1f}x slicing met in {sl_ok}/{len(sl)} cases")
    if ma:
        line += (f", >= {MASKING_TARGET:.1f}x masking at width {MASKING_TARGET_WIDTH}% "
                 f"met in {ma_ok}/{len(ma)} cases")
    lines.append(line + ".")
    lines.append("")
    # per (op, pass) breakdown
    lines.append("| op / pass | cases | min vs slicing | >= 1.0x slicing "
                 "| min vs masking @50% | >= 1.5x masking @50% |")
    lines.append("|---|---:|---:|---:|---:|---:|")
    for op, op_name in OPS:
        for pas, _ in PASSES:
            s = [r for r, k in sl if k[0] == op and k[1] == pas]
            m = [r for r, k in ma if k[0] == op and k[1] == pas]
            if not s:
                continue
            m_min = f"{min(m):.2f}x" if m else "n/a"
            m_ok = f"{sum(r >= MASKING_TARGET for r in m)}/{len(m)}" if m else "n/a"
            lines.append(f"| {op_name} {pas} | {len(s)} | {min(s):.2f}x "
                         f"| {sum(r >= SLICING_TARGET for r in s)}/{len(s)} | {m_min} "
                         f"| {m_ok} |")
    lines.append("")
    lose_s = sorted((k for r, k in sl if r < SLICING_TARGET), key=lambda k: (k[:2], _sort_key(k)))
    lose_m = sorted((k for r, k in ma if r < MASKING_TARGET), key=lambda k: (k[:2], _sort_key(k)))
    for title, lose, allk in (
            (f"Cases below {SLICING_TARGET:.1f}x slicing", lose_s, [k for _, k in sl]),
            (f"Cases below {MASKING_TARGET:.1f}x masking at width {MASKING_TARGET_WIDTH}%",
             lose_m, [k for _, k in ma])):
        if len(lose) <= LIST_MAX:
            lines.append(f"{title} ({len(lose)}): "
                         + (", ".join(f"`{_case(k)}`" for k in lose) or "none") + ".")
            lines.append("")
        else:
            lines.extend(_loss_matrix(title, lose, allk))
    return lines


LIST_MAX = 30


def _loss_matrix(title, lose, allk):
    """Missed/total per (op, pass, pw kind, layout) row and shape column."""
    def row(k):
        return (k[0], k[1], k[4] if k[0] == "pw" else "", k[6])
    shapes = sorted({(k[2], k[3]) for k in allk}, key=lambda hc: -hc[0])
    rows = sorted({row(k) for k in allk},
                  key=lambda r: (r[0], r[1], r[2], 0 if r[3] == "nchw" else 1))
    tot, bad = {}, {}
    for k in allk:
        key = (row(k), (k[2], k[3]))
        tot[key] = tot.get(key, 0) + 1
    for k in lose:
        key = (row(k), (k[2], k[3]))
        bad[key] = bad.get(key, 0) + 1
    out = [f"{title}: {len(lose)}/{len(allk)}; missed / total per shape (a shape's cases "
           f"are its kernel sizes or widths):", ""]
    out.append("| op pass | layout | " + " | ".join(f"{h}x{h} c{c}" for h, c in shapes) + " |")
    out.append("|---|---|" + "---:|" * len(shapes))
    for r in rows:
        name = f"{r[0]} {r[1]}" + (f" {r[2]}" if r[2] else "")
        cells = []
        for hc in shapes:
            t = tot.get((r, hc), 0)
            cells.append(f"{bad.get((r, hc), 0)}/{t}" if t else "-")
        out.append(f"| {name} | {r[3]} | " + " | ".join(cells) + " |")
    out.append("")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="+",
                    help="pytest-benchmark JSON (--benchmark-json=FILE); later files' "
                         "groups replace earlier ones")
    ap.add_argument("--out", help="also write the markdown here")
    ap.add_argument("--list-contended", action="store_true",
                    help="print the node ids of contended groups and exit")
    args = ap.parse_args(argv)
    groups, data = load(args.json)
    if args.list_contended:
        for key in sorted(groups, key=lambda k: (k[:2], _sort_key(k))):
            if groups[key]["other"] > CONTENDED_CPU:
                for name in groups[key]["names"]:
                    print(name)
        return 0
    text = render(groups, data)
    sys.stdout.write(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

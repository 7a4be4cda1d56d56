#!/usr/bin/env python3
"""Summarises bench/store-throughput.sh's raw results: Markdown tables on stdout, a CSV of medians, and a PNG
of throughput against the thread count (ingest and rebuild, with the raw disk read as a reference line).

    bench/plot_throughput.py RAW.jsonl [--csv OUT.csv] [--png docs/store-throughput.png] [--set all|bert] [--cores N]

--set names the image set of the thread sweep and the disk baseline ("all" for bench/store-throughput.sh, "bert"
for bench/store-device.sh); --cores, the cores of the machine that ran it (default: this one's).

Uses matplotlib when it can be imported; otherwise draws the PNG itself (zlib + struct), with axes, grid,
numeric tick labels and coloured lines but no text labels, and prints the colour legend.
"""
import argparse
import collections
import csv
import json
import os
import statistics
import struct
import sys
import zlib

GB = 1e9


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def median(values):
    return statistics.median(values) if values else float("nan")


def fmt_bytes(n):
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.1f} {unit}"
    return f"{n} B"


def summarize(rows):
    """Groups rounds of the same measurement; returns a list of dicts with median seconds and GB/s."""
    groups = collections.OrderedDict()
    for r in rows:
        if r["command"] in ("second", "layout"):
            continue
        key = (r["command"], r.get("phase", ""), r.get("set", ""), r.get("codec", ""), r.get("threads", 0),
               r.get("cache", ""), r.get("mode", ""))
        groups.setdefault(key, []).append(r)
    out = []
    for (command, phase, set_, codec, threads, cache, mode), rs in groups.items():
        seconds = median([r["seconds"] for r in rs])
        plain = rs[0]["plainBytes"]
        row = {"command": command, "phase": phase, "set": set_, "codec": codec, "threads": threads, "cache": cache,
               "mode": mode, "rounds": len(rs), "plain_bytes": plain, "seconds": seconds, "gbps": plain / seconds / GB,
               "seconds_min": min(r["seconds"] for r in rs), "seconds_max": max(r["seconds"] for r in rs)}
        if "userSeconds" in rs[0]:
            row["cores_busy"] = median([(r["userSeconds"] + r["systemSeconds"]) / r["seconds"] for r in rs])
            row["user_seconds"] = median([r["userSeconds"] for r in rs])
            row["system_seconds"] = median([r["systemSeconds"] for r in rs])
        if command == "ingest":
            row.update(stored_bytes=rs[0]["storedBytes"], ratio=rs[0]["ratio"], codec_ratio=rs[0]["codecRatio"],
                       zero_bytes=rs[0]["zeroBytes"], duplicate_bytes=rs[0]["duplicateBytes"], files=rs[0]["files"])
        if command == "rebuild":
            row.update(sync_seconds=median([r["syncSeconds"] for r in rs]), chunk_file_bytes=rs[0]["chunkFileBytes"],
                       identical=all(r.get("identical") for r in rs) if mode == "rebuild" else "")
        out.append(row)
    return out


def find(summary, **want):
    return [r for r in summary if all(r.get(k) == v for k, v in want.items())]


def tables(rows, summary, main_set, cores):
    lines = []
    cat = {r["set"]: r for r in find(summary, command="cat")}
    loads = sorted(r["load1"] for r in rows if "load1" in r)
    if loads:
        lines.append(f"(1-minute load average when each measurement ended, this run included: median {median(loads):.2f}, "
                     f"max {loads[-1]:.2f}, over {len(loads)} measurements.)")
        lines.append("")

    lines.append("Images (plain `criu dump`), and the raw disk baseline (cold cache, median):")
    lines.append("")
    lines.append("| images | files | size | of it zero 2 MiB chunks | `cat` cold | `cp` cold | `cp` cold + sync |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    for set_ in (("python", "workload", "all") if main_set == "all" else (main_set,)):
        ing = find(summary, command="ingest", set=set_)
        c = cat.get(set_)
        cp = find(summary, command="cp", set=set_)
        cps = find(summary, command="cp+sync", set=set_)
        size = ing[0]["plain_bytes"] if ing else (c["plain_bytes"] if c else 0)
        zero = f"{fmt_bytes(ing[0]['zero_bytes'])}" if ing else ""
        files = ing[0]["files"] if ing else ""
        cell = lambda r: f"{r['seconds']:.2f} s ({r['gbps']:.2f} GB/s)" if r else "-"
        lines.append(f"| {set_} | {files} | {fmt_bytes(size)} | {zero} | {cell(c)} | {cell(cp[0] if cp else None)} | {cell(cps[0] if cps else None)} |")
    lines.append("")

    lines.append("Codecs (ingest into a fresh store, images in the page cache; rebuild from a cold cache, "
                 f"both on all cores; median):")
    lines.append("")
    lines.append("| images | codec | stored | ratio (all) | ratio (codec only) | ingest | ingest CPU: user / system s | rebuild (cold) | rebuild CPU: user / system s | rebuild / `cat` cold |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in find(summary, command="ingest", phase="codecs"):
        rb = find(summary, command="rebuild", phase="codecs", set=r["set"], codec=r["codec"])
        rb = rb[0] if rb else None
        c = cat.get(r["set"])
        vs = f"{c['seconds'] / rb['seconds']:.2f}x" if rb and c else "-"
        rbtext = f"{rb['seconds']:.2f} s ({rb['gbps']:.2f} GB/s)" if rb else "-"
        cpu = lambda x: f"{x['user_seconds']:.2f} / {x['system_seconds']:.2f}" if x and "user_seconds" in x else "-"
        lines.append(f"| {r['set']} | {r['codec']} | {fmt_bytes(r['stored_bytes'])} | {r['ratio']:.2f} | {r['codec_ratio']:.2f} | "
                     f"{r['seconds']:.2f} s ({r['gbps']:.2f} GB/s) | {cpu(r)} | {rbtext} | {cpu(rb)} | {vs} |")
    lines.append("")

    c = cat.get(main_set)
    images = "python + workload images" if main_set == "all" else f"{main_set} images"
    lines.append(f"Threads (lz4, {images}; median GB/s; rebuild/verify `cold` read the store from the disk):")
    lines.append("")
    lines.append("(In brackets: cores busy, (user + system CPU seconds) / wall seconds, of the store-bench process.)")
    lines.append("")
    lines.append("| threads | ingest (warm images) | ingest, store on tmpfs | rebuild cold | rebuild warm | verify only, cold | rebuild cold / `cat` of the images cold | fsync of rebuilt files |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for t in sorted({r["threads"] for r in find(summary, phase="threads")}):
        ing = find(summary, command="ingest", phase="threads", threads=t)
        shm = find(summary, command="ingest", phase="threads-tmpfs", threads=t)
        cold = find(summary, command="rebuild", phase="threads", threads=t, cache="cold", mode="rebuild")
        warm = find(summary, command="rebuild", phase="threads", threads=t, cache="warm", mode="rebuild")
        ver = find(summary, command="rebuild", phase="threads", threads=t, cache="cold", mode="verify")
        g = lambda x: (f"{x[0]['gbps']:.2f}" + (f" ({x[0]['cores_busy']:.2f})" if "cores_busy" in x[0] else "")) if x else "-"
        vs = f"{c['seconds'] / cold[0]['seconds']:.2f}x" if c and cold else "-"
        sync = f"{cold[0]['sync_seconds']:.2f} s" if cold else "-"
        note = " (over-subscribed)" if t > cores else ""
        lines.append(f"| {t}{note} | {g(ing)} | {g(shm)} | {g(cold)} | {g(warm)} | {g(ver)} | {vs} | {sync} |")
    if c:
        lines.append(f"| `cat` of the image files, cold (1 reader) | | | {c['gbps']:.2f} | | | 1.00x | |")
    for r in sorted(find(summary, command="cat-chunks"), key=lambda r: r["threads"]):
        vs = f"{c['seconds'] / r['seconds']:.2f}x" if c else "-"
        lines.append(f"| `cat` of the lz4 store's chunk files, cold ({r['threads']} reader{'s' if r['threads'] > 1 else ''}) | | | {r['gbps']:.2f} | | | {vs} | |")
    lines.append("")

    layout = [r for r in rows if r["command"] == "layout"]
    if layout:
        lines.append(f"Page layout of two plain `criu dump --leave-running` of the same Python job, {layout[0].get('gap', 0):.0f} s apart: "
                     "how much of the second pages file the first already holds:")
        lines.append("")
        lines.append("| job | pages file 1 / 2 | 4 KiB pages at the same offset | 4 KiB pages anywhere in the first | 2 MiB fixed-offset chunks found |")
        lines.append("| --- | --- | --- | --- | --- |")
        for r in layout:
            lines.append(f"| {r['set']} | {fmt_bytes(r['bytes1'])} / {fmt_bytes(r['bytes2'])} | "
                         f"{100 * r['pagesSameOffset'] / r['pages2']:.1f}% | {100 * r['pagesAnywhere'] / r['pages2']:.1f}% | "
                         f"{r['chunksFound']} of {r['chunks2']} ({100 * r['chunksFound'] / r['chunks2']:.1f}%) |")
        lines.append("")

    second = [r for r in rows if r["command"] == "second"]
    if second:
        lines.append("Second checkpoint of a running job (`stasis dump --leave-running` twice into one store, "
                     f"{second[0]['gap']:.0f} s apart, codec {second[0]['codec']}):")
        lines.append("")
        lines.append("| job | memory image | first checkpoint stored | second: new / reused / zero chunks | second: stored (manifest) | second: store growth (du) | growth / image |")
        lines.append("| --- | --- | --- | --- | --- | --- | --- |")
        for r in second:
            lines.append(f"| {r['set']} | {fmt_bytes(r['plainBytes2'])} | {fmt_bytes(r['storedBytes1'])} | "
                         f"{r['newChunks2']} / {r['reusedChunks2']} / {r['zeroChunks2']} | {fmt_bytes(r['storedBytes2'])} | "
                         f"{fmt_bytes(r['duGrowth'])} | {100 * r['duGrowth'] / r['plainBytes2']:.1f}% |")
        lines.append("")
    return "\n".join(lines)


def write_csv(summary, path):
    fields = ["command", "phase", "set", "codec", "threads", "cache", "mode", "rounds", "plain_bytes", "stored_bytes",
              "ratio", "codec_ratio", "zero_bytes", "duplicate_bytes", "chunk_file_bytes", "seconds", "seconds_min",
              "seconds_max", "gbps", "user_seconds", "system_seconds", "cores_busy", "sync_seconds", "identical"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in summary:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})


def series(summary, main_set):
    """(label, colour, [(threads, GB/s)]) lines and (label, colour, GB/s) reference levels."""
    def line(**want):
        return sorted((r["threads"], r["gbps"]) for r in find(summary, phase="threads", **want))
    lines = [("ingest, lz4 (images in page cache)", "#1f77b4", line(command="ingest")),
             ("ingest, lz4, store on tmpfs", "#17becf", sorted((r["threads"], r["gbps"]) for r in find(summary, command="ingest", phase="threads-tmpfs"))),

             ("rebuild, cold cache", "#d62728", line(command="rebuild", cache="cold", mode="rebuild")),
             ("rebuild, warm cache", "#ff9896", line(command="rebuild", cache="warm", mode="rebuild")),
             ("verify only, cold cache", "#2ca02c", line(command="rebuild", cache="cold", mode="verify"))]
    refs = []
    for r in sorted(find(summary, command="cat-chunks"), key=lambda r: r["threads"]):
        refs.append((f"cat of the store's chunk files, cold, {r['threads']} reader{'s' if r['threads'] > 1 else ''}",
                     "#9467bd" if r["threads"] == 1 else "#c5b0d5", r["gbps"]))
    for command, label, colour in (("cat", "disk read: cat, cold", "#000000"), ("cp", "cp, cold", "#7f7f7f"),
                                   ("cp+sync", "cp + sync, cold", "#bcbd22")):
        r = find(summary, command=command, set=main_set)
        if r:
            refs.append((label, colour, r[0]["gbps"]))
    return [l for l in lines if l[2]], refs


def plot_matplotlib(summary, path, title, main_set, cores):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lines, refs = series(summary, main_set)
    fig, ax = plt.subplots(figsize=(11, 5.2), dpi=110)
    for label, colour, points in lines:
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", color=colour, label=label, linewidth=2)
    for label, colour, value in refs:
        ax.axhline(value, linestyle="--", color=colour, label=f"{label} ({value:.2f} GB/s)", linewidth=1.2)
    threads = sorted({p[0] for _, _, pts in lines for p in pts})
    if threads and max(threads) > cores:
        ax.axvspan(cores * 1.2, max(threads) * 1.15, color="#eeeeee", zorder=0)
        ax.text(max(threads) * 1.12, 0.02, f"more threads than cores ({cores})", ha="right", va="bottom", fontsize=8, color="#555555",
                transform=ax.get_xaxis_transform())
    ax.set_xscale("log", base=2)
    ax.set_xticks(threads)
    ax.set_xticklabels([str(t) for t in threads])
    ax.minorticks_off()
    ax.set_xlabel("threads (log scale)")
    ax.set_ylabel("GB/s (plain bytes per second)")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path)


# ---- a PNG without matplotlib -------------------------------------------------------------------------

DIGITS = {  # 3x5 glyphs, rows top to bottom
    "0": ["111", "101", "101", "101", "111"], "1": ["010", "110", "010", "010", "111"],
    "2": ["111", "001", "111", "100", "111"], "3": ["111", "001", "111", "001", "111"],
    "4": ["101", "101", "111", "001", "001"], "5": ["111", "100", "111", "001", "111"],
    "6": ["111", "100", "111", "101", "111"], "7": ["111", "001", "001", "001", "001"],
    "8": ["111", "101", "111", "101", "111"], "9": ["111", "101", "111", "001", "111"],
    ".": ["000", "000", "000", "000", "010"],
}


class Canvas:
    def __init__(self, width, height):
        self.w, self.h = width, height
        self.px = bytearray(b"\xff" * (width * height * 3))

    def dot(self, x, y, colour, size=1):
        for dy in range(-(size // 2), size - size // 2):
            for dx in range(-(size // 2), size - size // 2):
                xx, yy = int(x) + dx, int(y) + dy
                if 0 <= xx < self.w and 0 <= yy < self.h:
                    i = (yy * self.w + xx) * 3
                    self.px[i:i + 3] = bytes(colour)

    def line(self, x0, y0, x1, y1, colour, size=1, dash=0):
        steps = int(max(abs(x1 - x0), abs(y1 - y0))) or 1
        for s in range(steps + 1):
            if dash and (s // dash) % 2:
                continue
            self.dot(x0 + (x1 - x0) * s / steps, y0 + (y1 - y0) * s / steps, colour, size)

    def text(self, x, y, text, colour=(0, 0, 0), scale=2):
        for ch in text:
            glyph = DIGITS.get(ch)
            if glyph:
                for row, bits in enumerate(glyph):
                    for col, bit in enumerate(bits):
                        if bit == "1":
                            for a in range(scale):
                                for b in range(scale):
                                    self.dot(x + col * scale + a, y + row * scale + b, colour)
            x += 4 * scale

    def save(self, path):
        raw = b"".join(b"\x00" + bytes(self.px[y * self.w * 3:(y + 1) * self.w * 3]) for y in range(self.h))
        chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        with open(path, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0))
                    + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def plot_plain(summary, path, main_set):
    lines, refs = series(summary, main_set)
    rgb = lambda h: tuple(int(h[i:i + 2], 16) for i in (1, 3, 5))
    canvas = Canvas(800, 500)
    left, right, top, bottom = 70, 780, 20, 460
    threads = sorted({p[0] for _, _, pts in lines for p in pts}) or [1]
    ymax = max([p[1] for _, _, pts in lines for p in pts] + [v for _, _, v in refs] + [0.1]) * 1.1
    X = lambda t: left + (right - left) * (t - threads[0]) / max(1, threads[-1] - threads[0])
    Y = lambda v: bottom - (bottom - top) * v / ymax
    step = 0.25 if ymax < 2 else 0.5 if ymax < 4 else 1.0
    v = 0.0
    while v <= ymax:
        canvas.line(left, Y(v), right, Y(v), (225, 225, 225))
        canvas.text(8, Y(v) - 5, f"{v:.2f}")
        v += step
    for t in threads:
        canvas.line(X(t), top, X(t), bottom, (235, 235, 235))
        canvas.text(X(t) - 3, bottom + 10, str(t))
    canvas.line(left, bottom, right, bottom, (0, 0, 0), 2)
    canvas.line(left, top, left, bottom, (0, 0, 0), 2)
    for label, colour, value in refs:
        canvas.line(left, Y(value), right, Y(value), rgb(colour), 2, dash=8)
    for label, colour, points in lines:
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            canvas.line(X(x0), Y(y0), X(x1), Y(y1), rgb(colour), 3)
        for x, y in points:
            canvas.dot(X(x), Y(y), rgb(colour), 8)
    canvas.save(path)
    print("(PNG drawn without matplotlib; x = threads, y = GB/s; colours: "
          + ", ".join(f"{c} {l}" for l, c, _ in lines + refs) + ")", file=sys.stderr)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("raw")
    parser.add_argument("--csv")
    parser.add_argument("--png")
    parser.add_argument("--set", default="all")
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--title")
    parser.add_argument("--plain", action="store_true", help="draw without matplotlib even when it is installed")
    args = parser.parse_args()
    rows = load(args.raw)
    summary = summarize(rows)
    title = args.title or f"stasis chunk store on real CRIU images, {args.cores} cores: throughput vs threads (lz4)"
    print(tables(rows, summary, args.set, args.cores))
    if args.csv:
        write_csv(summary, args.csv)
    if args.png:
        try:
            if args.plain:
                raise ImportError
            plot_matplotlib(summary, args.png, title, args.set, args.cores)
        except ImportError:
            plot_plain(summary, args.png, args.set)


if __name__ == "__main__":
    main()

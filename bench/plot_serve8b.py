#!/usr/bin/env python3
"""Plots where the time of the 8B server's cold start and of each restore goes (scripts/device-test.sh serve8b
and serve8bhost, their $OUT/serve8b.txt and $OUT/serve8bhost.txt): one stacked bar each, from the command's
start to the first answer (a prepared restore's from its activation). Given several reports, their bars are
stacked in one figure, each report's under its own label (the split before and after a change).

    bench/plot_serve8b.py [LABEL=]REPORT.txt... OUTPUT.png
"""
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SECONDS = r"([0-9.]+) (ms|s)\b"


def seconds(text, label):
    """The duration after `label` in text ("CRIU 3.01 s", "driver 488 ms"), in seconds; 0 when absent."""
    found = re.search(re.escape(label) + r" " + SECONDS, text)
    if not found:
        return 0.0
    return float(found.group(1)) / (1000 if found.group(2) == "ms" else 1)


def restore_parts(line, answer):
    """A restore's line ("... time: verify 51 ms, images streamed, CRIU 3.25 s (...), devices ... total 4.54 s")
    split into its phases, the rest of its total, and the first answer after it."""
    parts = [("check", seconds(line, "verify")), ("rebuild", seconds(line, "rebuild")), ("CRIU", seconds(line, "CRIU")),
             ("driver", seconds(line, "driver")), ("GPU check", seconds(line, "gpu check")), ("refill", seconds(line, "refill"))]
    total = seconds(line, "total")
    parts.append(("other", max(0.0, total - sum(p[1] for p in parts))))
    parts.append(("first answer", answer - total))
    return parts


def bars(path, prefix=""):
    rows = []
    lines = open(path).read().splitlines()
    for index, line in enumerate(lines):
        way = re.match(r"(streamed|rebuilt) \(round (\d+)\): ([0-9.]+) s to first answer", line)
        activation = re.match(r"\s+activation to first answer: ([0-9.]+) s; activated .* in " + SECONDS, line)
        if way:
            rows.append((f"{prefix}agent restore, {way.group(1)} (round {way.group(2)})", restore_parts(line, float(way.group(3)))))
            continue
        if activation:
            answer = float(activation.group(1))
            act = float(activation.group(2)) / (1000 if activation.group(3) == "ms" else 1)
            rounds = re.search(r"round (\d+)", lines[index - 1]) if index else None
            rows.append((f"{prefix}prepared, from activation (round {rounds.group(1) if rounds else '?'})",
                         [("activation", act), ("first answer", answer - act)]))
            continue
        if line.startswith("cold start"):
            answer = float(re.search(r": ([0-9.]+) s\b", line).group(1))
            loaded, warm = seconds(line, "loaded in"), seconds(line, "warm in")
            rows.append((prefix + "cold start", [("torch, CUDA, weights onto the GPU", loaded), ("warm-up", warm - loaded),
                                        ("first answer", answer - warm)]))
        elif " restore, page cache " in line:
            name = line.split(":")[0]
            answer = float(re.search(r": ([0-9.]+) s to first answer", line).group(1))
            rows.append((prefix + name, restore_parts(line, answer)))
        elif line.startswith("CRIU 4.2 + its cuda plugin"):
            answer = float(re.search(r"restore to first answer \(page cache warm\) ([0-9.]+) s", line).group(1))
            rows.append((prefix + "CRIU + its cuda plugin, page cache warm", [("CRIU restore with its plugin, then first answer", answer)]))
    return rows


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    rows = []
    for argument in sys.argv[1:-1]:
        label, _, path = argument.rpartition("=")
        rows += bars(path, f"{label}: " if label else "")
    colors = {"torch, CUDA, weights onto the GPU": "#9e9e9e", "warm-up": "#bdbdbd", "check": "#8c564b", "CRIU": "#1f77b4",
              "driver": "#ff7f0e", "GPU check": "#d62728", "refill": "#2ca02c", "other": "#c7c7c7", "first answer": "#9467bd",
              "CRIU restore with its plugin, then first answer": "#17becf",
              "rebuild": "#aec7e8", "activation": "#e377c2"}
    figure, axes = plt.subplots(figsize=(12, 0.7 * len(rows) + 1.5))
    shown = set()
    longest = max(sum(width for _, width in parts) for _, parts in rows)
    for index, (name, parts) in enumerate(reversed(rows)):
        left = 0.0
        for label, width in parts:
            axes.barh(index, width, left=left, color=colors[label], label=None if label in shown else label)
            shown.add(label)
            left += width
        axes.text(left + 0.1, index, f"{left:.2f} s", va="center")
    axes.set_yticks(range(len(rows)), [name for name, _ in reversed(rows)])
    axes.set_xlabel("seconds from the command's start (a prepared restore's activation) to the first answer")
    axes.set_title("8B Llama-architecture server: cold start and restores from a disk store")
    axes.set_xlim(0, longest * 1.12)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    figure.tight_layout()
    figure.savefig(sys.argv[-1], dpi=110)


if __name__ == "__main__":
    main()

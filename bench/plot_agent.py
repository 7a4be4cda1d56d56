#!/usr/bin/env python3
"""Plots the agent benchmark's first table (bench/agent-dump-restore.sh speed): checkpoint and restore time of
each workload by path, baseline / stasis through the driver / stasis with the agent hashing on the CPUs (when
the run has it) / stasis with the agent hashing on the GPU.

    bench/plot_agent.py RESULTS.txt OUTPUT.png
"""
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PATHS = ["baseline (driver + CRIU)", "stasis, driver path", "stasis with the agent, hashing on the CPUs", "stasis with the agent"]
REQUIRED = [PATHS[0], PATHS[1], PATHS[3]]
LABELS = {PATHS[2]: "agent, hashing on the CPUs", PATHS[3]: "agent, hashing on the GPU"}


def rows(path):
    table = {}
    for line in open(path):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 6 or cells[1] not in PATHS:
            continue
        table.setdefault(cells[0], {})[cells[1]] = (float(cells[2]), float(cells[4]))
    return {name: paths for name, paths in table.items() if all(p in paths for p in REQUIRED)}


def main():
    source, output = sys.argv[1], sys.argv[2]
    table = rows(source)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    paths = [p for p in PATHS if any(p in row for row in table.values())]
    width = 0.8 / len(paths)
    colors = {PATHS[0]: "#999999", PATHS[1]: "#6a8fbf", PATHS[2]: "#e8b27a", PATHS[3]: "#d9822b"}
    for side, (axis, title) in enumerate(zip(axes, ["checkpoint", "restore"])):
        names = list(table)
        for index, path in enumerate(paths):
            present = [i for i, name in enumerate(names) if path in table[name]]
            values = [table[names[i]][path][side] for i in present]
            offset = (index - (len(paths) - 1) / 2) * width
            bars = axis.bar([i + offset for i in present], values, width, label=LABELS.get(path, path), color=colors[path])
            axis.bar_label(bars, fmt="%.1f", fontsize=7)
        axis.set_xticks(range(len(names)), names)
        axis.set_ylabel("seconds")
        axis.set_title(f"{title} (images on /dev/shm)")
        axis.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle("stasis on an H200: the agent against the driver path and the baseline (2026-11-29)", fontsize=10)
    figure.tight_layout()
    figure.savefig(output, dpi=110)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Where a CRIU dump or restore spent its time, read from its own log at level 4 (every line starts with
"(seconds.micros)" since CRIU started). Used by bench/criu-breakdown.sh (CPU) and by the GPU suite's host
section (scripts/device/sections/host.sh), which splits the restores of real GPU jobs the same way.

    bench/criu_log.py restore LOG     the restore's phases, what it restored, and its longest silences
    bench/criu_log.py dump LOG        the dump's phases, likewise

The phases are cut at lines CRIU 4.x writes in every run (named in each function below); the longest
silences (the gaps between consecutive lines, with the line that ended each) show what the phases hide.
"""
import re
import sys

STAMP = re.compile(r"^\((\d+\.\d+)\)")


def read(path):
    """(seconds, line) for every stamped line of the log."""
    lines = []
    for line in open(path, errors="replace"):
        m = STAMP.match(line)
        if m:
            lines.append((float(m.group(1)), line.rstrip("\n")))
    return lines


def first(lines, pattern):
    r = re.compile(pattern)
    return next(t for t, l in lines if r.search(l))


def last(lines, pattern):
    r = re.compile(pattern)
    return [t for t, l in lines if r.search(l)][-1]


def restore_phases(lines):
    """Seconds of each phase of a restore: CRIU's start-up until the first fork; forking, files and VMAs
    premapped until the first page read; the memory restore (pages read by the restoring tasks from the
    stream, "prN-M Read", or by the restorer with preadv from files); the restorer (VMAs remapped, threads)
    until the last task says Restored; then resuming. Pages read in several tasks overlap: "pages" spans
    from the first page read to the last task's "nr_restored_pages"."""
    text = "\n".join(l for _, l in lines)
    fork = first(lines, r"Forking task with")
    counted = last(lines, r"nr_restored_pages")
    restored, end = last(lines, r"pie: \d+: \d+: Restored"), lines[-1][0]
    try:
        pages_start = first(lines, r"pr\d+-\d+ Read ")
    except StopIteration:
        pages_start = counted
    starts = [t for t, l in lines if re.search(r"pie: \d+: Preadv", l)]
    ends = [t for t, l in lines if re.search(r"pie: \d+: +`- returned", l)]
    inside = sum(e - s for s, e in zip(starts, ends))
    pages = sum(int(x) for x in re.findall(r"nr_restored_pages:\s+(\d+)", text))
    return {
        "startup": fork,
        "prepare": pages_start - fork,
        "pages": counted - pages_start + inside,
        "restorer": restored - counted - inside,
        "finish": end - restored,
        "total": end,
        "tasks": len(set(re.findall(r"Forking task with (\d+) pid", text))),
        "threads": sum(int(x) for x in re.findall(r"(\d+) threads require", text)),
        "vmas": sum(int(x) for x in re.findall(r"Found (\d+) VMAs in image", text)),
        "restored_mib": pages * 4096 / 2**20,
    }


def dump_phases(lines):
    """Seconds of each phase of a dump: start-up until the first task is seized; seizing and the parasite
    until the first page; pages drained and written; the other images; the post-dump hook (stasis publishes
    there with the tree frozen); unfreezing."""
    seize, pages0 = first(lines, r"Seized task"), first(lines, r"Dumping pages")
    pages1, post = last(lines, r"page-xfer:|Pagemap generated"), first(lines, r"Running post-dump scripts")
    unfreeze, end = first(lines, r"Unfreezing tasks"), lines[-1][0]
    return {"startup": seize, "seize": pages0 - seize, "pages": pages1 - pages0, "images": post - pages1,
            "postdump": unfreeze - post, "unfreeze": end - unfreeze, "total": end}


def silences(lines, count=8):
    """The `count` longest gaps between consecutive lines: (seconds, at, the line that ended the gap)."""
    gaps = [(b[0] - a[0], a[0], b[1]) for a, b in zip(lines, lines[1:])]
    return sorted(gaps, reverse=True)[:count]


def main(argv):
    if len(argv) != 3 or argv[1] not in ("restore", "dump"):
        sys.exit(__doc__)
    lines = read(argv[2])
    if not lines:
        sys.exit(f"{argv[2]}: no stamped lines (was CRIU's log level 4?)")
    phases = (restore_phases if argv[1] == "restore" else dump_phases)(lines)
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in phases.items() if v is not None))
    for gap, at, line in silences(lines):
        print(f"  silent {gap:.3f} s from {at:.3f} s, until: {line[:160]}")


if __name__ == "__main__":
    main(sys.argv)

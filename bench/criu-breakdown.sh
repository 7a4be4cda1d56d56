#!/usr/bin/env bash
# Where CRIU's time goes (issue 28, step 1): one process holding 1 GiB of random memory (by default) is
# checkpointed and restored by plain `criu dump` / `criu restore -d` (files) and by `stasis dump` /
# `stasis restore` (CRIU fed through `--stream` by stasis's image server), alternating, ROUNDS times each
# after one uncounted plain-CRIU warm-up round. Every run splits its time three ways, without changing stasis:
#   - CRIU's own log at level 4 (its timestamps mark where each phase starts and ends),
#   - CRIU's stats-dump / stats-restore (pages written and restored; decoded below, no crit needed),
#   - stasis's --json timings, and the CPU seconds of every thread of stasis, CRIU and the target process
#     (sampled from /proc every SAMPLE_MS ms while the command runs: who was busy, who waited).
# Prints two Markdown tables (dump, restore): the median of the rounds with [min-max].
#
#   bench/criu-breakdown.sh [MIB]     (default 1024; needs root, CRIU and a release build: swift build -c release)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/local/sbin:$PATH"
MIB=${1:-1024}
ROUNDS=${ROUNDS:-5}
FILL=${FILL:-random}
SAMPLE_MS=${SAMPLE_MS:-10}
BENCH_DIR=${BENCH_DIR:-/var/tmp}
BIN=${BIN:-$(swift build -c release --show-bin-path)}
[[ -x $BIN/stasis ]] || { echo "build first: swift build -c release" >&2; exit 1; }
work=$(mktemp -d "$BENCH_DIR/stasis-breakdown.XXXXXX")
runs="$work/runs"; mkdir -p "$runs"
pid=""
# KEEP=1 keeps every run's logs, stats and samples in $work/runs.
trap '[[ -n "$pid" ]] && kill -9 $pid 2>/dev/null; if [[ -n "${KEEP:-}" ]]; then rm -rf "$work/img" "$work/ckpt" "$work/store" "$work/restore-work"; echo "runs kept in $runs" >&2; else rm -rf "$work"; fi' EXIT

wait_gone() { for _ in $(seq 500); do [[ -e /proc/$1 ]] || return 0; sleep 0.01; done; echo "PID $1 did not go away" >&2; exit 1; }

# Runs a command and samples, until it exits, the CPU seconds of every thread of it, of its descendants and
# of the target PID; writes its wall-clock seconds to DIR/wall and the threads to DIR/cpu.json.
#   sample.py DIR TARGET_PID INTERVAL_MS COMMAND...
cat >"$work/sample.py" <<'PY'
import json, os, subprocess, sys, time
out, target, interval, command = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]) / 1000, sys.argv[4:]
tick = os.sysconf("SC_CLK_TCK")
seen = {}
def sample(pid):
    try: tids = os.listdir(f"/proc/{pid}/task")
    except OSError: return []
    kids = []
    for tid in tids:
        try:
            stat = open(f"/proc/{pid}/task/{tid}/stat").read()
            kids += open(f"/proc/{pid}/task/{tid}/children").read().split()
        except OSError: continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        cpu = (int(fields[11]) + int(fields[12])) / tick
        key = (pid, int(tid))
        old = seen.get(key)
        # A task keeps the name it had while it worked (CRIU's restoring task becomes the workload at the end).
        seen[key] = {"pid": pid, "tid": int(tid), "comm": old["comm"] if old and cpu == old["cpu"] else comm, "cpu": cpu}
    return [int(k) for k in kids]
started = time.monotonic()
child = subprocess.Popen(command)
while child.poll() is None:
    todo, done = [child.pid, target], set()
    while todo:
        p = todo.pop()
        if p not in done: done.add(p); todo += sample(p)
    time.sleep(interval)
wall = time.monotonic() - started
open(out + "/wall", "w").write(f"{wall}\n")
json.dump(list(seen.values()), open(out + "/cpu.json", "w"))
sys.exit(child.returncode)
PY
timed() { local dir=$1; shift; python3 "$work/sample.py" "$dir" "$pid" "$SAMPLE_MS" "$@"; }

criu_round() {
    local d="$runs/$1-criu"; mkdir -p "$d/dump" "$d/restore"
    rm -rf "$work/img"; mkdir "$work/img"
    timed "$d/dump" criu dump -t "$pid" -D "$work/img" -v4 -o dump.log 2>/dev/null || { echo "criu dump failed" >&2; tail "$work/img/dump.log" >&2; exit 1; }
    cp "$work/img/dump.log" "$work/img/stats-dump" "$d/dump/"
    wait_gone "$pid"
    timed "$d/restore" criu restore -D "$work/img" -d -v4 -o restore.log 2>/dev/null || { echo "criu restore failed" >&2; tail "$work/img/restore.log" >&2; exit 1; }
    cp "$work/img/restore.log" "$work/img/stats-restore" "$d/restore/"
    rm -rf "$work/img"
}

stasis_round() {
    local d="$runs/$1-stasis"; mkdir -p "$d/dump" "$d/restore"
    export STASIS_STORE="$work/store"   # fresh each round: every chunk is written, as on a job's first checkpoint
    rm -rf "$work/ckpt" "$STASIS_STORE"
    timed "$d/dump" "$BIN/stasis" dump "$pid" -D "$work/ckpt" --json >"$d/dump/report.json"
    cp "$work/ckpt/criu-dump.log" "$d/dump/dump.log"
    wait_gone "$pid"
    timed "$d/restore" "$BIN/stasis" restore -D "$work/ckpt" -W "$work/restore-work" --json >"$d/restore/report.json"
    cp "$work/restore-work/criu-restore.log" "$d/restore/restore.log"
    cp "$work/restore-work/stats-restore" "$d/restore/" 2>/dev/null || true
    rm -rf "$work/ckpt" "$work/restore-work" "$STASIS_STORE"
}

pid=$("$BIN/stasis-workload" memory --dir "$work" --daemon --mem "$MIB" --fill "$FILL")
criu_round warmup; rm -rf "$runs/warmup-criu"
for round in $(seq "$ROUNDS"); do criu_round "$round"; stasis_round "$round"; done
rm -f "$work/result"; kill -USR1 "$pid"
for _ in $(seq 600); do [[ -e $work/result ]] && break; sleep 0.1; done
verdict=$(cat "$work/result" 2>/dev/null || echo "FAIL no answer")
[[ $verdict == PASS* ]] || { echo "workload check failed after the last restore: $verdict" >&2; exit 1; }
kill -9 "$pid"; wait_gone "$pid"; pid=""

python3 - "$runs" "$MIB" <<'PY'
import json, os, re, statistics, sys
sys.path.insert(0, "bench")
import criu_log  # the phases, cut where CRIU's own log says (bench/criu_log.py)
runs, mib = sys.argv[1], int(sys.argv[2])
page = os.sysconf("SC_PAGE_SIZE")

def varints(buf):
    """(field, value) of a protobuf message: varints and nested messages (bytes)."""
    i, out = 0, []
    def varint():
        nonlocal i
        v, s = 0, 0
        while True:
            b = buf[i]; i += 1; v |= (b & 0x7f) << s; s += 7
            if not b & 0x80: return v
    while i < len(buf):
        key = varint(); field, kind = key >> 3, key & 7
        if kind == 0: out.append((field, varint()))
        elif kind == 2:
            n = varint(); out.append((field, buf[i:i + n])); i += n
        else: raise ValueError("unexpected wire type")
    return out

def stats(path, which):
    """CRIU's stats-dump / stats-restore: magics, a u32 length, one stats_entry {dump = 1, restore = 2}."""
    try: data = open(path, "rb").read()
    except OSError: return {}
    n = int.from_bytes(data[8:12], "little")
    names = {"dump": {1: "freezing", 2: "frozen", 3: "memdump", 4: "memwrite", 5: "pages_scanned", 7: "pages_written"},
             "restore": {1: "pages_compared", 3: "forking", 4: "restore", 5: "pages_restored"}}[which]
    for field, value in varints(data[12:12 + n]):
        if field == (1 if which == "dump" else 2):
            return {names[f]: v for f, v in varints(value) if f in names}
    return {}

def cpu(path, target):
    """CPU seconds by who spent them. stasis's threads are told apart as main thread and the others (on Linux
    they all show as "stasis"): in a dump the others are the chunking (ChunkIngester), in a restore the image
    server and its stream workers."""
    groups = {}
    for t in json.load(open(path)):
        if t["pid"] == target: g = "target"
        elif t["comm"].startswith("stasis"): g = "stasis_main" if t["tid"] == t["pid"] else "stasis_workers"
        else: g = "criu"
        groups[g] = groups.get(g, 0) + t["cpu"]
    return groups

def dump_run(d, tool):
    L = criu_log.read(d + "/dump.log")
    wall = float(open(d + "/wall").read())
    target = int(re.search(r"Dumping processes \(pid: (\d+)", "".join(l for _, l in L)).group(1))
    r = criu_log.dump_phases(L)
    r["total"] = wall
    end = L[-1][0]
    if tool == "stasis":
        t = json.load(open(d + "/report.json"))["timings"]
        r["chunktail"], r["sync"] = t["hash"], t["sync"]
        r["publish"] = r["postdump"] - t["hash"] - t["sync"]
        st = {"freezing": t["freeze"] * 1e6, "memdump": t["memoryDump"] * 1e6, "memwrite": t["memoryWrite"] * 1e6,
              "pages_written": json.load(open(d + "/report.json"))["memory"]["dumpedBytes"] // page}
    else:
        st = stats(d + "/stats-dump", "dump")
    r["outside"] = wall - end
    r["freezing"], r["memdump"], r["memwrite"] = st["freezing"] / 1e6, st["memdump"] / 1e6, st["memwrite"] / 1e6
    r["gbps"] = st["pages_written"] * page / r["pages"] / 1e9
    r["written"] = st["pages_written"] * page / 2**20
    for g, v in cpu(d + "/cpu.json", target).items(): r["cpu_" + g] = v
    return r

def restore_run(d, tool):
    L = criu_log.read(d + "/restore.log")
    wall = float(open(d + "/wall").read())
    target = int(re.search(r"Forking task with (\d+) pid", "".join(l for _, l in L)).group(1))
    r = criu_log.restore_phases(L)
    r["total"] = wall
    end = L[-1][0]
    st = stats(d + "/stats-restore", "restore")
    pages = st.get("pages_restored") or int(re.search(r"nr_restored_pages:\s+(\d+)", "".join(l for _, l in L)).group(1))
    r["gbps"] = pages * page / r["pages"] / 1e9
    r["restored"] = pages * page / 2**20
    if tool == "stasis":
        t = json.load(open(d + "/report.json"))["timings"]
        r["verify"] = t["verify"] + t["rebuild"]
        r["outside"] = t["criu"] - end
        r["stasis_rest"] = wall - t["criu"] - r["verify"]
    else:
        r["outside"] = wall - end
    for g, v in cpu(d + "/cpu.json", target).items(): r["cpu_" + g] = v
    return r

def collect(kind, fn):
    out = {}
    for tool in ("criu", "stasis"):
        rounds = sorted(x for x in os.listdir(runs) if x.endswith("-" + tool))
        out[tool] = [fn(f"{runs}/{x}/{kind}", tool) for x in rounds]
    return out

def cell(rows, key, unit=" s", digits=2):
    vals = [r[key] for r in rows if key in r]
    if not vals: return "-"
    med = statistics.median(vals)
    return f"{med:.{digits}f}{unit} [{min(vals):.{digits}f}-{max(vals):.{digits}f}]"

def table(title, data, rows):
    print(f"### {title} ({mib} MiB, median [min-max] of {len(data['criu'])} rounds)\n")
    print("| phase | plain CRIU | stasis | stasis - CRIU |")
    print("| --- | --- | --- | --- |")
    for label, key, unit, digits in rows:
        a, b = cell(data["criu"], key, unit, digits), cell(data["stasis"], key, unit, digits)
        va = [r[key] for r in data["criu"] if key in r]; vb = [r[key] for r in data["stasis"] if key in r]
        diff = f"{statistics.median(vb) - (statistics.median(va) if va else 0):+.{digits}f}" if vb and unit == " s" else ""
        print(f"| {label} | {a} | {b} | {diff} |")
    print()

dump = collect("dump", dump_run)
table("Dump", dump, [
    ("**total, wall clock**", "total", " s", 3),
    ("CRIU start-up: kernel probes, RPC, until the seize", "startup", " s", 3),
    ("seize and freeze, parasite, tree (until the first page)", "seize", " s", 3),
    ("  of which freezing (stats-dump)", "freezing", " s", 3),
    ("**memory dump: pages drained and written** (log)", "pages", " s", 3),
    ("  pages written, GB/s", "gbps", "", 2),
    ("  memdump time (stats-dump)", "memdump", " s", 3),
    ("  memwrite time (stats-dump)", "memwrite", " s", 3),
    ("other images: files, mm, pstree, inventory", "images", " s", 3),
    ("**post-dump hook (stasis publishes here, tree frozen)**", "postdump", " s", 3),
    ("  chunking tail: read back, hash, compress (timings.hash)", "chunktail", " s", 3),
    ("  fsync of images and chunks (timings.sync)", "sync", " s", 3),
    ("  the rest of publish: manifest, catalog, rename", "publish", " s", 3),
    ("unfreeze (kill) and stats", "unfreeze", " s", 3),
    ("outside CRIU's log: start, exec, manifest rewrite, exit", "outside", " s", 3),
    ("CPU: CRIU", "cpu_criu", " s", 2),
    ("CPU: target process (parasite)", "cpu_target", " s", 2),
    ("CPU: stasis's other threads (chunking: read back, hash, lz4, write)", "cpu_stasis_workers", " s", 2),
    ("CPU: stasis's main thread", "cpu_stasis_main", " s", 2),
    ("MiB written by CRIU", "written", "", 0),
])
restore = collect("restore", restore_run)
table("Restore", restore, [
    ("**total, wall clock** (until the tree runs)", "total", " s", 3),
    ("stasis: verify the whole files, chunks present", "verify", " s", 3),
    ("CRIU start-up: kernel probes, images read, until the fork", "startup", " s", 3),
    ("fork, shared resources, files, VMAs premapped", "prepare", " s", 3),
    ("**memory restore: pages read** (log)", "pages", " s", 3),
    ("  pages restored, GB/s", "gbps", "", 2),
    ("restorer: VMAs remapped, threads, creds (until 'Restored')", "restorer", " s", 3),
    ("resume, post-restore", "finish", " s", 3),
    ("outside CRIU's log: exec, RPC, image server set-up and end", "outside", " s", 3),
    ("stasis, the rest: manifest, store lock, report", "stasis_rest", " s", 3),
    ("CPU: CRIU (main process)", "cpu_criu", " s", 2),
    ("CPU: restoring task (reads the pages)", "cpu_target", " s", 2),
    ("CPU: stasis's other threads (image server: read, decode, check, write the pipe)", "cpu_stasis_workers", " s", 2),
    ("CPU: stasis's main thread", "cpu_stasis_main", " s", 2),
    ("MiB restored", "restored", "", 0),
])
print("Per round, wall clock (s): criu dump / stasis dump (ratio); criu restore / stasis restore (ratio)\n")
for i, (cd, sd, cr, sr) in enumerate(zip(dump["criu"], dump["stasis"], restore["criu"], restore["stasis"]), 1):
    print(f"- round {i}: {cd['total']:.3f} / {sd['total']:.3f} ({sd['total'] / cd['total']:.2f}x); "
          f"{cr['total']:.3f} / {sr['total']:.3f} ({sr['total'] / cr['total']:.2f}x)")
med = lambda rows: statistics.median(r["total"] for r in rows)
print(f"- medians: dump {med(dump['stasis']) / med(dump['criu']):.2f}x, restore {med(restore['stasis']) / med(restore['criu']):.2f}x")
PY
echo
echo "date: $(date -u +%Y-%m-%dT%H:%MZ); host: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; kernel $(uname -r); $(criu --version | head -n1); $MIB MiB $FILL; images in $BENCH_DIR ($(df --output=source "$BENCH_DIR" | tail -n1)); rounds: $ROUNDS; CPU sampled every $SAMPLE_MS ms; workload check: $verdict"

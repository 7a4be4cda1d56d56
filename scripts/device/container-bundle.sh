#!/usr/bin/env bash
# Makes an OCI bundle for runc whose process sees the host's programs and libraries read-only, one data
# directory read-write, and, where the host has them, the NVIDIA device nodes: how the GPU tests put a CUDA
# workload in a container without building an image. CRIU, driven by runc, reads the container's CRIU
# configuration (the org.criu.config annotation): the plugin directory given, and no iptables network lock.
#   scripts/device/container-bundle.sh BUNDLE DATA_DIR PLUGIN_DIR -- PROGRAM [ARG...]
set -euo pipefail
bundle=$1 data=$2 plugins=$3
shift 3
[[ ${1:-} == -- ]] && shift
mkdir -p "$bundle/rootfs" "$data"
for dir in usr bin sbin lib lib64 etc opt proc sys dev tmp "${data#/}"; do mkdir -p "$bundle/rootfs/$dir"; done
printf 'libdir %s\nnetwork-lock skip\n' "$plugins" >"$bundle/criu.conf"
python3 - "$bundle" "$data" "$@" <<'PY'
import json, os, stat, sys
bundle, data, args = sys.argv[1], sys.argv[2], sys.argv[3:]
mounts = [
    {"destination": "/proc", "type": "proc", "source": "proc"},
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
    {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
    {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
    {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
    {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]},
]
hosts = ["/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc", "/opt"]
# runc tells CRIU that each bind mount of the config is external, so CRIU need not understand its file
# system; a submount that rbind carried along would be CRIU's to dump (the GPU machine's driver is a
# squashfs under /usr/local/nvidia, which CRIU cannot). So plain binds, and each submount bound on its own.
submounts = []
for line in open("/proc/self/mountinfo"):
    point = line.split()[4].replace("\\040", " ")
    if any(point.startswith(h + "/") for h in hosts) and os.path.isdir(point):
        submounts.append(point)
for host in hosts:
    if os.path.isdir(host) and not os.path.islink(host):
        mounts.append({"destination": host, "type": "bind", "source": host, "options": ["bind", "ro"]})
        for point in sorted(p for p in submounts if p.startswith(host + "/")):
            mounts.append({"destination": point, "type": "bind", "source": point, "options": ["bind", "ro"]})
    elif os.path.islink(host):
        # merged /usr: /bin -> usr/bin and the like, made the same links inside
        link = os.path.join(bundle, "rootfs", host.lstrip("/"))
        os.rmdir(link) if os.path.isdir(link) and not os.path.islink(link) else None
        if not os.path.lexists(link): os.symlink(os.readlink(host), link)
mounts.append({"destination": data, "type": "bind", "source": data, "options": ["rbind", "rw"]})
devices, allow = [], [{"allow": False, "access": "rwm"}]
for name in sorted(os.listdir("/dev")):
    path = "/dev/" + name
    if name.startswith("nvidia") and stat.S_ISCHR(os.stat(path).st_mode):
        st = os.stat(path)
        major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        devices.append({"path": path, "type": "c", "major": major, "minor": minor, "fileMode": 0o666, "uid": 0, "gid": 0})
        allow.append({"allow": True, "type": "c", "major": major, "minor": minor, "access": "rwm"})
for name, major, minor in [("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9), ("tty", 5, 0)]:
    allow.append({"allow": True, "type": "c", "major": major, "minor": minor, "access": "rwm"})
env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
       "LD_LIBRARY_PATH=" + os.environ.get("LD_LIBRARY_PATH", "")]
config = {
    "ociVersion": "1.0.2",
    "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": args, "env": env, "cwd": "/",
                "capabilities": {k: ["CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_AUDIT_WRITE", "CAP_SYS_PTRACE"] for k in ["bounding", "effective", "permitted"]},
                "noNewPrivileges": True},
    "root": {"path": "rootfs", "readonly": False},
    "hostname": "stasis-test",
    "mounts": mounts,
    "annotations": {"org.criu.config": os.path.join(bundle, "criu.conf")},
    "linux": {"namespaces": [{"type": t} for t in ["pid", "network", "ipc", "uts", "mount"]],
              "devices": devices, "resources": {"devices": allow},
              "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list"], "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"]},
}
json.dump(config, open(os.path.join(bundle, "config.json"), "w"), indent=1)
print(f"{bundle}: {len(devices)} NVIDIA device node(s), {len(mounts)} mounts")
PY

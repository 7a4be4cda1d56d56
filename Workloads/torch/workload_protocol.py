"""The workload protocol shared by the PyTorch test workloads (the same as Workloads/cpu/main.c's): atomic
status files, and --daemon detaching before torch or CUDA is touched."""
import os
import sys
import time


def write_file(path, text):
    """Writes path atomically: readers see the whole text or nothing. The temporary name ends in neither .req nor
    .resp, so the inference server and its client never pick up a half-written file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)


def clear_signals(directory, names=("ready", "done")):
    """Removes the status files of an earlier run in directory, which would be taken for this run's. DIR/go is
    kept on purpose: a reference run may be started with it already there."""
    for name in names:
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            pass


def wait_for_go(directory):
    """Blocks until directory/go exists: where the tool checkpoints a paused workload."""
    while not os.path.exists(os.path.join(directory, "go")):
        time.sleep(0.05)


def daemonize(directory, signals, name, timeout_s):
    """Detaches (double fork, then setsid). The calling process waits up to timeout_s until one of the files
    `signals` exists in directory, prints the workload's PID and exits; only the detached workload returns."""
    sys.stdout.flush()
    sys.stderr.flush()
    report_r, report_w = os.pipe()
    first = os.fork()
    if first > 0:
        os.close(report_w)
        with os.fdopen(report_r) as report:
            pid_text = report.read()
        os.waitpid(first, 0)
        if not pid_text:
            sys.exit(f"{name}: the workload did not start")
        pid = int(pid_text)
        deadline = time.monotonic() + timeout_s
        while not any(os.path.exists(os.path.join(directory, signal)) for signal in signals):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                sys.exit(f"{name}: PID {pid} exited before it was ready; see {directory}/log")
            if time.monotonic() > deadline:
                sys.exit(f"{name}: PID {pid} never became ready; see {directory}/log")
            time.sleep(0.05)
        print(pid, flush=True)
        os._exit(0)
    os.close(report_r)
    if os.fork() > 0:
        os._exit(0)
    # The workload leads its own session, as CRIU wants of a tree's root (else it needs --shell-job).
    os.setsid()
    os.write(report_w, str(os.getpid()).encode())
    os.close(report_w)
    null = os.open(os.devnull, os.O_RDONLY)
    log = os.open(os.path.join(directory, "log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    # Keep nothing else of the caller's: an inherited pipe end would keep its reader waiting forever.
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    os.chdir("/")


def deterministic_torch():
    """Imports torch set up for bit-identical runs and returns it. Call it after daemonize: forking a process
    that has started CUDA or torch's threads is unsafe."""
    # cuBLAS reads this when it creates its handle; without it deterministic mode refuses cuBLAS matmuls.
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    # Models are built from a config, never downloaded, and the GPU machine has no network anyway.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    # TF32 would make results depend on the GPU generation; full float32 keeps runs comparable.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch

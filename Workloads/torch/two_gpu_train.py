#!/usr/bin/env python3
"""Deterministic training of a model split across two GPUs, to be checkpointed mid-run and restored.

    two_gpu_train.py --dir DIR [--daemon] [--steps N] [--pause-at K] [--devices cuda:0,cuda:1] [--width W]

The first half of an MLP lives on the first device and the second half on the other; every step copies the
activations forward and the gradients back between the GPUs (peer to peer where the GPUs allow it), and keeps
a running checksum tensor on each device. Each step appends "STEP<TAB>LOSS<TAB>SUM0<TAB>SUM1" (float.hex) to
DIR/losses.txt, so a run restored onto swapped GPUs (stasis restore --gpu-map) must still match a reference
run byte for byte. The pause/go/ready/done protocol and --daemon are bert_train.py's.
"""
import argparse
import os

from workload_protocol import clear_signals, daemonize, deterministic_torch, wait_for_go, write_file

READY_TIMEOUT_S = 300


def parse_args():
    parser = argparse.ArgumentParser(description="Deterministic two-GPU training for checkpoint tests.")
    parser.add_argument("--dir", required=True)
    parser.add_argument("--daemon", action="store_true")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--pause-at", type=int)
    parser.add_argument("--devices", default="cuda:0,cuda:1", help="the two devices, comma-separated")
    parser.add_argument("--width", type=int, default=4096, help="hidden width of the MLP")
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    args.devices = args.devices.split(",")
    if len(args.devices) != 2:
        parser.error("--devices takes exactly two devices")
    if args.pause_at is not None and not 0 <= args.pause_at <= args.steps:
        parser.error("--pause-at must be between 0 and --steps")
    args.dir = os.path.realpath(args.dir)
    return args


def main():
    args = parse_args()
    clear_signals(args.dir)
    if args.daemon:
        daemonize(args.dir, ("ready", "done"), "two_gpu_train", READY_TIMEOUT_S)

    torch = deterministic_torch()
    first, second = (torch.device(d) for d in args.devices)
    torch.manual_seed(0)
    width = args.width
    front = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, width), torch.nn.ReLU()).to(first)
    back = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, 1)).to(second)
    optimizer = torch.optim.SGD(list(front.parameters()) + list(back.parameters()), lr=1e-3)
    data = torch.Generator().manual_seed(1234)
    # Device-resident state that is not a parameter: it must come back on the right GPU.
    sums = [torch.zeros((), dtype=torch.float64, device=first), torch.zeros((), dtype=torch.float64, device=second)]

    losses = os.open(os.path.join(args.dir, "losses.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    print(f"two_gpu_train: {args.devices[0]} and {args.devices[1]}, width {width}, pid {os.getpid()}", flush=True)

    def pause():
        for device in (first, second):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        write_file(os.path.join(args.dir, "ready"), f"{os.getpid()}\n")
        print(f"two_gpu_train: paused after step {args.pause_at}", flush=True)
        wait_for_go(args.dir)
        print("two_gpu_train: resumed", flush=True)

    if args.pause_at == 0:
        pause()
    for step in range(1, args.steps + 1):
        inputs = torch.randn(args.batch, width, generator=data).to(first)
        target = torch.randn(args.batch, 1, generator=data).to(second)
        hidden = front(inputs)
        # Across the GPUs: peer to peer where the two can reach each other.
        output = back(hidden.to(second))
        loss = torch.nn.functional.mse_loss(output, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sums[0] += hidden.detach().double().sum()
        sums[1] += output.detach().double().sum() + sums[0].to(second)
        line = f"{step}\t{loss.item().hex()}\t{sums[0].item().hex()}\t{sums[1].item().hex()}\n"
        os.write(losses, line.encode())
        os.fsync(losses)
        print(f"two_gpu_train: step {step} loss {loss.item():.6f}", flush=True)
        if step == args.pause_at:
            pause()
    os.close(losses)
    write_file(os.path.join(args.dir, "done"), f"{args.steps}\n")
    print("two_gpu_train: done", flush=True)


if __name__ == "__main__":
    main()

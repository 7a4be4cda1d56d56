#!/usr/bin/env python3
"""torch.multiprocessing with CUDA tensors passed between processes, to be checkpointed mid-run and restored.

    mp_share_train.py --dir DIR [--daemon] [--steps N] [--pause-at K] [--batch B] [--features F]

A producer process (spawned, as torch.multiprocessing requires for CUDA) makes each batch on the GPU from a
seeded generator and puts it on a torch.multiprocessing queue: PyTorch passes a CUDA tensor as a CUDA IPC
handle of its memory (cudaIpcGetMemHandle) with an IPC event, and the consumer opens both
(cudaIpcOpenMemHandle). The consumer (the main process) trains a small MLP on the batches with deterministic
kernels and appends "STEP<TAB>LOSS" (LOSS as float.hex) to DIR/losses.txt, so that two runs compare byte for
byte.

With --pause-at K it writes DIR/ready after step K and waits for DIR/go, with batches still on the queue (their
memory the producer's, opened by the consumer only after the restore): that is where the tool checkpoints it.
After the last step it writes DIR/done. --daemon detaches before torch is imported, as bert_train.py does.
"""
import argparse
import os

from workload_protocol import clear_signals, daemonize, deterministic_torch, wait_for_go, write_file

MODEL_SEED = 0
DATA_SEED = 4321
LEARNING_RATE = 0.05
READY_TIMEOUT_S = 600


def produce(queue, finished, steps, batch, features):
    """The producer: every batch made on the GPU and put on the queue; then it waits for the consumer, keeping
    alive what it shared (PyTorch's rule for CUDA tensors passed between processes)."""
    torch = deterministic_torch()
    torch.cuda.set_device(0)
    generator = torch.Generator(device="cuda")
    generator.manual_seed(DATA_SEED)
    for step in range(1, steps + 1):
        inputs = torch.randn(batch, features, device="cuda", generator=generator)
        targets = (inputs[:, : features // 2].sum(dim=1, keepdim=True) > 0).float()
        torch.cuda.current_stream().synchronize()
        queue.put((step, inputs, targets))
    finished.wait()


def main():
    parser = argparse.ArgumentParser(description="torch.multiprocessing CUDA tensors between a producer and a trainer.")
    parser.add_argument("--dir", required=True, help="directory for ready, go, done, losses.txt and log")
    parser.add_argument("--daemon", action="store_true", help="detach; print the PID once ready (or done)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--pause-at", type=int, help="after this step write DIR/ready and wait for DIR/go")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--features", type=int, default=1024)
    args = parser.parse_args()
    args.dir = os.path.abspath(args.dir)
    os.makedirs(args.dir, exist_ok=True)
    clear_signals(args.dir)
    if args.daemon:
        daemonize(args.dir, ("ready", "done"), "mp_share_train", READY_TIMEOUT_S)

    torch = deterministic_torch()
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    queue = context.Queue(maxsize=3)
    finished = context.Event()
    producer = context.Process(target=produce, args=(queue, finished, args.steps, args.batch, args.features), daemon=True)
    producer.start()

    torch.manual_seed(MODEL_SEED)
    device = torch.device("cuda", 0)
    model = torch.nn.Sequential(torch.nn.Linear(args.features, 512), torch.nn.ReLU(), torch.nn.Linear(512, 1)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=0.9)
    loss_function = torch.nn.BCEWithLogitsLoss()
    losses = os.open(os.path.join(args.dir, "losses.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    print(f"mp_share_train: consumer {os.getpid()}, producer {producer.pid}", flush=True)

    for step in range(1, args.steps + 1):
        index, inputs, targets = queue.get()
        if index != step:
            raise SystemExit(f"mp_share_train: batch {index} came for step {step}")
        loss = loss_function(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = loss.item()
        del inputs, targets
        os.write(losses, f"{step}\t{value.hex()}\n".encode())
        os.fsync(losses)
        if step == args.pause_at:
            torch.cuda.synchronize()
            write_file(os.path.join(args.dir, "ready"), f"{os.getpid()}\n")
            print(f"mp_share_train: paused after step {step}, waiting for {args.dir}/go", flush=True)
            wait_for_go(args.dir)
            print("mp_share_train: resumed", flush=True)
    finished.set()
    producer.join()
    os.close(losses)
    write_file(os.path.join(args.dir, "done"), f"{args.steps}\n")
    print("mp_share_train: done", flush=True)


if __name__ == "__main__":
    main()

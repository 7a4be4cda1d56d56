#!/usr/bin/env python3
"""Deterministic BERT masked-LM training, to be checkpointed mid-run and restored.

    bert_train.py --dir DIR [--daemon] [--size base|large] [--layers N] [--steps N] [--pause-at K]
                  [--batch B] [--seq S]

Trains a randomly initialised BertForMaskedLM (fixed seed) on synthetic token batches from a seeded generator,
with deterministic kernels only, so two runs of the same command produce bit-identical losses. Each step appends
"STEP<TAB>LOSS" to DIR/losses.txt, LOSS being float.hex of the loss, so the file compares byte for byte.

With --pause-at K it writes DIR/ready (holding its PID) after step K and sleeps until DIR/go exists: that is where
the tool checkpoints it, idle on the GPU but holding the weights, the optimizer state and the RNG states. After the
last step it writes DIR/done. A reference run is the same command without --pause-at (or with DIR/go already
there); the test compares its losses.txt with that of the checkpointed and restored run.

With --daemon it detaches before touching torch or CUDA (double fork, setsid, stdio to DIR/log), and the command
prints the workload's PID and exits once DIR/ready or DIR/done exists.
"""
import argparse
import os
import time

from workload_protocol import clear_signals, daemonize, deterministic_torch, wait_for_go, write_file

SIZES = {
    # hidden size, layers, attention heads, intermediate size
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
}
VOCAB = 30522
MASK_TOKEN = 103  # [MASK] in the bert-base-uncased vocabulary
MASK_FRACTION = 0.15
MODEL_SEED = 0
DATA_SEED = 1234
LEARNING_RATE = 1e-4
READY_TIMEOUT_S = 600  # the daemon waits this long for step K: loading torch and training up to it


def parse_args():
    parser = argparse.ArgumentParser(description="Deterministic BERT masked-LM training for checkpoint tests.")
    parser.add_argument("--dir", required=True, help="directory for ready, go, done, losses.txt and log")
    parser.add_argument("--daemon", action="store_true", help="detach; print the PID once ready (or done)")
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--layers", type=int, help="override the number of layers of --size")
    parser.add_argument("--steps", type=int, default=20, help="total training steps")
    parser.add_argument("--pause-at", type=int, help="after this step write DIR/ready and wait for DIR/go")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128, help="sequence length (at most 512)")
    # Lets the script be smoke-tested on a machine without a GPU.
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.pause_at is not None and not 0 <= args.pause_at <= args.steps:
        parser.error("--pause-at must be between 0 and --steps")
    if not 1 <= args.seq <= 512:
        parser.error("--seq must be between 1 and 512 (BERT's position embeddings)")
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be at least 1")
    args.dir = os.path.realpath(args.dir)
    return args


def main():
    args = parse_args()
    clear_signals(args.dir)
    if args.daemon:
        # Before torch is imported: forking a process that has started CUDA or torch's threads is unsafe.
        daemonize(args.dir, ("ready", "done"), "bert_train", READY_TIMEOUT_S)

    torch = deterministic_torch()
    from transformers import BertConfig, BertForMaskedLM

    hidden, layers, heads, intermediate = SIZES[args.size]
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=args.layers or layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
    )
    # Seeds the CPU generator (the weights are initialised on the CPU) and the CUDA ones (dropout): after a
    # restore, dropout must draw the same masks as in the reference run.
    torch.manual_seed(MODEL_SEED)
    device = torch.device(args.device)
    model = BertForMaskedLM(config).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    # The data comes from its own CPU generator, so it does not depend on how many numbers the model drew.
    data = torch.Generator().manual_seed(DATA_SEED)

    def batch():
        tokens = torch.randint(0, VOCAB, (args.batch, args.seq), generator=data)
        masked = torch.rand(args.batch, args.seq, generator=data) < MASK_FRACTION
        labels = torch.where(masked, tokens, torch.full_like(tokens, -100))  # -100: no loss at this position
        inputs = torch.where(masked, torch.full_like(tokens, MASK_TOKEN), tokens)
        return inputs.to(device), labels.to(device)

    # Opened once and kept open, as a long-running trainer keeps its log: the restore must bring back the
    # descriptor and its offset. O_APPEND so every line lands at the end of the file.
    losses = os.open(os.path.join(args.dir, "losses.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    # Each step's wall time (the loss's .item() waits for the GPU), for the agent's overhead benchmark.
    timings = open(os.path.join(args.dir, "step-times.txt"), "w")
    print(f"bert_train: {args.size} with {config.num_hidden_layers} layers on {device}, pid {os.getpid()}", flush=True)

    def pause():
        # Nothing may be in flight on the GPU while the process waits to be checkpointed.
        if device.type == "cuda":
            torch.cuda.synchronize()
        write_file(os.path.join(args.dir, "ready"), f"{os.getpid()}\n")
        print(f"bert_train: paused after step {args.pause_at}, waiting for {args.dir}/go", flush=True)
        wait_for_go(args.dir)
        print("bert_train: resumed", flush=True)

    if args.pause_at == 0:
        pause()
    for step in range(1, args.steps + 1):
        started = time.perf_counter()
        inputs, labels = batch()
        loss = model(input_ids=inputs, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = loss.item()
        timings.write(f"{step}\t{time.perf_counter() - started:.6f}\n")
        timings.flush()
        os.write(losses, f"{step}\t{value.hex()}\n".encode())
        # On disk before the next step: the tool kills the process after checkpointing it, and the test reads
        # the file from a run that may have been killed at any moment.
        os.fsync(losses)
        print(f"bert_train: step {step} loss {value:.6f}", flush=True)
        if step == args.pause_at:
            pause()
    os.close(losses)
    timings.close()
    write_file(os.path.join(args.dir, "done"), f"{args.steps}\n")
    print("bert_train: done", flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Deterministic data-parallel BERT masked-LM training, a process per GPU (torch.distributed), to be
checkpointed mid-run as a whole tree and restored.

    ddp_bert_train.py --dir DIR [--daemon] [--gpus N] [--size base|large] [--layers N] [--steps N]
                      [--pause-at K] [--batch B] [--seq S]

The launcher (the tree's root: the PID to checkpoint) starts one worker per GPU and waits for them. Every
worker builds the same model (fixed seed) and trains on its own seeded batches; DistributedDataParallel
all-reduces the gradients over NCCL (gloo with --device cpu). Rank 0 appends "STEP<TAB>LOSS" (the ranks' mean
loss, float.hex) to DIR/losses.txt, so a restored run compares byte for byte with a reference run.

With --pause-at K every worker finishes step K, waits for its GPU and meets the others at a barrier, so no
collective is in flight; then rank 0 writes DIR/ready (holding the launcher's PID) and every worker waits
for DIR/go. After the last step rank 0 writes DIR/done. --daemon detaches the launcher before torch is
touched, as bert_train.py does. The ranks find each other through a file in DIR, not a TCP store; NCCL's own
bootstrap still keeps TCP connections between them, so checkpoint the tree with --tcp-established.
"""
import argparse
import os

from workload_protocol import clear_signals, daemonize, deterministic_torch, wait_for_go, write_file

SIZES = {"base": (768, 12, 12, 3072), "large": (1024, 24, 16, 4096)}
VOCAB = 30522
MASK_TOKEN = 103
MASK_FRACTION = 0.15
READY_TIMEOUT_S = 900


def parse_args():
    parser = argparse.ArgumentParser(description="Deterministic data-parallel BERT training for checkpoint tests.")
    parser.add_argument("--dir", required=True)
    parser.add_argument("--daemon", action="store_true")
    parser.add_argument("--gpus", type=int, default=2, help="workers, one per GPU")
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--pause-at", type=int)
    parser.add_argument("--batch", type=int, default=16, help="per worker")
    parser.add_argument("--seq", type=int, default=128)
    # Lets the script be smoke-tested without GPUs (gloo on the CPU).
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gpus < 1:
        parser.error("--gpus must be at least 1")
    if args.pause_at is not None and not 0 <= args.pause_at <= args.steps:
        parser.error("--pause-at must be between 0 and --steps")
    args.dir = os.path.realpath(args.dir)
    return args


def worker(rank, args, launcher):
    torch = deterministic_torch()
    import torch.distributed as dist
    from transformers import BertConfig, BertForMaskedLM

    cuda = args.device == "cuda"
    device = torch.device(f"cuda:{rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{args.dir}/rendezvous", rank=rank, world_size=args.gpus)
    hidden, layers, heads, intermediate = SIZES[args.size]
    config = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=args.layers or layers,
                        num_attention_heads=heads, intermediate_size=intermediate)
    torch.manual_seed(0)
    model = BertForMaskedLM(config).to(device)
    model.train()
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank] if cuda else None)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-4)
    data = torch.Generator().manual_seed(1234 + rank)

    def batch():
        tokens = torch.randint(0, VOCAB, (args.batch, args.seq), generator=data)
        masked = torch.rand(args.batch, args.seq, generator=data) < MASK_FRACTION
        labels = torch.where(masked, tokens, torch.full_like(tokens, -100))
        inputs = torch.where(masked, torch.full_like(tokens, MASK_TOKEN), tokens)
        return inputs.to(device), labels.to(device)

    losses = None
    if rank == 0:
        losses = os.open(os.path.join(args.dir, "losses.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    print(f"ddp_bert_train: rank {rank} of {args.gpus} on {device}, pid {os.getpid()}", flush=True)

    def pause():
        if cuda:
            torch.cuda.synchronize(device)
        dist.barrier()
        if cuda:
            torch.cuda.synchronize(device)
        if rank == 0:
            write_file(os.path.join(args.dir, "ready"), f"{launcher}\n")
        print(f"ddp_bert_train: rank {rank} paused after step {args.pause_at}", flush=True)
        wait_for_go(args.dir)
        print(f"ddp_bert_train: rank {rank} resumed", flush=True)

    if args.pause_at == 0:
        pause()
    for step in range(1, args.steps + 1):
        inputs, labels = batch()
        loss = ddp(input_ids=inputs, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        value = (mean / args.gpus).item()
        if rank == 0:
            os.write(losses, f"{step}\t{value.hex()}\n".encode())
            os.fsync(losses)
        print(f"ddp_bert_train: rank {rank} step {step} loss {value:.6f}", flush=True)
        if step == args.pause_at:
            pause()
    dist.barrier()
    if rank == 0:
        os.close(losses)
        write_file(os.path.join(args.dir, "done"), f"{args.steps}\n")
    dist.destroy_process_group()
    print(f"ddp_bert_train: rank {rank} done", flush=True)


def main():
    args = parse_args()
    clear_signals(args.dir, ("ready", "done", "rendezvous"))
    if args.daemon:
        daemonize(args.dir, ("ready", "done"), "ddp_bert_train", READY_TIMEOUT_S)
    import torch.multiprocessing as mp

    print(f"ddp_bert_train: launcher pid {os.getpid()}, {args.gpus} workers", flush=True)
    mp.spawn(worker, args=(args, os.getpid()), nprocs=args.gpus, join=True)


if __name__ == "__main__":
    main()

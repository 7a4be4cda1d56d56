#!/usr/bin/env python3
"""An inference server that holds a model on the GPU and answers requests passed as files.

    infer_server.py [serve] --dir DIR [--daemon]
    infer_server.py ask --dir DIR --name NAME --tokens "101 2023 102"

serve: builds a small BertModel (4 layers, hidden 256, random weights from a fixed seed, eval mode, float32) on the
GPU, runs a warm-up request, writes DIR/ready (holding its PID) and then polls DIR/requests/ for NAME.req files,
each a line of space-separated token ids. For each it writes DIR/responses/NAME.resp: the mean over the tokens of
the last hidden state, as float.hex values separated by spaces on one line (or a line "ERROR why"), then deletes
the request. Answers are computed with deterministic kernels, so the same tokens get byte-identical answers
before a checkpoint and after the restore.

ask: writes DIR/requests/NAME.req, waits up to 60 s for DIR/responses/NAME.resp and prints it; exits 1 if the
answer is an error or does not come.

With --daemon the server detaches before touching torch or CUDA (double fork, setsid, stdio to DIR/log), and the
command prints the server's PID and exits once DIR/ready exists.
"""
import argparse
import os
import re
import sys
import time

from workload_protocol import clear_signals, daemonize, deterministic_torch, write_file

VOCAB = 30522
MAX_TOKENS = 512  # BERT's position embeddings
MODEL_SEED = 0
WARM_UP_TOKENS = [101, 7592, 2088, 102]
POLL_S = 0.01
ASK_TIMEOUT_S = 60
READY_TIMEOUT_S = 300  # the daemon waits this long for torch, CUDA and the model to load
NAME = re.compile(r"[A-Za-z0-9_-]+")


def parse_tokens(text):
    """Returns the token ids in text, or raises ValueError saying what is wrong with them."""
    tokens = [int(word) for word in text.split()]
    if not 1 <= len(tokens) <= MAX_TOKENS:
        raise ValueError(f"need 1 to {MAX_TOKENS} tokens, got {len(tokens)}")
    bad = [t for t in tokens if not 0 <= t < VOCAB]
    if bad:
        raise ValueError(f"token {bad[0]} is outside 0..{VOCAB - 1}")
    return tokens


def serve(args):
    requests = os.path.join(args.dir, "requests")
    responses = os.path.join(args.dir, "responses")
    os.makedirs(requests, exist_ok=True)
    os.makedirs(responses, exist_ok=True)
    clear_signals(args.dir, ("ready",))  # an earlier run's would be taken for this one's
    if args.daemon:
        # Before torch is imported: forking a process that has started CUDA or torch's threads is unsafe.
        daemonize(args.dir, ("ready",), "infer_server", READY_TIMEOUT_S)

    torch = deterministic_torch()
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        max_position_embeddings=MAX_TOKENS,
    )
    torch.manual_seed(MODEL_SEED)
    device = torch.device(args.device)
    model = BertModel(config).to(device=device, dtype=torch.float32).eval()

    @torch.inference_mode()
    def answer(tokens):
        hidden = model(input_ids=torch.tensor([tokens], device=device)).last_hidden_state
        # Every token's final state goes into the answer, so any damaged weight or buffer shows.
        values = hidden.mean(dim=1)[0].tolist()
        return " ".join(float(v).hex() for v in values) + "\n"

    answer(WARM_UP_TOKENS)
    if device.type == "cuda":
        torch.cuda.synchronize()
    write_file(os.path.join(args.dir, "ready"), f"{os.getpid()}\n")
    print(f"infer_server: serving {args.dir} on {device}, pid {os.getpid()}", flush=True)

    while True:
        names = sorted(f[: -len(".req")] for f in os.listdir(requests) if f.endswith(".req"))
        for name in names:
            request = os.path.join(requests, f"{name}.req")
            with open(request) as f:
                text = f.read()
            started = time.perf_counter()
            try:
                response = answer(parse_tokens(text))
            except ValueError as error:
                response = f"ERROR {error}\n"
            write_file(os.path.join(responses, f"{name}.resp"), response)
            # Only once answered: a server stopped in between answers the request again after a restore.
            os.unlink(request)
            print(f"infer_server: answered {name} in {(time.perf_counter() - started) * 1000:.3f} ms", flush=True)
        time.sleep(POLL_S)


def ask(args):
    if not NAME.fullmatch(args.name):
        sys.exit("infer_server: --name must be letters, digits, '_' or '-'")
    try:
        parse_tokens(args.tokens)
    except ValueError as error:
        sys.exit(f"infer_server: --tokens: {error}")
    if not os.path.isdir(os.path.join(args.dir, "requests")):
        sys.exit(f"infer_server: no server has started in {args.dir}")
    response = os.path.join(args.dir, "responses", f"{args.name}.resp")
    try:
        os.unlink(response)  # an earlier answer under this name would be taken for this one
    except FileNotFoundError:
        pass
    write_file(os.path.join(args.dir, "requests", f"{args.name}.req"), args.tokens.strip() + "\n")
    deadline = time.monotonic() + ASK_TIMEOUT_S
    while not os.path.exists(response):
        if time.monotonic() > deadline:
            sys.exit(f"infer_server: no answer to {args.name} within {ASK_TIMEOUT_S} s")
        time.sleep(POLL_S)
    with open(response) as f:
        text = f.read()
    if text.startswith("ERROR"):
        sys.exit(f"infer_server: {text.strip()}")
    sys.stdout.write(text)


def main():
    parser = argparse.ArgumentParser(description="A GPU inference server answering requests passed as files.")
    parser.add_argument("mode", nargs="?", choices=("serve", "ask"), default="serve")
    parser.add_argument("--dir", required=True, help="directory holding ready, log, requests/ and responses/")
    parser.add_argument("--daemon", action="store_true", help="serve: detach; print the PID once ready")
    parser.add_argument("--name", help="ask: the request's name")
    parser.add_argument("--tokens", help='ask: token ids separated by spaces, e.g. "101 2023 102"')
    # Lets the server be smoke-tested on a machine without a GPU.
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dir = os.path.realpath(args.dir)
    if args.mode == "ask":
        if args.name is None or args.tokens is None or args.daemon:
            parser.error("ask needs --name and --tokens, and takes no --daemon")
        ask(args)
    else:
        if args.name is not None or args.tokens is not None:
            parser.error("--name and --tokens are for ask")
        serve(args)


if __name__ == "__main__":
    main()

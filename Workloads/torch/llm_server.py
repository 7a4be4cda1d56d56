#!/usr/bin/env python3
"""An LLM server of Llama-3-8B's sizes, for measuring cold starts against restores from a checkpoint.

    llm_server.py prepare --weights DIR [--layers N]
    llm_server.py serve --weights DIR --dir RUNDIR [--port P] [--daemon]
    llm_server.py ask [--port P] [--tokens "128000 9906 1917"] [--new N]

prepare: builds a LlamaForCausalLM with Llama-3-8B's configuration (32 layers, hidden 4096, MLP 14336, 32 heads,
8 key-value heads, vocabulary 128256, RoPE theta 500000), random weights from a fixed seed (transformers' own
initialisation, on the GPU), bfloat16, and saves them once as DIR/model.safetensors with DIR/config.json (8.03 B
parameters, 16.06 GB). --layers makes a smaller model of the same shape per layer (for a quick look).

serve: what a serving process does at its start: imports torch and transformers, makes the CUDA context, builds
the model without initialising it, loads the safetensors file straight onto the GPU, warms up (a greedy generate
with its KV cache), then answers on 127.0.0.1:PORT: POST /generate with {"tokens": [...], "new": N} returns
{"tokens": [...]} (N greedy tokens). Kernels are deterministic, so the same request gets the same tokens before a
checkpoint and after the restore. It writes RUNDIR/ready (its PID) once warm and logs to RUNDIR/log; with --daemon
it detaches first and the command prints its PID once it is ready.

ask: sends one request and prints the generated tokens on one line; exits 1 on an error or no answer in 120 s.
"""
import argparse
import json
import os
import sys
import time
import urllib.request

from workload_protocol import clear_signals, daemonize, write_file

SEED = 0
DEFAULT_PORT = 18080
WARM_UP = [128000, 791, 4062, 14198, 39935, 35308, 927, 279, 16053, 5679]
READY_TIMEOUT_S = 900


def setup_torch():
    """Imports torch for repeatable answers: deterministic kernels where torch has them (a warning, not an error,
    where generate uses one that has none), bfloat16 as the default dtype (the model is never made in float32)."""
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_default_dtype(torch.bfloat16)
    return torch


def llama3_8b(layers):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=128001,
        torch_dtype="bfloat16",
    )


def prepare(args):
    torch = setup_torch()
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    os.makedirs(args.weights, exist_ok=True)
    config = llama3_8b(args.layers)
    torch.manual_seed(SEED)
    started = time.perf_counter()
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in model.state_dict().items()}
    parameters = sum(t.numel() for t in state.values())
    save_file(state, os.path.join(args.weights, "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(args.weights)
    os.sync()
    print(f"llm_server: {parameters / 1e9:.2f} B parameters, "
          f"{os.path.getsize(os.path.join(args.weights, 'model.safetensors')) / 1e9:.2f} GB in {args.weights} "
          f"({time.perf_counter() - started:.1f} s)", flush=True)


def serve(args):
    os.makedirs(args.dir, exist_ok=True)
    clear_signals(args.dir, ("ready",))  # an earlier run's would be taken for this one's
    if args.daemon:
        # Before torch is imported: forking a process that has started CUDA or torch's threads is unsafe.
        daemonize(args.dir, ("ready",), "llm_server", READY_TIMEOUT_S)
    started = time.perf_counter()
    torch = setup_torch()
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    try:
        from transformers.modeling_utils import no_init_weights
    except ImportError:  # older transformers: initialising costs a little time, nothing else
        from contextlib import nullcontext as no_init_weights
    config = LlamaConfig.from_pretrained(args.weights)
    torch.cuda.init()
    with no_init_weights(), torch.device("cuda"):
        model = LlamaForCausalLM(config)
    state = load_file(os.path.join(args.weights, "model.safetensors"), device="cuda")
    model.load_state_dict(state)
    # The loaded copies are garbage once in the model: give them back to the driver, as a server does before it
    # serves (else PyTorch's cache keeps 16 GB that a checkpoint would have to carry).
    del state
    torch.cuda.empty_cache()
    model.eval()
    loaded = time.perf_counter()

    @torch.inference_mode()
    def generate(tokens, new):
        inputs = torch.tensor([tokens], device="cuda")
        output = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=new, min_new_tokens=new,
                                do_sample=False, use_cache=True, pad_token_id=config.eos_token_id)
        return output[0, len(tokens):].tolist()

    generate(WARM_UP, 8)
    torch.cuda.synchronize()
    print(f"llm_server: loaded in {loaded - started:.2f} s, warm in {time.perf_counter() - started:.2f} s; "
          f"{torch.cuda.memory_allocated() / 2**30:.2f} GiB on the GPU", flush=True)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            try:
                if self.path != "/generate":
                    raise ValueError(f"no {self.path}: POST /generate")
                length = int(self.headers.get("Content-Length", "0"))
                if not 0 < length <= 1 << 20:
                    raise ValueError("a JSON body of 1 byte to 1 MiB (Content-Length) is needed")
                body = json.loads(self.rfile.read(length))
                tokens, new = [int(t) for t in body["tokens"]], int(body.get("new", 16))
                if not 1 <= len(tokens) <= 4096 or not all(0 <= t < config.vocab_size for t in tokens) or not 1 <= new <= 512:
                    raise ValueError("tokens: 1 to 4096 ids below the vocabulary size; new: 1 to 512")
                answer, status = {"tokens": generate(tokens, new)}, 200
            except (ValueError, KeyError, json.JSONDecodeError) as error:
                answer, status = {"error": str(error)}, 400
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format, *arguments):
            print("llm_server: " + format % arguments, flush=True)

    server = HTTPServer(("127.0.0.1", args.port), Handler)
    write_file(os.path.join(args.dir, "ready"), f"{os.getpid()}\n")
    print(f"llm_server: serving on 127.0.0.1:{args.port}, pid {os.getpid()}", flush=True)
    server.serve_forever()


def ask(args):
    tokens = [int(t) for t in args.tokens.split()]
    request = urllib.request.Request(f"http://127.0.0.1:{args.port}/generate", method="POST",
                                     data=json.dumps({"tokens": tokens, "new": args.new}).encode(),
                                     headers={"Content-Type": "application/json"})
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                print(" ".join(str(t) for t in json.loads(response.read())["tokens"]))
                return
        except urllib.error.HTTPError as error:
            sys.exit(f"llm_server: {error.read().decode(errors='replace')}")
        except OSError as error:  # not listening yet (a restore in progress): try again
            if time.monotonic() > deadline:
                sys.exit(f"llm_server: no answer from 127.0.0.1:{args.port}: {error}")
            time.sleep(0.01)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare")
    p.add_argument("--weights", required=True)
    p.add_argument("--layers", type=int, default=32)
    s = commands.add_parser("serve")
    s.add_argument("--weights", required=True)
    s.add_argument("--dir", required=True)
    s.add_argument("--port", type=int, default=DEFAULT_PORT)
    s.add_argument("--daemon", action="store_true")
    a = commands.add_parser("ask")
    a.add_argument("--port", type=int, default=DEFAULT_PORT)
    a.add_argument("--tokens", default="128000 9906 1917 11 420 374 264 1296")
    a.add_argument("--new", type=int, default=16)
    args = parser.parse_args()
    {"prepare": prepare, "serve": serve, "ask": ask}[args.command](args)


if __name__ == "__main__":
    main()

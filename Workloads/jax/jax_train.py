#!/usr/bin/env python3
"""Deterministic JAX training that keeps compiling, to be checkpointed while it runs.

    jax_train.py --dir DIR [--daemon] [--steps N] [--step-sleep S] [--compile-every K]

Trains a small MLP (fixed seed, synthetic batches from a fixed key, deterministic XLA ops) and appends
"STEP<TAB>LOSS" to DIR/losses.txt after each step, LOSS being float.hex of the loss, so two runs compare byte
for byte. Every --compile-every steps it also jits and runs a function of a shape not seen before, so XLA keeps
starting ptxas (its compiler, a child process) while it trains: the moment at which a checkpoint of a JAX job
met a tree that changed under it. It stops after --steps, or as soon as DIR/stop exists, and writes DIR/done.

With --daemon it detaches before JAX is imported (double fork, setsid, stdio to DIR/log) and the command prints
the PID once DIR/ready exists: written as soon as JAX is imported, before the first compilation, so a test can
checkpoint it from its very start. SIGTERM, SIGINT and SIGHUP are logged, and faulthandler writes the Python
stacks to the log on a fatal signal, so a job that dies under a checkpoint says how.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.realpath(__file__)), "..", "torch"))
from workload_protocol import clear_signals, daemonize, write_file  # noqa: E402

READY_TIMEOUT_S = 300


def parse_args():
    parser = argparse.ArgumentParser(description="Deterministic JAX training for checkpoint tests.")
    parser.add_argument("--dir", required=True)
    parser.add_argument("--daemon", action="store_true")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--step-sleep", type=float, default=0.0, help="seconds between steps")
    parser.add_argument("--compile-every", type=int, default=25, help="jit a new shape every K steps (0: never)")
    args = parser.parse_args()
    args.dir = os.path.realpath(args.dir)
    return args


def log_signals():
    import faulthandler
    import signal

    faulthandler.enable(all_threads=True)

    def said(number, _frame):
        print(f"jax_train: got signal {number}; exiting", flush=True)
        os._exit(128 + number)

    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(number, said)


def main():
    args = parse_args()
    clear_signals(args.dir, ("ready", "done", "stop"))
    if args.daemon:
        daemonize(args.dir, ("ready", "done"), "jax_train", READY_TIMEOUT_S)
    log_signals()
    os.environ.setdefault("XLA_FLAGS", "--xla_gpu_deterministic_ops=true")
    import jax
    import jax.numpy as jnp

    write_file(os.path.join(args.dir, "ready"), f"{os.getpid()}\n")
    print(f"jax_train: JAX {jax.__version__} on {jax.devices()}", flush=True)

    sizes = (256, 512, 512, 10)
    key = jax.random.PRNGKey(0)
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        key, sub = jax.random.split(key)
        params.append((jax.random.normal(sub, (fan_in, fan_out), jnp.float32) / jnp.sqrt(fan_in), jnp.zeros((fan_out,), jnp.float32)))

    def loss_fn(params, x, y):
        for w, b in params[:-1]:
            x = jnp.tanh(x @ w + b)
        w, b = params[-1]
        logits = x @ w + b
        return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * y, axis=-1))

    @jax.jit
    def step(params, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        return [(w - 0.05 * gw, b - 0.05 * gb) for (w, b), (gw, gb) in zip(params, grads)], loss

    data_key = jax.random.PRNGKey(1234)
    losses = open(os.path.join(args.dir, "losses.txt"), "a", buffering=1)
    for number in range(1, args.steps + 1):
        data_key, kx, ky = jax.random.split(data_key, 3)
        x = jax.random.normal(kx, (128, sizes[0]), jnp.float32)
        y = jax.nn.one_hot(jax.random.randint(ky, (128,), 0, sizes[-1]), sizes[-1])
        params, loss = step(params, x, y)
        losses.write(f"{number}\t{float(loss).hex()}\n")
        if args.compile_every and number % args.compile_every == 0:
            # A shape never seen: XLA compiles again (ptxas runs as a child), the result checked on the host.
            width = 64 + number
            probe = jax.jit(lambda v: jnp.sum(jnp.sin(v) ** 2 + jnp.cos(v) ** 2))(jnp.ones((width,), jnp.float32))
            if abs(float(probe) - width) > 1e-2 * width:
                print(f"jax_train: FAIL probe of width {width} gave {float(probe)}", flush=True)
                sys.exit(1)
        if os.path.exists(os.path.join(args.dir, "stop")):
            break
        if args.step_sleep:
            time.sleep(args.step_sleep)
    losses.close()
    write_file(os.path.join(args.dir, "done"), f"{number}\n")
    print(f"jax_train: done after {number} steps", flush=True)


if __name__ == "__main__":
    main()

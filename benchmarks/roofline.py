"""This machine's roofline, measured with JAX on the default backend: read bandwidth and matmul throughput.

Benchmarks report their achieved GB/s and GFLOP/s beside these two numbers, measured in the same run
(machines are noisy; a figure measured yesterday is no bound for today).

    python benchmarks/roofline.py            # prints a table and one JSON line
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp


def best_time(fn, *args, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def read_bandwidth_gbs(megabytes: int = 1024, dtype=jnp.float32) -> float:
    """Bytes of a large matrix read per second (GB/s, 1e9): the best of a column reduction and two
    vector-matrix products, one per weight layout ((in, out), and (out, in) as our models store weights: the
    access pattern of batch-1 decoding). The matrix is far larger than the caches."""
    n = megabytes * 2**20 // jnp.dtype(dtype).itemsize
    x = jnp.ones((n // 4096, 4096), dtype)
    v = jnp.ones((1, n // 4096), dtype)
    u = jnp.ones((1, 4096), dtype)
    reduce = jax.jit(lambda a: jnp.sum(a, axis=0, dtype=jnp.float32))
    matvec = jax.jit(lambda v, a: v @ a)
    matvec_t = jax.jit(lambda u, a: jax.lax.dot_general(u, a, (((1,), (1,)), ((), ()))))
    t = min(best_time(reduce, x), best_time(matvec, v, x), best_time(matvec_t, u, x))
    return x.size * x.dtype.itemsize / t / 1e9


def matmul_gflops(n: int = 2048, dtype=jnp.float32) -> float:
    """Throughput of an (n, n) @ (n, n) matmul (GFLOP/s, 2 n^3 flops)."""
    a = jnp.ones((n, n), dtype)
    b = jnp.ones((n, n), dtype)
    fn = jax.jit(lambda a, b: a @ b)
    t = best_time(fn, a, b)
    return 2 * n**3 / t / 1e9


def measure(dtype=jnp.float32, megabytes: int = 1024, n: int = 2048) -> dict:
    return {
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "dtype": jnp.dtype(dtype).name,
        "read_gbs": read_bandwidth_gbs(megabytes, dtype),
        "matmul_gflops": matmul_gflops(n, dtype),
    }


if __name__ == "__main__":
    r = measure()
    print(f"backend {r['backend']} ({r['device']}), {r['dtype']}: "
          f"read {r['read_gbs']:.1f} GB/s, matmul {r['matmul_gflops']:.1f} GFLOP/s")
    print(json.dumps(r))

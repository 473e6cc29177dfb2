"""The loss microbenchmark's worker: one forward + backward of a per-token divergence.

One forward + backward of a per-token generalized JSD (β = 0.5 by
default) at V = 49,152, D = 576 (SmolLM2's sizes) and N ∈ {512, 2048, 4096} rows:
opd's chunked path (`chunked_divergence`, row chunks of 1024; its backward recomputes
both heads' logits), opd's one-pass path (`chunked_weighted_divergence` with c_n = 1/N,
the trainer's path for unweighted divergence recipes: the gradient is taken in the
forward pass), opd's materialized path (the (N, V) logits, `divergence`), and TRL's `ChunkedDivergenceFunction` (its CPU tile
path: 4096-row × 32,768-column tiles). Memory is measured as in
`benchmarks/bench_chunked.py`: a fresh process per configuration, the peak-RSS counter
reset after the inputs exist (`/proc/self/clear_refs`), peak − baseline reported. The
per-token values of every path are compared with opd's materialized reference.
"""

from __future__ import annotations

import time

import torch

from opd.bench.memory import peak_kb, reset_peak
from opd.losses import chunked_divergence, chunked_weighted_divergence, divergence

VOCAB, HIDDEN = 49_152, 576


def loss_inputs(n: int, seed: int = 0):
    """Random (student hidden, student head, teacher hidden, teacher head) at V = VOCAB,
    D = HIDDEN, float32; the student's two require grad. Shared by the loss benchmarks."""
    gen = torch.Generator().manual_seed(seed)
    h_s_ND = torch.randn(n, HIDDEN, generator=gen).requires_grad_()
    w_s_VD = (torch.randn(VOCAB, HIDDEN, generator=gen) / HIDDEN**0.5).requires_grad_()
    h_t_ND = torch.randn(n, HIDDEN, generator=gen)
    w_t_VD = torch.randn(VOCAB, HIDDEN, generator=gen) / HIDDEN**0.5
    return h_s_ND, w_s_VD, h_t_ND, w_t_VD


def worker_loss(a) -> dict:
    torch.set_num_threads(a.threads)
    h_s_ND, w_s_VD, h_t_ND, w_t_VD = loss_inputs(a.n)

    def step(hs, ht):
        if a.mode == "opd_one_pass":  # the trainer's path: Σ c_n D_n, gradient in the forward
            coef_N = torch.full((hs.shape[0],), 1.0 / hs.shape[0])
            loss, values_N = chunked_weighted_divergence(
                "generalized_jsd",
                hs,
                w_s_VD,
                ht,
                w_t_VD,
                coef_N,
                chunk_size=a.chunk_size,
                beta=a.beta,
            )
            loss.backward()
            return values_N
        if a.mode == "opd_chunked":
            values_N = chunked_divergence(
                "generalized_jsd", hs, w_s_VD, ht, w_t_VD, chunk_size=a.chunk_size, beta=a.beta
            )
        elif a.mode == "opd_materialized":
            with torch.no_grad():
                logits_t_NV = ht @ w_t_VD.T
            values_N = divergence("generalized_jsd", hs @ w_s_VD.T, logits_t_NV, beta=a.beta)
        else:
            from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

            values_N, _ = ChunkedDivergenceFunction.apply(
                hs, w_s_VD, None, ht, w_t_VD, None, a.beta, 1.0, 1.0, None, 1.0, None
            )
        values_N.mean().backward()
        return values_N.detach()

    step(h_s_ND[:8].detach().requires_grad_(), h_t_ND[:8])  # kernels, thread pools
    w_s_VD.grad = None
    base = reset_peak()
    t0 = time.perf_counter()
    values_N = step(h_s_ND, h_t_ND)
    seconds = time.perf_counter() - t0
    torch.save(values_N, a.values_out)
    return {"mode": a.mode, "n": a.n, "peak_mb": (peak_kb() - base) / 1024, "seconds": seconds}

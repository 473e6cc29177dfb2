"""`opd plan --calibrate`: measure the device numbers `opd.plan.Device` needs, on opd's own
kernels at small reference shapes (models built in code, nothing downloaded):

    fwd_flops, train_flops      a 2-layer Llama decoder (width 512, and 128 for the
                                *_narrow pair) on 8 × 128 tokens: forward FLOPs / seconds
                                of a no-grad forward, 3 × forward FLOPs / seconds of
                                forward + backward (latencies subtracted)
    head_flops                  the one-pass loss's three head matmuls (h·Wᵀ, dZ·W, dZᵀ·h)
                                on a chunk of 256 rows × 16,384 entries at widths 64, 256
                                and 1,024: 6 · 256 · 16,384 · d / seconds
    loss_entry_s, _small_s      opd's one-pass loss (reverse KL, forward + backward) at
                                width 64 on a 256 × 49,152 chunk (larger than the caches,
                                as in real runs) and on 8 chunks of 256 × 128, minus its
                                matmuls at head_flops and the chunk latency: per (row × entry)
    update_s                    a training step's update (embedding gradient, clipping,
                                AdamW) on a 1-layer Llama with 65,536 vs 32 vocabulary rows:
                                extra seconds / extra parameters
    sample_entry_s, sample_row_s  a decode step of opd's sampling backend under per-row
                                seeds (as in training): 16 rows with 16,384 vs 32 entries
                                (minus the lm_head's matmul) per (row × entry), and 16 vs 1
                                rows at 32 entries per row
    bandwidth                   a 256 MB float32 copy: 2 · 256 MB / seconds
    decode_bandwidth            a decode step of 4 rows of a 2-layer width-512 Llama, minus
                                its latencies: its weights' bytes / seconds
    latencies                   tiny Llamas (width 16, vocabulary 32) with 1 and 4 layers:
                                decode step (1 row), no-grad forward, forward + backward +
                                AdamW (fixed + per layer); a chunk of the one-pass loss (8 rows)

Every number is the median of a few repeats with `threads` torch threads (0: torch's
default), timed in wall seconds; on a shared machine those reflect the load of the moment.
`benchmarks/bench_plan.py` therefore calibrates with one thread timed by the thread's CPU
seconds (`calibrate(1, clock=time.thread_time)`: what the same work takes on an idle
machine, whatever else runs), measures the steps the same way, right after, in the same
process, and repeats both. About half a minute on one thread. `--save FILE` keeps it as JSON,
`--device FILE` reads it back; `--cpu-seconds` (with `--threads 1`) uses the thread clock.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, fields
from pathlib import Path

from opd.errors import ConfigError
from opd.plan import HEAD_WIDTHS, Device

_CLOCK = [time.perf_counter]  # calibrate(clock=...) swaps it (e.g. time.thread_time)


def _best(fn, repeats: int = 5) -> float:
    """The median seconds of `repeats` calls (after one warm-up call)."""
    clock = _CLOCK[0]
    fn()
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)


def _line(t1: float, t4: float) -> tuple[float, float]:
    """(fixed, per layer) of a latency measured at 1 and 4 layers."""
    per_layer = max((t4 - t1) / 3, 0.0)
    return max(t1 - per_layer, 0.0), per_layer


def _latencies(layers: int) -> tuple[float, float, float]:
    """(decode step, no-grad forward, forward + backward + AdamW) seconds of a tiny Llama."""
    import torch

    from opd.tiny import tiny_llama

    model = tiny_llama(32, hidden=16, layers=layers, heads=2, seed=0)
    ids, mask = torch.tensor([[3, 4, 5, 6]]), torch.ones(1, 4, dtype=torch.long)
    with torch.no_grad():
        fwd = _best(lambda: model.model(input_ids=ids, attention_mask=mask), 10)
    return _decode_step(model, 1, 9), fwd, _train_seconds(model, ids, mask, 10)


def _decode_step(model, rows: int, repeats: int = 5) -> float:
    """Seconds per decode step of opd's sampling backend, sampled with per-row seeds as in
    training (`opd.step._rollout`), no stop token."""
    import torch

    from opd.sampling import GenerationParams, make_backend
    from opd.sampling.rows import row_seeds

    backend, prompts = make_backend("auto", rows), [[3, 4, 5, 6]] * rows

    def gen(c):
        params = GenerationParams(max_new_tokens=c, temperature=1.0)

        def run():
            with row_seeds(list(range(rows))):
                backend.generate(model, prompts, params, pad_id=0, stop_ids=())

        return run

    with torch.no_grad():
        return (_best(gen(18), repeats) - _best(gen(2), repeats)) / 16


def _train_seconds(model, ids, mask, repeats: int) -> float:
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train():
        opt.zero_grad(set_to_none=True)
        model.model(input_ids=ids, attention_mask=mask).last_hidden_state.sum().backward()
        opt.step()

    return _best(train, repeats)


def _update_seconds(vocab: int) -> tuple[float, int]:
    """(seconds, parameters) of a training step of a 1-layer width-64 Llama whose head and
    embedding get gradients (4 tokens, so the update dominates): clip + AdamW included."""
    import torch

    from opd.tiny import tiny_llama

    model = tiny_llama(vocab, hidden=64, layers=1, heads=4, seed=0)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids, mask = torch.tensor([[3, 4, 5, 6]]), torch.ones(1, 4, dtype=torch.long)

    def step():
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, attention_mask=mask).logits.sum().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    return _best(step, 7), sum(p.numel() for p in params)


def _head_rate(width: int, rows: int = 256, vocab: int = 16384) -> float:
    """FLOP/s of one loss chunk's three head matmuls at `width`."""
    import torch

    h, w = torch.randn(rows, width), torch.randn(vocab, width)
    g_h, g_w = torch.empty(rows, width), torch.zeros(vocab, width)

    def run():
        dz = h @ w.T
        torch.mm(dz, w, out=g_h)
        g_w.addmm_(dz.T, h)

    return 6 * rows * vocab * width / _best(run, 3)


def _loss_seconds(rows: int, vocab: int, width: int, chunk: int, repeats: int = 3) -> float:
    import torch

    from opd.losses.one_pass import chunked_weighted_divergence

    hs = torch.randn(rows, width, requires_grad=True)
    ws = torch.randn(vocab, width, requires_grad=True)
    ht, wt = torch.randn(rows, width), torch.randn(vocab, width)
    c = torch.full((rows,), 1 / rows)

    def run():
        loss, _ = chunked_weighted_divergence("reverse_kl", hs, ws, ht, wt, c, chunk_size=chunk)
        loss.backward()

    return _best(run, repeats)


def _memory() -> float:
    """Bytes/s of a 256 MB copy (read + write counted)."""
    import torch

    src = torch.randn(64 * 2**20)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _best(lambda: dst.copy_(src), 3)


def calibrate(threads: int = 0, clock=None) -> Device:
    """The device numbers (module docstring), timed with `clock` (default wall time; with
    one thread, `time.thread_time` counts this thread's CPU seconds, which other processes
    on a shared machine do not inflate)."""
    saved, _CLOCK[0] = _CLOCK[0], clock or time.perf_counter
    try:
        return _calibrate(threads)
    finally:
        _CLOCK[0] = saved


def _calibrate(threads: int) -> Device:
    import torch

    from opd.plan import Shape, forward_flops
    from opd.tiny import tiny_llama

    if threads:
        torch.set_num_threads(threads)
    bandwidth = _memory()
    lat = {layers: _latencies(layers) for layers in (1, 4)}
    dec, fwd, trn = (_line(lat[1][i], lat[4][i]) for i in range(3))
    (t_big, n_big), (t_small, n_small) = _update_seconds(65536), _update_seconds(32)
    update_s = max(t_big - t_small, 0.0) / (n_big - n_small)
    rates = {}
    for d in (128, 512):
        model = tiny_llama(32, hidden=d, layers=2, heads=4, seed=0)
        ids, mask = torch.randint(3, 32, (8, 128)), torch.ones(8, 128, dtype=torch.long)
        flops = forward_flops(Shape(hidden=d, layers=2, intermediate=2 * d, vocab=32, heads=4,
                                    kv_heads=4), 8, 128)  # fmt: skip
        with torch.no_grad():
            t_f = _best(lambda m=model, i=ids, k=mask: m.model(input_ids=i, attention_mask=k), 3)
        t_t = _train_seconds(model, ids, mask, 3) - sum(p.numel() for p in model.parameters()) * (
            update_s
        )
        rates[d] = (flops / max(t_f - fwd[0] - 2 * fwd[1], 1e-9),
                    3 * flops / max(t_t - trn[0] - 2 * trn[1], 1e-9))  # fmt: skip
    head = [_head_rate(d) for d in HEAD_WIDTHS]
    chunk_s = _loss_seconds(8, 32, 16, 8, 10)
    dev = Device(fwd_flops=rates[512][0], train_flops=rates[512][1], head_flops=head)

    def loss_entry(rows: int, vocab: int, repeats: int) -> float:
        t = _loss_seconds(rows, vocab, 64, 256, repeats) - rows / 256 * chunk_s
        return max(t - 2 * rows * vocab * 4 * 64 / dev.head_rate(64), 0.0) / (rows * vocab)

    tiny = tiny_llama(32, hidden=16, layers=1, heads=2, seed=0)
    row_s = max(_decode_step(tiny, 16, 9) - _decode_step(tiny, 1, 9), 0.0) / 15
    decode_fixed = max(dec[0] - row_s, 0.0)  # dec[0] was measured with one row
    wide = tiny_llama(32, hidden=512, layers=2, heads=4, seed=0)  # weight-bound at 4 rows
    n_body = Shape(hidden=512, layers=2, intermediate=1024, vocab=32, heads=4,
                   kv_heads=4).body_params  # fmt: skip
    t_wide = _decode_step(wide, 4, 3) - decode_fixed - 2 * dec[1] - 4 * row_s
    read = n_body * 4 / max(t_wide, 1e-9)
    small = tiny_llama(32, hidden=64, layers=1, heads=4, seed=0)
    big = tiny_llama(16384, hidden=64, layers=1, heads=4, seed=0)
    extra = _decode_step(big, 16, 3) - _decode_step(small, 16, 3)
    head_s = max(2 * 16 * 16384 * 64 / dev.head_rate(64), 16384 * 64 * 4 / read)
    return Device(
        fwd_flops=rates[512][0], train_flops=rates[512][1], fwd_flops_narrow=rates[128][0],
        train_flops_narrow=rates[128][1], bandwidth=bandwidth, decode_bandwidth=read,
        head_flops=head, update_s=update_s,
        sample_entry_s=max(extra - head_s, 0.0) / (16 * (16384 - 32)), sample_row_s=row_s,
        loss_entry_s=loss_entry(256, 49152, 2), loss_entry_small_s=loss_entry(2048, 128, 5),
        loss_chunk_s=chunk_s, decode_fixed_s=decode_fixed, decode_layer_s=dec[1],
        forward_fixed_s=fwd[0], forward_layer_s=fwd[1], train_fixed_s=trn[0],
        train_layer_s=trn[1], threads=torch.get_num_threads(), name="calibrated",
    )  # fmt: skip


def save_device(dev: Device, path) -> None:
    Path(path).write_text(json.dumps(asdict(dev), indent=1) + "\n")


def load_device(path) -> Device:
    """A Device from the JSON `--calibrate --save` wrote; one-line errors otherwise."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except OSError as err:
        raise ConfigError(f"--device '{path}': cannot read it ({err.strerror or err})") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"--device '{path}': not JSON ({err.msg}, line {err.lineno})") from None
    names = {f.name for f in fields(Device)}
    if not isinstance(data, dict) or "fwd_flops" not in data:
        raise ConfigError(
            f"--device '{path}': expected the JSON of opd plan --calibrate --save FILE "
            "(with 'fwd_flops')"
        )
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"--device '{path}': unknown key {unknown[0]!r}; valid: {sorted(names)}")
    for key in ("fwd_flops", "bandwidth"):
        if key in data and (not isinstance(data[key], (int, float)) or data[key] <= 0):
            raise ConfigError(f"--device '{path}': {key} must be a number > 0, got {data[key]!r}")
    return Device(**data)

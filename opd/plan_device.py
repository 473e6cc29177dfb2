"""`opd plan --calibrate`: measure the device numbers `opd.plan.Device` needs, on opd's own
kernels at small reference shapes (models built in code, nothing downloaded):

    fwd_flops, train_flops      a 2-layer Llama decoder (width 512, and 128 for the
                                *_narrow pair) on 8 × 64 tokens: forward FLOPs / seconds
                                of a no-grad forward, 3 × forward FLOPs / seconds of
                                forward + backward (latency and AdamW subtracted)
    adam_s                      AdamW on a 4 M-parameter tensor: seconds per parameter
    entry_s, entry_width_s      a decode step of opd's sampling backend with 16 rows and a
                                16,384-entry vocabulary minus one with 32 entries, at widths
                                64 and 256: seconds per (row × entry) = e + e_d · width
    loss_entry_s, loss_width_s  opd's one-pass loss (reverse KL, forward + backward) on
                                256 rows × 49,152 entries (a chunk larger than the
                                caches, as in real runs) at widths 64 and 256:
                                seconds per (row × entry) = l + l_d · (3·d_s + d_t)
    bandwidth                   a 256 MB float32 copy: 2 · 256 MB / seconds
    latencies                   tiny Llamas (width 16, vocabulary 32) with 1 and 4 layers:
                                decode step, no-grad forward, forward + backward + AdamW
                                (fixed + per layer); a chunk of the one-pass loss (8 rows)

Every number is the median of a few repeats with `threads` torch threads (0: torch's
default); on a shared machine it reflects the load of the moment, as does the run that
follows. About a minute. `--save FILE` keeps it as JSON, `--device FILE` reads it back.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, fields
from pathlib import Path

from opd.errors import ConfigError
from opd.plan import Device


def _best(fn, repeats: int = 5) -> float:
    """The median seconds of `repeats` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _line(t1: float, t4: float) -> tuple[float, float]:
    """(fixed, per layer) of a latency measured at 1 and 4 layers."""
    per_layer = max((t4 - t1) / 3, 0.0)
    return max(t1 - per_layer, 0.0), per_layer


def _two_points(x1: float, y1: float, x2: float, y2: float) -> tuple[float, float]:
    """(intercept, slope) >= 0 of the line through two measurements."""
    slope = max((y2 - y1) / (x2 - x1), 0.0)
    return max(y1 - slope * x1, 0.0), slope


def _latencies(layers: int) -> tuple[float, float, float]:
    """(decode step, no-grad forward, forward + backward + AdamW) seconds of a tiny Llama."""
    import torch

    from opd.tiny import tiny_llama

    model = tiny_llama(32, hidden=16, layers=layers, heads=2, seed=0)
    ids, mask = torch.tensor([[3, 4, 5, 6]]), torch.ones(1, 4, dtype=torch.long)
    with torch.no_grad():
        fwd = _best(lambda: model.model(input_ids=ids, attention_mask=mask), 10)
    return _decode_step(model, 16), fwd, _train_seconds(model, ids, mask, 10)


def _decode_step(model, rows: int, repeats: int = 5) -> float:
    """Seconds per decode step of opd's sampling backend (sampled, no stop token)."""
    import torch

    from opd.sampling import GenerationParams, make_backend

    backend, prompts = make_backend("auto", rows), [[3, 4, 5, 6]] * rows

    def gen(c):
        params = GenerationParams(max_new_tokens=c, temperature=1.0)
        return lambda: backend.generate(model, prompts, params, pad_id=0, stop_ids=())

    with torch.no_grad():
        return (_best(gen(10), repeats) - _best(gen(2), repeats)) / 8


def _train_seconds(model, ids, mask, repeats: int) -> float:
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train():
        opt.zero_grad(set_to_none=True)
        model.model(input_ids=ids, attention_mask=mask).last_hidden_state.sum().backward()
        opt.step()

    return _best(train, repeats)


def _loss_seconds(rows: int, vocab: int, width: int, repeats: int = 3) -> float:
    import torch

    from opd.losses.one_pass import chunked_weighted_divergence

    hs = torch.randn(rows, width, requires_grad=True)
    ws = torch.randn(vocab, width, requires_grad=True)
    ht, wt = torch.randn(rows, width), torch.randn(vocab, width)
    c = torch.full((rows,), 1 / rows)

    def run():
        loss, _ = chunked_weighted_divergence("reverse_kl", hs, ws, ht, wt, c, chunk_size=rows)
        loss.backward()

    return _best(run, repeats)


def _memory() -> tuple[float, float]:
    """(bytes/s of a 256 MB copy, seconds per parameter of an AdamW step)."""
    import torch

    src = torch.randn(64 * 2**20)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / _best(lambda: dst.copy_(src), 3)
    p = torch.nn.Parameter(torch.zeros(4 * 2**20))
    p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW([p], lr=1e-4)
    return bandwidth, _best(opt.step, 3) / p.numel()


def calibrate(threads: int = 0) -> Device:
    import torch

    from opd.plan import Shape, forward_flops
    from opd.tiny import tiny_llama

    if threads:
        torch.set_num_threads(threads)
    bandwidth, adam_s = _memory()
    lat = {layers: _latencies(layers) for layers in (1, 4)}
    dec, fwd, trn = (_line(lat[1][i], lat[4][i]) for i in range(3))
    rates = {}
    for d in (128, 512):
        model = tiny_llama(32, hidden=d, layers=2, heads=4, seed=0)
        ids, mask = torch.randint(3, 32, (8, 64)), torch.ones(8, 64, dtype=torch.long)
        flops = forward_flops(Shape(hidden=d, layers=2, intermediate=2 * d, vocab=32, heads=4,
                                    kv_heads=4), 8, 64)  # fmt: skip
        with torch.no_grad():
            t_f = _best(lambda m=model, i=ids, k=mask: m.model(input_ids=i, attention_mask=k), 3)
        t_t = (
            _train_seconds(model, ids, mask, 3)
            - sum(p.numel() for p in model.parameters()) * adam_s
        )
        rates[d] = (flops / max(t_f - fwd[0] - 2 * fwd[1], 1e-9),
                    3 * flops / max(t_t - trn[0] - 2 * trn[1], 1e-9))  # fmt: skip
    entry = {}
    for d in (64, 256):
        big, small = (tiny_llama(v, hidden=d, layers=1, heads=4, seed=0) for v in (16384, 32))
        extra = _decode_step(big, 16, 3) - _decode_step(small, 16, 3)
        entry[d] = max(extra, 0.0) / (16 * (16384 - 32))
    loss = {d: _loss_seconds(256, 49152, d, 2) / (256 * 49152) for d in (64, 256)}
    e, e_d = _two_points(64, entry[64], 256, entry[256])
    lo, lo_d = _two_points(4 * 64, loss[64], 4 * 256, loss[256])
    return Device(
        fwd_flops=rates[512][0], train_flops=rates[512][1], fwd_flops_narrow=rates[128][0],
        train_flops_narrow=rates[128][1], bandwidth=bandwidth, adam_s=adam_s, entry_s=e,
        entry_width_s=e_d, loss_entry_s=lo, loss_width_s=lo_d, loss_chunk_s=_loss_seconds(8, 32, 16, 10),
        decode_fixed_s=dec[0], decode_layer_s=dec[1], forward_fixed_s=fwd[0],
        forward_layer_s=fwd[1], train_fixed_s=trn[0], train_layer_s=trn[1],
        threads=torch.get_num_threads(), name="calibrated",
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

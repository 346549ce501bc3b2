"""Under DDP (gloo, 2 processes on 127.0.0.1) the update equals the single-process update on the global batch.

gradmimic itself never touches torch.distributed: the test passes a ``gather`` built on it, as Ray Train will.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from gradmimic import GradMimic, Weighting, capture_linear_sites

SIZES = (5, 4)  # unequal per-rank batches: the weights still normalise over all 9


def make_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(sum(SIZES), 6, dtype=torch.float64)
    y = torch.randint(0, 3, (sum(SIZES),))
    ref = {"2.weight": model[2].weight.detach() + 0.3 * torch.randn(3, 5, dtype=torch.float64)}
    return model, x, y, ref


def run_step(model, x, y, ref, reweight, **dist_kwargs):
    inner = getattr(model, "module", model)  # DDP wraps; parameter names are the inner model's
    mimic = GradMimic(inner, ["2.weight"], reference=ref, weighting=Weighting("mimic", "normed_cos", 0.5),
                      reweight=reweight)
    with capture_linear_sites(inner, ["2.weight"]) as sites:
        logits = model(x)
    out = mimic.step(F.cross_entropy(logits, y, reduction="none"), sites, **dist_kwargs)
    grads = {n: p.grad.detach().clone() for n, p in inner.named_parameters()}
    return out, grads


def gather_1d(t: torch.Tensor) -> torch.Tensor:
    n = torch.tensor([t.numel()])
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    width = int(max(sizes))
    padded = torch.zeros(width, dtype=t.dtype)
    padded[: t.numel()] = t
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)])


def worker(rank, port, reweight, out_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model, x, y, ref = make_problem()
        ddp = nn.parallel.DistributedDataParallel(model)
        start = sum(SIZES[:rank])
        sl = slice(start, start + SIZES[rank])
        out, grads = run_step(ddp, x[sl], y[sl], ref, reweight, gather=gather_1d, rank=rank)
        torch.save({"grads": grads, "weights": out.weights, "alignment": out.alignment}, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("reweight", ["param", "all"])
def test_ddp_update_equals_single_process(tmp_path, reweight):
    model, x, y, ref = make_problem()
    single, grads = run_step(model, x, y, ref, reweight)
    path = str(tmp_path / "rank")
    mp.start_processes(worker, args=(free_port(), reweight, path), nprocs=2, join=True, start_method="spawn")
    ranks = [torch.load(f"{path}.{r}", weights_only=True) for r in range(2)]
    assert torch.allclose(torch.cat([r["weights"] for r in ranks]), single.weights, rtol=1e-10, atol=0)
    for r in ranks:
        assert r["alignment"] == pytest.approx(single.alignment, rel=1e-10)
        for name, g in grads.items():
            assert torch.allclose(r["grads"][name], g, rtol=1e-10, atol=1e-14), name
    # and the weighting did something: the head's gradient is not the plain mean
    plain = nn.Sequential(*[m for m in make_problem()[0]])
    F.cross_entropy(plain(x), y).backward()
    assert not torch.allclose(plain[2].weight.grad, grads["2.weight"], rtol=1e-3)

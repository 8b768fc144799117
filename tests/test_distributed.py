"""rcnn.distributed pieces that need several processes: run as two gloo ranks forked by the test (tests/ranks.py)."""

import torch
import torch.distributed as dist
from torch import nn

from rcnn import distributed

from .ranks import run_ranks


def _two_ranks(fn, *args):
    """Run ``fn(rank, *args)`` in two gloo processes (each writes its results to a file)."""
    assert run_ranks(_entry, fn, args) == [0, 0]


def _entry(fn, args):
    dist.init_process_group("gloo")  # from torchrun's variables, which run_ranks sets
    try:
        fn(dist.get_rank(), *args)
    finally:
        dist.destroy_process_group()


MOMENTA = (0.1, None)  # training's running average, and the cumulative one that recomputes statistics


def _bn_rank(rank, x, r, state, out):
    for momentum in MOMENTA:
        bn = nn.BatchNorm2d(x.shape[1], momentum=momentum)
        bn.load_state_dict(state)
        bn = distributed.sync_batchnorm(nn.Sequential(bn), "cpu")[0]
        assert isinstance(bn, distributed.CpuSyncBatchNorm)
        rows = distributed.part(len(x))
        xr = x[rows].clone().requires_grad_(True)
        for _ in range(2):  # two steps: the running statistics' update, twice
            xr.grad = None
            bn.zero_grad()
            y = bn(xr)
            (y * r[rows]).sum().backward()
        torch.save({"y": y.detach(), "dx": xr.grad, "dw": bn.weight.grad, "db": bn.bias.grad, "state": bn.state_dict()},
                   out / f"{rank}-{momentum}.pt")  # fmt: skip
    # Rank 1 with no rows (a batch part of unreadable images): it takes part, rank 0 normalises alone.
    bn = distributed.sync_batchnorm(nn.Sequential(nn.BatchNorm2d(x.shape[1])), "cpu")[0]
    rows = slice(None) if rank == 0 else slice(0, 0)
    xe = x[rows].clone().requires_grad_(True)
    y = bn(xe)
    (y * r[rows]).sum().backward()
    torch.save({"y": y.detach(), "dx": xe.grad, "dw": bn.weight.grad}, out / f"{rank}-empty.pt")


def test_cpu_sync_batchnorm_is_batchnorm_over_the_whole_batch(tmp_path):
    """Two ranks with 3 and 2 rows of a 5-row batch: the outputs, the input gradients, the running
    statistics are one BatchNorm2d's over the 5 rows; the ranks' weight and bias gradients sum to its.
    Then 5 rows and none."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, 3, 3, generator=g) * 3 + 2
    r = torch.randn(5, 4, 3, 3, generator=g)
    weight, bias = torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g)
    state = {**nn.BatchNorm2d(4).state_dict(), "weight": weight, "bias": bias}
    _two_ranks(_bn_rank, x, r, state, tmp_path)
    for momentum in MOMENTA:
        bn = nn.BatchNorm2d(4, momentum=momentum)
        bn.load_state_dict(state)
        xs = x.clone().requires_grad_(True)
        for _ in range(2):
            xs.grad = None
            bn.zero_grad()
            y = bn(xs)
            (y * r).sum().backward()
        ranks = [torch.load(tmp_path / f"{k}-{momentum}.pt") for k in (0, 1)]
        torch.testing.assert_close(torch.cat([a["y"] for a in ranks]), y.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.cat([a["dx"] for a in ranks]), xs.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ranks[0]["dw"] + ranks[1]["dw"], bn.weight.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ranks[0]["db"] + ranks[1]["db"], bn.bias.grad, rtol=1e-4, atol=1e-5)
        for a in ranks:
            for k, v in bn.state_dict().items():
                torch.testing.assert_close(a["state"][k], v, rtol=1e-5, atol=1e-6, msg=f"{k}, momentum {momentum}")
    # Rank 1 with no rows (a batch part of unreadable images) takes part; rank 0 normalises its rows alone.
    bn, xs = nn.BatchNorm2d(4), x.clone().requires_grad_(True)
    y = bn(xs)
    (y * r).sum().backward()
    ranks = [torch.load(tmp_path / f"{k}-empty.pt") for k in (0, 1)]
    torch.testing.assert_close(ranks[0]["y"], y.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ranks[0]["dx"], xs.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ranks[0]["dw"] + ranks[1]["dw"], bn.weight.grad, rtol=1e-4, atol=1e-5)
    assert ranks[1]["y"].shape == (0, 4, 3, 3) and ranks[1]["dx"].shape == (0, 4, 3, 3)


def test_one_process_keeps_plain_batchnorm():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert type(distributed.sync_batchnorm(net, "cpu")[1]) is nn.BatchNorm2d
    assert distributed.part(7) == slice(0, 7)

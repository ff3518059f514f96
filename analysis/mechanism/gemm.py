"""x @ w.T for the full-vocabulary readouts, on the fastest BLAS at hand.

The analysis pass reads ~75 residual vectors per prompt through the unembedding ([rows, d] @ [d, vocab]),
which makes that one product most of its time. On CPU, torch's float32 matmul goes to MKL, and on the
AMD EPYC cores this project runs on MKL measured 51-85 GFLOP/s where NumPy's OpenBLAS reached 75-133 on
the same product (`make bench` has the end-to-end effect). So on CPU in float32 the rows are split over
torch's thread count and each slice is multiplied by a single-threaded OpenBLAS call in a Python thread (NumPy
releases the GIL); under autograd (the fit's steps) the backward product goes the same way. One level of
threads: OpenBLAS' own pool would spin after each call and take cores from torch's OpenMP pool.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

# Rows below which a single torch call is cheaper than the thread hand-off.
MIN_ROWS = 64

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_threads = 0
_blas = None  # threadpoolctl's view of NumPy's OpenBLAS, or False where there is none to limit


def _workers() -> tuple[ThreadPoolExecutor, int, object] | None:
    global _pool, _pool_threads, _blas
    with _lock:
        if _blas is None:
            try:
                from threadpoolctl import ThreadpoolController

                blas = ThreadpoolController().select(user_api="blas", internal_api="openblas")
                _blas = blas if len(blas.lib_controllers) else False
            except ImportError:
                _blas = False
        if _blas is False:
            return None
        threads = torch.get_num_threads()
        if _pool is None or _pool_threads != threads:
            _pool, _pool_threads = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="recallfix-gemm"), threads
        return _pool, threads, _blas


def _blas_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """a [n, k] @ b [k, m] in float32 on single-threaded OpenBLAS slices of rows; None where that is not at hand."""
    workers = _workers()
    if workers is None:
        return None
    pool, threads, blas = workers
    an = a.detach().float().contiguous().numpy()
    bn = b.detach().numpy()
    out = np.empty((an.shape[0], bn.shape[1]), dtype=np.float32)
    step = -(-an.shape[0] // threads)

    def part(start: int) -> None:
        np.matmul(an[start : start + step], bn, out=out[start : start + step])

    with blas.limit(limits=1):
        list(pool.map(part, range(0, an.shape[0], step)))
    return torch.from_numpy(out)


class _ReadoutProduct(torch.autograd.Function):
    """x @ w.T with a gradient for x only (w is the frozen unembedding), both products on OpenBLAS."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w)
        out = _blas_matmul(x, w.T)
        assert out is not None  # matmul_t checked
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (w,) = ctx.saved_tensors
        out = _blas_matmul(grad, w) if grad.shape[0] >= MIN_ROWS else None
        return (grad @ w if out is None else out), None


def matmul_t(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [n, k] @ w[m, k].T -> [n, m] float32 (w in its own dtype on torch's path). Under autograd only x may
    need a gradient on the fast path (the fit's gains reach the logits through x; the unembedding is frozen)."""
    graph = torch.is_grad_enabled() and x.requires_grad
    fast = (x.device.type == "cpu" and w.device.type == "cpu" and w.dtype == torch.float32
            and x.shape[0] >= MIN_ROWS and not w.requires_grad and (x.dtype == torch.float32 or not graph)
            and _workers() is not None)
    if not fast:
        return (x.to(w.dtype) @ w.T).float()
    if graph:
        return _ReadoutProduct.apply(x, w)
    out = _blas_matmul(x, w.T)
    assert out is not None
    return out

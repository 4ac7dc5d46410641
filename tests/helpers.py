"""Shared test helpers: tolerances that travel with the dtype, input makers, the CPU-path switch, and a fixture
that runs a module's tests on one thread."""

import contextlib

import pytest
import torch

# Tolerances against the eager reference. float32: the fused kernels reassociate sums and use their own
# exp, so allow a few ulps of the larger values; float64: rounding only.
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.float64: dict(atol=1e-10, rtol=1e-9),
}


def assert_close(actual, expected, dtype=None, **overrides):
    """torch.testing.assert_close with the dtype's tolerances; it reports how many elements mismatch, where."""
    tol = dict(TOLERANCES[dtype or expected.dtype])
    tol.update(overrides)
    torch.testing.assert_close(actual, expected, **tol)


def noncontiguous(t):
    """The same values as `t` in a non-contiguous tensor (every other element of a twice-as-wide buffer)."""
    if t.dim() == 0:
        return t.clone()
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    view = wide[..., ::2]
    view.copy_(t)
    return view


def check_loss_against_reference(op, reference, inputs, wrt, opts, grad_noncontiguous=False, **tol):
    """op(*inputs, **opts) against reference(*inputs, **opts): the values, then the gradients with respect to the
    inputs at positions `wrt` under one random upstream gradient (made non-contiguous if asked). NaNs must match.
    Each side gets its own leaves with the inputs' strides (clone() would make a strided view contiguous)."""

    def leaf(t):
        copy = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device).copy_(t.detach())
        return copy.requires_grad_()

    def fresh_leaves():
        return [leaf(t) if i in wrt else t for i, t in enumerate(inputs)]

    mine, theirs = fresh_leaves(), fresh_leaves()
    out = op(*mine, **opts)
    ref = reference(*theirs, **opts)
    assert out.shape == ref.shape
    assert_close(out, ref, equal_nan=True, **tol)
    grad = torch.randn_like(ref)
    if grad_noncontiguous:
        grad = noncontiguous(grad)
    got = torch.autograd.grad(out, [mine[i] for i in wrt], grad)
    want = torch.autograd.grad(ref, [theirs[i] for i in wrt], grad)
    for g, w in zip(got, want):
        assert_close(g, w, equal_nan=True, **tol)


@contextlib.contextmanager
def cpu_path(path):
    """Runs the block with the CPU kernels forced to `path` ("portable", "avx2" or "avx512"; on a CPU without that
    path the test is skipped), and puts "auto" back afterwards, whatever happens in the block."""
    try:
        torch.ops.fastmnist.set_cpu_path(path)
    except RuntimeError:
        pytest.skip(f"this CPU has no {path} path")
    try:
        yield
    finally:
        torch.ops.fastmnist.set_cpu_path("auto")


@contextlib.contextmanager
def num_threads(threads):
    """Runs the block on `threads` intra-op threads, and puts the previous count back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Import into a test module to run its tests on one intra-op thread."""
    # Tiny batches on a shared 2-core machine: two intra-op threads mostly wait for each other.
    with num_threads(1):
        yield

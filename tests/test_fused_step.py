"""fastmnist.fused_step against eager training: the same parameters and optimizer state after N steps."""

import copy
import math
import platform

import pytest
import torch
from torch import nn

import fastmnist
from fastmnist import models
from fastmnist.nn import FusedLinear
from helpers import num_threads

# Parity is judged norm-wise per parameter, ||fused - eager|| / ||eager||: float32 kernels round differently
# from eager's (the small-output kernels, the loss, the reductions), and Adam magnifies the difference
# element-wise on near-zero gradients, but the trajectories stay together (except across ReLU's kink: see
# assert_trains_like_eager).
PARITY = {torch.float32: 1e-5, torch.float64: 1e-11}
# The optimizer state holds gradient statistics; near a minimum a gradient is a sum with heavy cancellation, so
# its relative rounding error is larger than the parameters' (condition number times the dtype's epsilon).
STATE_PARITY = {torch.float32: 1e-3, torch.float64: 1e-9}
STEPS = 100

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, dampening=0.1),
    "sgd-nesterov-wd": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.8, nesterov=True, weight_decay=1e-3),
    "sgd-wd": lambda p: torch.optim.SGD(p, lr=0.05, weight_decay=1e-2),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    "adam-wd": lambda p: torch.optim.Adam(p, lr=1e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05),
}

# (model name, options); each trained on its own loss
MODELS = [
    ("mlp", {}),
    ("softmax", {}),
    ("twolayer", {}),
    ("classifier", {"hidden": "sigmoid", "loss": "mse"}),
    ("classifier", {"hidden": "sigmoid", "loss": "bce"}),
    ("classifier", {"hidden": "leaky_relu", "loss": "bce"}),
    ("classifier", {"hidden": "leaky_relu_layernorm", "loss": "bce"}),
    ("lenet", {}),
]


def make_pair(name, options, optimizer, dtype, seed=0):
    """The fused model + its fused step, and the eager model + loss + optimizer, from the same weights."""
    torch.manual_seed(seed)
    fused = models.create_model(name, "fused", **options).to(dtype)
    eager = models.create_model(name, "eager", **options).to(dtype)
    eager.load_state_dict(fused.state_dict())
    fused_opt = OPTIMIZERS[optimizer](fused.parameters())
    eager_opt = OPTIMIZERS[optimizer](eager.parameters())
    step = fastmnist.fused_step(fused, models.create_loss(name, "fused", **options), fused_opt)
    return fused, fused_opt, step, eager, eager_opt, models.create_loss(name, "eager", **options)


def make_batches(name, options, dtype, count=4, batch=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        x = torch.rand(batch, 1, 28, 28, generator=gen, dtype=dtype)
        y = torch.randint(0, 10, (batch,), generator=gen)
        if models.target_kind(name, **options) == "onehot":
            y = nn.functional.one_hot(y, 10).to(dtype)
        batches.append((x, y))
    return batches


def eager_step(model, loss_fn, optimizer, x, y, threads=1):
    """One eager step, by default single-threaded: eager's own result moves with the thread count (measured:
    8e-5 relative after 100 steps of the LayerNorm classifier between 1 and 2 threads, where the fused step
    moves 4e-8), so the reference is pinned to one thread."""
    with num_threads(threads):
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
    return loss.item()


def assert_parity(fused, eager, dtype, what=""):
    for (name, pf), pe in zip(fused.named_parameters(), eager.parameters()):
        error = ((pf - pe).norm() / pe.norm().clamp_min(1e-30)).item()
        assert error <= PARITY[dtype], f"{what}{name}: relative error {error:.2e} > {PARITY[dtype]:.0e}"


def assert_state_parity(fused_opt, eager_opt, dtype):
    for pf, pe in zip(fused_opt.param_groups[0]["params"], eager_opt.param_groups[0]["params"]):
        sf, se = fused_opt.state[pf], eager_opt.state[pe]
        assert set(sf) == set(se)
        for key in se:
            if torch.is_tensor(se[key]):
                assert sf[key].dtype == se[key].dtype and sf[key].shape == se[key].shape, key
                error = ((sf[key].double() - se[key].double()).norm() / se[key].double().norm().clamp_min(1e-30))
                assert error.item() <= STATE_PARITY[dtype], f"optimizer state {key}: relative error {error:.2e}"


def has_kinks(model):
    return any(isinstance(m, (nn.ReLU, nn.LeakyReLU)) for m in model.modules())


def assert_trains_like_eager(name, options, optimizer, dtype, batch=8, count=4):
    """STEPS fused and eager steps from the same weights over the same `count` batches: the first losses agree,
    and so do the parameters and the optimizer state at the end.

    A float32 ReLU or LeakyReLU network is compared step by step instead. Two float32 trajectories of such a
    network are equal to rounding only until a pre-activation lands within rounding of the kink at 0
    (measured: an mlp pre-activation of 3e-8 at step 68 of 100); there the two roundings may take different
    branches, both correct, and the trajectories part by ~1e-5 for good. So before each step the eager model and
    optimizer take the fused ones' state, and eager runs on the fused step's thread count: its forward GEMMs
    are then the very calls the fused step makes (the same bias-inside-GEMM addmm, bit for bit), so both take
    the same branches. The step's difference (fused - eager, from one state) is summed over the STEPS steps:
    a systematic error grows in that sum as it would along a trajectory, rounding noise only as its square
    root, and the sum is held to the trajectories' tolerance."""
    fused, fused_opt, step, eager, eager_opt, eager_loss = make_pair(name, options, optimizer, dtype)
    batches = make_batches(name, options, dtype, count=count, batch=batch)
    step_by_step = dtype == torch.float32 and has_kinks(eager)
    drift = [torch.zeros_like(p, dtype=torch.float64) for p in fused.parameters()]
    for i in range(STEPS):
        x, y = batches[i % len(batches)]
        if step_by_step:
            eager.load_state_dict(fused.state_dict())
            eager_opt.load_state_dict(copy.deepcopy(fused_opt.state_dict()))
        loss = step(x, y)
        eager_loss_value = eager_step(eager, eager_loss, eager_opt, x, y,
                                      threads=torch.get_num_threads() if step_by_step else 1)
        if i == 0:
            assert loss == pytest.approx(eager_loss_value, rel=1e-5)
        if step_by_step:
            for d, pf, pe in zip(drift, fused.parameters(), eager.parameters()):
                d += pf.detach().double() - pe.detach().double()
    if step_by_step:
        for (name_, pe), d in zip(eager.named_parameters(), drift):
            error = (d.norm() / pe.detach().double().norm().clamp_min(1e-30)).item()
            assert error <= PARITY[dtype], f"{name_}: relative drift {error:.2e} > {PARITY[dtype]:.0e}"
    else:
        assert_parity(fused, eager, dtype)
    assert_state_parity(fused_opt, eager_opt, dtype)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("name,options", MODELS, ids=[f"{n}-{'-'.join(o.values())}" for n, o in MODELS])
def test_parity_float32(name, options, optimizer):
    assert_trains_like_eager(name, options, optimizer, torch.float32)


@pytest.mark.parametrize("optimizer", ["sgd-nesterov-wd", "adam-wd", "adamw"])
@pytest.mark.parametrize("name,options", MODELS, ids=[f"{n}-{'-'.join(o.values())}" for n, o in MODELS])
def test_parity_float64(name, options, optimizer):
    assert_trains_like_eager(name, options, optimizer, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("optimizer", ["sgd-momentum", "sgd-nesterov-wd", "adam-wd", "adamw"])
@pytest.mark.parametrize("name,options", MODELS, ids=[f"{n}-{'-'.join(o.values())}" for n, o in MODELS])
def test_parity_batch_one(name, options, optimizer, dtype):
    """At batch 1 a linear layer's weight gradient is an outer product, formed inside the optimizer update."""
    assert_trains_like_eager(name, options, optimizer, dtype, batch=1, count=7)


# A cross-entropy head (a last linear layer with few outputs, no activation) runs in row chunks of 128, its weight
# gradient summed chunk by chunk: 150 rows make a whole chunk and a partial one.
@pytest.mark.parametrize("name,optimizer,dtype", [("softmax", "sgd-momentum", torch.float32),
                                                  ("softmax", "adam", torch.float64),
                                                  ("twolayer", "sgd", torch.float32),
                                                  ("mlp", "sgd-nesterov-wd", torch.float64)])
def test_parity_head_in_row_chunks(name, optimizer, dtype):
    assert_trains_like_eager(name, {}, optimizer, dtype, batch=150, count=2)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("optimizer", ["sgd-momentum", "adam-wd"])
def test_update_split_mid_row_across_threads(optimizer, batch):
    """An update of more than 2^18 elements is split across the threads, here in the middle of a row: 784 x 1001
    weights at element 392,392 (row 500, column 392) and 1001 x 263 at 131,632 (row 131, column 501). At batch 1
    the gradient is the outer product formed inside the update, row by row (rows of x scaled per output), so the
    split cuts a scaled row, and the first thread's part of row 131 ends in a partial vector."""
    dtype = torch.float64  # no kinks (sigmoid), parity to float64 rounding
    torch.manual_seed(3)
    fused = nn.Sequential(nn.Flatten(), FusedLinear(784, 1001, activation="sigmoid"),
                          FusedLinear(1001, 263, activation="sigmoid"),
                          FusedLinear(263, 10, activation="identity")).to(dtype)
    eager = nn.Sequential(nn.Flatten(), nn.Linear(784, 1001), nn.Sigmoid(), nn.Linear(1001, 263), nn.Sigmoid(),
                          nn.Linear(263, 10)).to(dtype)
    with torch.no_grad():
        for pe, pf in zip(eager.parameters(), fused.parameters()):
            pe.copy_(pf)
    fused_opt, eager_opt = OPTIMIZERS[optimizer](fused.parameters()), OPTIMIZERS[optimizer](eager.parameters())
    step = fastmnist.fused_step(fused, fastmnist.nn.SoftmaxCrossEntropyLoss(), fused_opt)
    batches = make_batches("mlp", {}, dtype, count=3, batch=batch)
    with num_threads(2):
        for i in range(12):
            x, y = batches[i % len(batches)]
            step(x, y)
            eager_step(eager, nn.CrossEntropyLoss(), eager_opt, x, y)
    assert_parity(fused, eager, dtype)
    assert_state_parity(fused_opt, eager_opt, dtype)


def test_softmax_step_is_independent_of_the_thread_count():
    """Every sum of softmax regression's step is taken in an order fixed by the batch size alone (the head's row
    chunks, the bias gradient's row chunks), so one and two threads give the same parameters bit for bit. (Models
    with a layer on BLAS are not: MKL's sums depend on the thread count.)"""
    name = "softmax"
    (x, y), = make_batches(name, {}, torch.float32, count=1, batch=150)
    index = torch.randperm(150, generator=torch.Generator().manual_seed(5))
    results = []
    for threads in (1, 2):
        fused, _, step, *_ = make_pair(name, {}, "adam", torch.float32)
        with num_threads(threads):
            losses = [step(x, y), step(x, y, index=index), step(x[:100], y[:100])]
        results.append((losses, [p.detach().clone() for p in fused.parameters()]))
    (losses_1, params_1), (losses_2, params_2) = results
    assert losses_1 == losses_2
    assert all(torch.equal(a, b) for a, b in zip(params_1, params_2))


@pytest.mark.parametrize("optimizer", ["sgd-momentum", "adam"])
def test_mixing_fused_and_eager_steps_with_state_save_and_load(optimizer):
    """Alternate fused and eager steps on one model; save the optimizer state midway and load it into a fresh
    optimizer; the result tracks a purely eager run."""
    dtype = torch.float64
    name, options = "classifier", {"hidden": "leaky_relu_layernorm", "loss": "bce"}
    fused, fused_opt, step, eager, eager_opt, eager_loss = make_pair(name, options, optimizer, dtype)
    fused_loss = models.create_loss(name, "fused", **options)
    batches = make_batches(name, options, dtype)
    for i in range(40):
        x, y = batches[i % len(batches)]
        if i == 20:
            saved = fused_opt.state_dict()
            fused_opt = OPTIMIZERS[optimizer](fused.parameters())
            fused_opt.load_state_dict(saved)
            step = fastmnist.fused_step(fused, fused_loss, fused_opt)
        if i % 3 == 1:
            eager_step(fused, fused_loss, fused_opt, x, y)  # an ordinary autograd step on the fused model
        else:
            step(x, y)
        eager_step(eager, eager_loss, eager_opt, x, y)
    assert_parity(fused, eager, dtype)
    assert_state_parity(fused_opt, eager_opt, dtype)


@pytest.mark.filterwarnings("error::UserWarning")
def test_scheduler_changes_the_learning_rate():
    dtype = torch.float64
    fused, fused_opt, step, eager, eager_opt, eager_loss = make_pair("twolayer", {}, "sgd-momentum", dtype)
    fused_sched = torch.optim.lr_scheduler.StepLR(fused_opt, step_size=5, gamma=0.3)
    eager_sched = torch.optim.lr_scheduler.StepLR(eager_opt, step_size=5, gamma=0.3)
    batches = make_batches("twolayer", {}, dtype)
    for i in range(20):
        x, y = batches[i % len(batches)]
        step(x, y)
        eager_step(eager, eager_loss, eager_opt, x, y)
        fused_sched.step()  # no warning about stepping the scheduler before the optimizer
        eager_sched.step()
    assert fused_opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.3**4)
    assert_parity(fused, eager, dtype)
    # and the learning rate did matter: a run without the scheduler ends elsewhere
    other, other_opt, other_step, *_ = make_pair("twolayer", {}, "sgd-momentum", dtype)
    for i in range(20):
        other_step(*batches[i % len(batches)])
    assert not torch.allclose(other.fc1.weight, fused.fc1.weight)


def test_logits_and_loss_of_the_step():
    torch.manual_seed(3)
    fused, fused_opt, step, eager, eager_opt, eager_loss = make_pair("mlp", {}, "sgd", torch.float64)
    x, y = make_batches("mlp", {}, torch.float64, count=1)[0]
    with torch.no_grad():
        expected_logits = eager(x)
        expected_loss = eager_loss(expected_logits, y).item()
    loss = step(x, y)
    assert loss == pytest.approx(expected_loss, rel=1e-12)
    torch.testing.assert_close(step.logits, expected_logits)


def test_batch_sizes_change_between_steps():
    fused, fused_opt, step, eager, eager_opt, eager_loss = make_pair("twolayer", {}, "adam", torch.float64)
    gen = torch.Generator().manual_seed(4)
    for batch in (5, 1, 7, 5, 1):
        x = torch.rand(batch, 1, 28, 28, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 10, (batch,), generator=gen)
        step(x, y)
        eager_step(eager, eager_loss, eager_opt, x, y)
    assert_parity(fused, eager, torch.float64)


@pytest.mark.parametrize("batch", [8, 150])  # one row chunk of the fused head, and two
def test_ignored_targets_match_eager(batch):
    fused, fused_opt, step, eager, eager_opt, eager_loss = make_pair("softmax", {}, "sgd", torch.float64)
    x, y = make_batches("softmax", {}, torch.float64, count=1, batch=batch)[0]
    y[::3] = -100
    y[128:148] = -100  # the second chunk mostly ignored: the mean still divides by the whole batch's kept rows
    for _ in range(5):
        step(x, y)
        eager_step(eager, eager_loss, eager_opt, x, y)
    assert_parity(fused, eager, torch.float64)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="subnormals are flushed on x86 only")
@pytest.mark.parametrize("optimizer", ["adam", "sgd-momentum"])
def test_update_flushes_subnormal_state(optimizer):
    """The optimizer update flushes subnormals to zero (on x86 each one costs a microcode assist): optimizer state
    that decays into the subnormal range (gradient 0: an input pixel that is always 0) never holds a subnormal,
    where eager's does; the parameters still match eager, and the caller's threads keep their floating-point mode.
    Adam's first moment becomes 0 where the compiler contracts its lerp into one FMA (0.9 * tiny, flushed), and
    stays at tiny where it does not (an -O0 build: the step (0 - tiny) * 0.1 is flushed); both are flushes."""
    dtype = torch.float32
    fused, fused_opt, step, eager, eager_opt, eager_loss = make_pair("softmax", {}, optimizer, dtype)
    (x, y), = make_batches("softmax", {}, dtype, count=1)
    x[..., 0, 0] = 0  # input 0 is 0 in every row: column 0 of the weight gradient is exactly 0
    step(x, y)
    eager_step(eager, eager_loss, eager_opt, x, y)
    key = "exp_avg" if optimizer == "adam" else "momentum_buffer"
    smallest_normal = torch.finfo(dtype).tiny
    for opt in (fused_opt, eager_opt):
        opt.state[opt.param_groups[0]["params"][0]][key][:, 0] = smallest_normal
    step(x, y)
    eager_step(eager, eager_loss, eager_opt, x, y)
    decayed_eager = eager_opt.state[eager.fc1.weight][key][:, 0]
    assert ((decayed_eager > 0) & (decayed_eager < smallest_normal)).all()  # eager: subnormal
    decayed_fused = fused_opt.state[fused.fc1.weight][key][:, 0]
    assert ((decayed_fused == 0) | (decayed_fused == smallest_normal)).all()
    if optimizer == "sgd-momentum":  # 0.9 * tiny, no sum: flushed with or without contraction
        assert (decayed_fused == 0).all()
    assert_parity(fused, eager, dtype)
    assert torch.tensor([smallest_normal], dtype=dtype).mul(0.5).item() > 0  # the mode was restored
    assert torch.full((1 << 16,), smallest_normal, dtype=dtype).mul(0.5).gt(0).all()  # in the thread pool too


@pytest.mark.parametrize("name,options", MODELS, ids=[f"{n}-{'-'.join(o.values())}" for n, o in MODELS])
def test_nan_input_gives_a_nan_loss_as_in_eager(name, options):
    """One NaN pixel: eager's loss is NaN for every model, and so is the fused step's (the relu, sigmoid and
    tanh kernels had turned the NaN into a number, and the step went on with a finite loss)."""
    _, _, step, eager, eager_opt, eager_loss = make_pair(name, options, "sgd", torch.float32)
    (x, y), = make_batches(name, options, torch.float32, count=1)
    x[2, 0, 14, 14] = float("nan")
    assert math.isnan(eager_step(eager, eager_loss, eager_opt, x, y))
    assert math.isnan(step(x, y))


# ---- what cannot be fused is refused, naming the part ----

def test_rejects_unsupported_layers():
    model = nn.Sequential(nn.Flatten(), FusedLinear(784, 10), nn.Dropout(0.1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(fastmnist.FusionError, match=r"layer '2' \(Dropout\) is not supported"):
        fastmnist.fused_step(model, nn.CrossEntropyLoss(), opt)
    eager = models.create_model("mlp", "eager")
    with pytest.raises(fastmnist.FusionError, match=r"layer 'fc1' \(Linear\) is not supported"):
        fastmnist.fused_step(eager, nn.CrossEntropyLoss(), torch.optim.SGD(eager.parameters(), lr=0.1))
    with pytest.raises(fastmnist.FusionError, match=r"Flatten\(start_dim=1, end_dim=-1\)"):
        fastmnist.fused_step(nn.Sequential(nn.Flatten(0), FusedLinear(4, 2)), nn.CrossEntropyLoss(),
                             torch.optim.SGD([p for p in FusedLinear(4, 2).parameters()], lr=0.1))


def test_rejects_unsupported_losses_and_optimizers():
    model = models.create_model("softmax", "fused")

    def attempt(loss_fn, optimizer):
        return fastmnist.fused_step(model, loss_fn, optimizer)

    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(fastmnist.FusionError, match="loss CrossEntropyLoss: only the defaults"):
        attempt(nn.CrossEntropyLoss(label_smoothing=0.1), sgd)
    with pytest.raises(fastmnist.FusionError, match="loss NLLLoss is not supported"):
        attempt(nn.NLLLoss(), sgd)
    with pytest.raises(fastmnist.FusionError, match="optimizer RMSprop is not supported"):
        attempt(nn.CrossEntropyLoss(), torch.optim.RMSprop(model.parameters()))
    with pytest.raises(fastmnist.FusionError, match="amsgrad=True is not supported"):
        attempt(nn.CrossEntropyLoss(), torch.optim.Adam(model.parameters(), amsgrad=True))
    with pytest.raises(fastmnist.FusionError, match="maximize=True is not supported"):
        attempt(nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.1, maximize=True))
    with pytest.raises(fastmnist.FusionError, match="only one parameter group"):
        attempt(nn.CrossEntropyLoss(), torch.optim.SGD([{"params": [model.fc1.weight]},
                                                        {"params": [model.fc1.bias], "lr": 0.01}], lr=0.1))
    with pytest.raises(fastmnist.FusionError, match="exactly the model's parameters"):
        attempt(nn.CrossEntropyLoss(), torch.optim.SGD([model.fc1.weight], lr=0.1))


def test_rejects_bad_batches():
    model = models.create_model("softmax", "fused")
    step = fastmnist.fused_step(model, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.1))
    x = torch.rand(4, 1, 28, 28)
    # the loss ops' own target check, and its exception type (eager's too)
    before = [p.detach().clone() for p in model.parameters()]
    for bad in (10, -5):
        with pytest.raises(IndexError, match=rf"fused_step: target {bad} is out of bounds: .* \[0, 10\)"):
            step(x, torch.tensor([0, 1, bad, 2]))
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters())), \
        "a refused step must not touch the parameters"
    with pytest.raises(RuntimeError, match="int64 class indices of shape"):
        step(x, torch.tensor([0.0, 1.0, 2.0, 3.0]))
    with pytest.raises(RuntimeError, match="x must have the model's dtype"):
        step(x.double(), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(RuntimeError, match="target must be on the CPU, as x is, got meta"):
        step(x, torch.tensor([0, 1, 2, 3], device="meta"))
    with pytest.raises(RuntimeError, match="expects 784 input features"):
        step(torch.rand(4, 1, 20, 20), torch.tensor([0, 1, 2, 3]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 7, 16])
@pytest.mark.parametrize("name,options", MODELS, ids=[f"{n}-{'-'.join(o.values())}" for n, o in MODELS])
def test_indexed_step_equals_the_gathered_batch(name, options, batch, dtype):
    """step(x_all, target_all, index=idx) gathers inside the step (softmax and twolayer read the rows in place):
    the same losses and parameters, bit for bit, as step(x_all[idx], target_all[idx])."""
    (x_all, y_all), = make_batches(name, options, dtype, count=1, batch=40)
    gen = torch.Generator().manual_seed(2)
    indices = [torch.randint(0, 40, (batch,), generator=gen) for _ in range(5)]  # unsorted, with repeats
    indices.append((torch.arange(2 * batch, 0, -1) - 1)[::2])  # a non-contiguous index
    assert batch == 1 or not indices[-1].is_contiguous()
    gathered = make_pair(name, options, "sgd-momentum", dtype)
    indexed = make_pair(name, options, "sgd-momentum", dtype)
    y_strided = torch.stack([y_all, torch.zeros_like(y_all)], dim=1)[:, 0]  # the targets as a non-contiguous view
    assert not y_strided.is_contiguous()
    for i, idx in enumerate(indices):
        loss = gathered[2](x_all.index_select(0, idx), y_all.index_select(0, idx))
        assert indexed[2](x_all, y_all if i % 2 else y_strided, index=idx) == loss
        assert torch.equal(indexed[2].logits, gathered[2].logits)
    for (name_, p_gathered), p_indexed in zip(gathered[0].named_parameters(), indexed[0].parameters()):
        assert torch.equal(p_gathered, p_indexed), name_


@pytest.mark.parametrize("name", ["softmax", "mlp"])  # the batch read in place, and gathered into a buffer
def test_rejects_bad_indices(name):
    model = models.create_model(name, "fused")
    step = fastmnist.fused_step(model, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = torch.rand(6, 1, 28, 28), torch.randint(0, 10, (6,))
    before = [p.detach().clone() for p in model.parameters()]
    for bad in (6, -1):
        with pytest.raises(RuntimeError, match=rf"index out of range: index\[1\] = {bad}, x has 6 rows"):
            step(x, y, index=torch.tensor([0, bad, 2]))
    with pytest.raises(RuntimeError, match="index must be a 1-D int64 CPU tensor"):
        step(x, y, index=torch.tensor([0.0, 1.0]))
    with pytest.raises(RuntimeError, match="index must be a 1-D int64 CPU tensor"):
        step(x, y, index=torch.tensor([[0, 1]]))
    with pytest.raises(RuntimeError, match="index selects no rows"):
        step(x, y, index=torch.tensor([], dtype=torch.long))
    with pytest.raises(RuntimeError, match="x .all rows. must be contiguous"):
        step(x.transpose(2, 3), y, index=torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="the same number of rows, got 6 and"):
        step(x, y[:5], index=torch.tensor([0, 1]))
    # a target on another device, contiguous or strided (the gather read its data pointer: a crash)
    for target in (y.to("meta"), torch.stack([y, y], dim=1).to("meta")[:, 0]):
        with pytest.raises(RuntimeError, match="target must be on the CPU, as x is, got meta"):
            step(x, target, index=torch.tensor([0, 1]))
    with pytest.raises(IndexError, match="target 10 is out of bounds"):
        step(x, torch.tensor([0, 10, 0, 0, 0, 0]), index=torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="int64 class indices"):
        step(x, y.float(), index=torch.tensor([0, 1]))
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters())), \
        "a refused step must not touch the parameters"
    step(x, y, index=torch.tensor([0, 1]))  # and the step still runs after the errors
    assert not all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


class _MarkedTensor(torch.Tensor):
    """A tensor subclass: not the plain kind of argument fastmnist._C.fused_step takes."""


def test_direct_call_and_method_call_agree():
    """A step runs through fastmnist._C.fused_step; arguments it does not take (a tensor subclass) go through the
    custom class's TorchScript method instead: the same numbers either way."""
    from fastmnist import _C

    direct = make_pair("twolayer", {}, "sgd-momentum", torch.float32)
    method = make_pair("twolayer", {}, "sgd-momentum", torch.float32)
    batches = make_batches("twolayer", {}, torch.float32)
    x, y = batches[0]
    assert _C.fused_step(object(), x, y, None, 0.1) is NotImplemented
    assert _C.fused_step(direct[2]._impl, x.as_subclass(_MarkedTensor), y, None, 0.1) is NotImplemented
    assert _C.fused_step(direct[2]._impl, x, y, None, "0.1") is NotImplemented
    for x, y in batches:
        assert direct[2](x, y) == method[2](x.as_subclass(_MarkedTensor), y)
    for (name, p_direct), p_method in zip(direct[0].named_parameters(), method[0].parameters()):
        assert torch.equal(p_direct, p_method), name
    with pytest.raises(RuntimeError, match="x must have the model's dtype"):  # errors come through as from the method
        _C.fused_step(direct[2]._impl, x.double(), y, None, 0.1)

"""The training loop, evaluation, plots, and state_dict round trips between the two backends."""

import math

import pytest
import torch
from PIL import Image
from torch import nn

import fastmnist
import fastmnist.nn as fnn
from fastmnist import data, models, plots
from fastmnist.data import iterate_batches
from fastmnist.fused_step import FusedStep, fused_step
from fastmnist.train import History, eager_step, evaluate, fit, make_targets
from helpers import assert_close, one_thread  # noqa: F401 (one_thread: autouse fixture)


@pytest.fixture(scope="module")
def sample():
    return data.load_dataset("mnist", None, log=None)


def missing_fused_parts(name, options=None):
    """The fastmnist.nn classes the fused build of model `name` needs and this tree lacks (they land from other
    branches); empty when the fused model and loss can be built."""
    options = options or {}
    needed = ["SoftmaxCrossEntropyLoss"] if name != "classifier" else []
    if name == "classifier" and options.get("loss", "bce") == "bce":
        needed.append("SigmoidBCELoss")
    if name == "lenet":
        needed.append("ConvActPool2d")
    return [n for n in needed if not hasattr(fnn, n)]


def require_fused(name, options=None, loss=True):
    missing = [m for m in missing_fused_parts(name, options) if loss or not m.endswith("Loss")]
    if missing:
        pytest.skip(f"fused {name} needs fastmnist.nn.{', fastmnist.nn.'.join(missing)}, not on this branch yet")


# ---- the loop itself, with a recording step -------------------------------------------------------------------

class RecordingStep:
    """A stand-in fused step: records the sample ids it sees (x holds the id in every pixel), returns the batch's
    mean id as its loss, and 'predicts' the true class for even ids and class (y + 1) % 10 for odd ones."""

    def __init__(self):
        self.batches, self.targets, self.logits = [], [], None

    def __call__(self, x, target):
        ids = x[:, 0, 0, 0].round().long()
        self.batches.append(ids.tolist())
        self.targets.append(target)
        y = self.labels[ids]
        predicted = torch.where(ids % 2 == 0, y, (y + 1) % 10)
        self.logits = nn.functional.one_hot(predicted, 10).float()
        return float(ids.double().mean())


def id_images(n):
    return torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1).expand(n, 1, 28, 28).contiguous()


@pytest.mark.parametrize("target_kind", ["index", "onehot"])
def test_fit_visits_every_sample_once_per_epoch_and_averages(target_kind):
    n, batch_size, epochs = 103, 16, 3
    generator = torch.Generator().manual_seed(5)
    x, y = id_images(n), torch.randint(0, 10, (n,), generator=generator)
    step = RecordingStep()
    step.labels = y
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    lines = []
    history = fit(model, None, None, (x, y), (x[:20], y[:20]), epochs=epochs, batch_size=batch_size,
                  target_kind=target_kind, step=step, seed=7, progress=False, log=lines.append)
    per_epoch = -(-n // batch_size)
    assert len(step.batches) == epochs * per_epoch
    orders = []
    for e in range(epochs):
        batches = step.batches[e * per_epoch:(e + 1) * per_epoch]
        assert [len(b) for b in batches] == [batch_size] * (n // batch_size) + [n % batch_size]
        order = sum(batches, [])
        assert sorted(order) == list(range(n))
        orders.append(order)
    assert orders[0] != orders[1], "batches must be reshuffled every epoch"
    for ids, target in zip(step.batches, step.targets):
        expected = y[ids]
        if target_kind == "onehot":
            assert target.dtype == torch.float32 and target.shape == (len(ids), 10)
            assert torch.equal(target.argmax(1), expected) and torch.equal(target.sum(1), torch.ones(len(ids)))
        else:
            assert torch.equal(target, expected)
    # the loss is the sample-weighted mean of the batch losses (mean id); train accuracy from step.logits
    assert [e.epoch for e in history.epochs] == [1, 2, 3]
    for result in history.epochs:
        assert result.loss == pytest.approx((n - 1) / 2)
        assert result.train_acc == pytest.approx(((n + 1) // 2) / n)
        assert result.seconds >= 0
    assert len(lines) == epochs and lines[1].startswith("epoch 2/3  loss ")
    assert "train acc" in lines[1] and "test acc" in lines[1] and lines[1].endswith(" s")
    # the same seed gives the same batch order
    again = RecordingStep()
    again.labels = y
    fit(model, None, None, (x, y), (x[:20], y[:20]), epochs=1, batch_size=batch_size, step=again, seed=7,
        progress=False, log=None)
    assert sum(again.batches, []) == orders[0]


@pytest.mark.parametrize("name", ["softmax", "twolayer", "classifier", "lenet"])
def test_fit_hands_the_fused_step_row_numbers(name, monkeypatch):
    """fit gives a fastmnist fused step the whole training set and each batch's rows (index=): the parameters
    come out bit for bit as from the step on the batches that iterate_batches gathers with the same seed."""
    calls = []
    original = FusedStep.__call__

    def recording(self, x, target, index=None):
        calls.append(index is not None and len(x) == 50)
        return original(self, x, target, index=index)

    monkeypatch.setattr(FusedStep, "__call__", recording)
    x, y = torch.rand(50, 1, 28, 28), torch.randint(0, 10, (50,))
    kind = models.target_kind(name)
    trained = []
    for through_fit in (True, False):
        torch.manual_seed(0)
        model = models.create_model(name, "fused")
        step = fused_step(model, models.create_loss(name, "fused"), models.create_optimizer(name, model.parameters()))
        if through_fit:
            fit(model, None, None, (x, y), (x[:10], y[:10]), epochs=2, batch_size=16, target_kind=kind, step=step,
                seed=3, progress=False, log=None)
            assert calls == [True] * 8, "fit must hand the fused step row numbers"
        else:
            generator = torch.Generator().manual_seed(3)
            for _ in range(2):
                for xb, yb in iterate_batches(x, y, 16, shuffle=True, generator=generator):
                    step(xb, make_targets(yb, kind))
        trained.append(model)
    for (param_name, a), b in zip(trained[0].named_parameters(), trained[1].parameters()):
        assert torch.equal(a, b), param_name


def test_fit_without_logits_reports_nan_train_accuracy():
    def step(x, target):
        return 1.0

    x, y = id_images(10), torch.zeros(10, dtype=torch.int64)
    history = fit(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), None, None, (x, y), (x, y), 1, 4, step=step,
                  progress=False, log=None)
    assert math.isnan(history.final.train_acc) and history.final.loss == 1.0


def test_fit_stops_on_a_non_finite_loss():
    x, y = id_images(8), torch.zeros(8, dtype=torch.int64)
    with pytest.raises(FloatingPointError, match="training loss is nan in epoch 1"):
        fit(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), None, None, (x, y), (x, y), 2, 4,
            step=lambda x, t: math.nan, progress=False, log=None)


def test_fit_rejects_bad_arguments():
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    x, y = id_images(8), torch.zeros(8, dtype=torch.int64)
    args = dict(progress=False, log=None)
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        fit(model, None, None, (x, y), (x, y), 0, 4, **args)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        fit(model, None, None, (x, y), (x, y), 1, 2.5, **args)
    with pytest.raises(ValueError, match="target_kind must be one of"):
        fit(model, None, None, (x, y), (x, y), 1, 4, target_kind="soft", **args)
    with pytest.raises(ValueError, match="train must hold the same positive number"):
        fit(model, None, None, (x, y[:5]), (x, y), 1, 4, **args)
    with pytest.raises(TypeError, match="test must be a pair of tensors"):
        fit(model, None, None, (x, y), x, 1, 4, **args)
    with pytest.raises(TypeError, match="step must be callable"):
        fit(model, None, None, (x, y), (x, y), 1, 4, step=3, **args)


def test_eager_step_matches_a_manual_step():
    torch.manual_seed(0)
    a, b = nn.Linear(784, 10), nn.Linear(784, 10)
    b.load_state_dict(a.state_dict())
    x, y = torch.rand(6, 784), torch.randint(0, 10, (6,))
    step = eager_step(a, nn.CrossEntropyLoss(), torch.optim.SGD(a.parameters(), lr=0.5))
    loss = step(x, y)
    logits = b(x)
    expected = nn.functional.cross_entropy(logits, y)
    expected.backward()
    with torch.no_grad():
        for p in b.parameters():
            p -= 0.5 * p.grad
    assert_close(loss, expected.detach())
    assert_close(step.logits, logits.detach())
    assert_close(a.weight.detach(), b.weight.detach())


def test_make_targets():
    y = torch.tensor([3, 0, 9])
    assert make_targets(y, "index") is y
    onehot = make_targets(y, "onehot", torch.float64)
    assert onehot.dtype == torch.float64 and onehot.shape == (3, 10)
    assert torch.equal(onehot.argmax(1), y) and onehot.sum().item() == 3


def test_evaluate_matches_argmax_and_restores_the_mode():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.Dropout(0.5))
    x, y = torch.rand(37, 1, 28, 28), torch.randint(0, 10, (37,))
    model.train()
    accuracy, predictions = evaluate(model, x, y, batch_size=8)
    assert model.training
    with torch.no_grad():
        expected = model.eval()(x).argmax(1)
    assert torch.equal(predictions, expected)
    assert accuracy == pytest.approx((expected == y).double().mean().item())
    with pytest.raises(ValueError, match="no images"):
        evaluate(model, x[:0], y[:0])


# ---- a short run per model and backend, on the bundled sample --------------------------------------------------

# (limit, epochs, batch_size, optimizer, lr, minimum test accuracy): the recipe where a few seconds of it already
# learn (softmax, classifier); else Adam, which gets the deeper models off the ground within one short epoch.
SHORT_RUNS = {
    "mlp": (2000, 1, 64, "adam", 1e-3, 0.5),
    "twolayer": (2000, 1, 20, "adam", 3e-3, 0.5),
    "softmax": (2000, 1, None, None, None, 0.5),
    "classifier": (400, 1, None, None, None, 0.5),
}


def short_run(name, backend, sample, epochs=None, loss_backend=None, use_fused_step=False, **options):
    limit, run_epochs, batch_size, optimizer, lr, _ = SHORT_RUNS[name]
    torch.manual_seed(0)
    model = models.create_model(name, backend, **options)
    loss_fn = models.create_loss(name, loss_backend or backend, **options)
    opt = models.create_optimizer(name, model.parameters(), optimizer, lr)
    x, y = sample.train.take(limit).tensors(flatten=False)
    step = fastmnist.fused_step(model, loss_fn, opt) if use_fused_step else None
    history = fit(model, loss_fn, opt, (x, y), sample.test.tensors(flatten=False), epochs or run_epochs,
                  batch_size or models.RECIPES[name].batch_size, models.target_kind(name, **options),
                  step=step, progress=False, log=None)
    return model, history


@pytest.mark.parametrize("backend", models.BACKENDS)
@pytest.mark.parametrize("name", sorted(SHORT_RUNS))
def test_short_run_learns(name, backend, sample):
    if backend == "fused":
        require_fused(name)
    minimum = SHORT_RUNS[name][-1]
    _, history = short_run(name, backend, sample)
    final = history.final
    assert math.isfinite(final.loss)
    assert final.test_acc > minimum, f"{name}/{backend}: test accuracy {final.test_acc:.3f} after a short run"
    assert final.train_acc > 0.3
    assert len(history.predictions) == len(sample.test)


@pytest.mark.parametrize("name", sorted(SHORT_RUNS))
def test_short_run_with_the_fused_step_learns(name, sample):
    if not hasattr(fastmnist, "fused_step"):
        pytest.skip("fastmnist.fused_step is not on this branch yet")
    require_fused(name)
    _, history = short_run(name, "fused", sample, use_fused_step=True)
    assert history.final.test_acc > SHORT_RUNS[name][-1]
    assert history.final.train_acc > 0.3  # from step.logits


@pytest.mark.parametrize("name", sorted(SHORT_RUNS))
def test_fused_layers_with_the_torch_loss_learn(name, sample):
    # the fused model under autograd with torch.nn's loss: runs wherever the fused layers exist
    _, history = short_run(name, "fused", sample, loss_backend="eager")
    assert history.final.test_acc > SHORT_RUNS[name][-1]


@pytest.mark.parametrize("backend", models.BACKENDS)
def test_short_lenet_run_lowers_the_loss(backend, sample):
    # Sigmoid LeNet sits near chance for its first epochs (the tutorial needs ~10 full epochs), so a short run
    # can only show that the loop trains it: the loss on its training images goes down and stays finite.
    if backend == "fused":
        require_fused("lenet")
    torch.manual_seed(0)
    model = models.create_model("lenet", backend)
    loss_fn = models.create_loss("lenet", backend)
    x, y = sample.train.take(256).tensors(flatten=False)
    with torch.no_grad():
        before = loss_fn(model(x), y).item()
    history = fit(model, loss_fn, models.create_optimizer("lenet", model.parameters(), "adam", 1e-2), (x, y),
                  (x, y), 6, 32, progress=False, log=None)
    with torch.no_grad():
        after = loss_fn(model(x), y).item()
    assert all(math.isfinite(e.loss) for e in history.epochs)
    assert after < before - 0.02, f"lenet/{backend}: loss {before:.4f} -> {after:.4f}"


@pytest.mark.parametrize("options", [dict(hidden="sigmoid", loss="mse"), dict(hidden="leaky_relu", loss="bce")])
def test_classifier_variants_learn(options, sample):
    _, history = short_run("classifier", "eager", sample, **options)
    assert history.final.test_acc > 0.5


# ---- state_dict round trips ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", models.MODELS)
def test_state_dict_round_trips_between_backends(name):
    require_fused(name, loss=False)
    torch.manual_seed(3)
    eager, fused = models.create_model(name, "eager"), models.create_model(name, "fused")
    assert list(eager.state_dict()) == list(fused.state_dict())
    x = torch.rand(5, 1, 28, 28)
    fused.load_state_dict(eager.state_dict())
    with torch.no_grad():
        assert_close(fused(x), eager(x))
    torch.manual_seed(4)
    eager2 = models.create_model(name, "eager")
    fused2 = models.create_model(name, "fused")
    eager2.load_state_dict(fused2.state_dict())
    with torch.no_grad():
        assert_close(eager2(x), fused2(x))


# ---- plots -----------------------------------------------------------------------------------------------------

def assert_png(path):
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 100 and img.height > 100


def test_confusion_matrix_counts():
    generator = torch.Generator().manual_seed(2)
    y_true, y_pred = torch.randint(0, 10, (500,), generator=generator), torch.randint(0, 10, (500,),
                                                                                        generator=generator)
    counts = plots.confusion_matrix(y_true, y_pred)
    expected = torch.zeros(10, 10, dtype=torch.int64)
    for t, p in zip(y_true.tolist(), y_pred.tolist()):
        expected[t, p] += 1
    assert torch.equal(counts, expected)
    with pytest.raises(ValueError, match="labels but"):
        plots.confusion_matrix(y_true, y_pred[:10])


def test_plots_write_pngs(tmp_path, sample):
    history = History([])
    with pytest.raises(ValueError, match="empty history"):
        plots.plot_curves(history.epochs, tmp_path / "none.png")
    rows = [dict(epoch=e, loss=1 / e, train_acc=0.5 + e / 10, test_acc=0.4 + e / 10, seconds=1.0) for e in (1, 2, 3)]
    assert_png(plots.plot_curves(rows, tmp_path / "curves.png", title="t"))
    x, y = sample.test.tensors(flatten=False)
    predicted = y.roll(1)
    assert_png(plots.plot_confusion(y, predicted, data.MNIST_CLASSES, tmp_path / "sub" / "confusion.png"))
    assert_png(plots.plot_image_grid(x[:10], y[:10], predicted[:10], data.FASHION_MNIST_CLASSES,
                                     tmp_path / "grid.png", columns=4))
    with pytest.raises(ValueError, match="same positive number"):
        plots.plot_image_grid(x[:10], y[:9], predicted[:10], data.MNIST_CLASSES, tmp_path / "bad.png")

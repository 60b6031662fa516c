"""spkern.lightning.SpkernCallback: the tracker in a lightning.Trainer, measured after the
optimizer step, written to the module's loggers, its state in Lightning's checkpoints."""

import math

import pytest
import torch
import torch.nn.functional as F

L = pytest.importorskip("lightning")
import spkern.lightning  # noqa: E402
from lightning.pytorch.loggers import Logger  # noqa: E402


class Net(L.LightningModule):
    def __init__(self, lr=0.2):
        super().__init__()
        self.lr = lr
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, i):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class Memory(Logger):
    """A logger that keeps what it is given."""

    def __init__(self):
        super().__init__()
        self.logged = {}

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        if any(k.startswith("spkern/") for k in metrics):
            self.logged[step] = dict(metrics)


def _data(rows=24):
    g = torch.Generator().manual_seed(1)
    ds = torch.utils.data.TensorDataset(torch.randn(rows, 10, generator=g), torch.randint(0, 5, (rows,), generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=8)


def _fit(callback, logger, max_steps, ckpt_path=None, rows=24, lr=0.2, **kw):
    trainer = L.Trainer(max_steps=max_steps, callbacks=[callback], logger=logger, accelerator="cpu",
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, **kw)
    trainer.fit(Net(lr), _data(rows), ckpt_path=ckpt_path)
    return trainer


def test_measures_after_the_step_and_writes_to_the_loggers():
    callback, logger = spkern.lightning.SpkernCallback(), Memory()
    trainer = _fit(callback, logger, 4, log_every_n_steps=2, accumulate_grad_batches=2)
    t = callback.tracker
    assert t.steps == trainer.global_step == 4 and list(logger.logged) == [2, 4]
    want = {"spkern/" + spkern.monitor.log.tag(k): v for k, v in t.metrics().items() if k != "step"}
    assert logger.logged[4] == pytest.approx(want, nan_ok=True)
    assert logger.logged[4]["spkern/eff_rms/net.2"] > 0 and "spkern/update_rms/net.0.weight" in logger.logged[4]


def test_a_run_restored_from_a_checkpoint_continues(tmp_path):
    # (one batch an epoch: the data order cannot differ after the restore)
    # (with a spkern.Regime as stop=: saved and restored with the tracker)
    whole, regime = Memory(), spkern.Regime()
    _fit(spkern.lightning.SpkernCallback(probe="batch", stop=regime), whole, 6, log_every_n_steps=1, rows=8)
    first = _fit(spkern.lightning.SpkernCallback(probe="batch", stop=spkern.Regime()), Memory(), 3,
                 log_every_n_steps=1, rows=8)
    path = str(tmp_path / "step3.ckpt")
    first.save_checkpoint(path)
    resumed = Memory()
    callback = spkern.lightning.SpkernCallback(probe="batch", stop=spkern.Regime())
    _fit(callback, resumed, 6, ckpt_path=path, log_every_n_steps=1, rows=8)
    assert callback.tracker.steps == 6 and list(resumed.logged) == [4, 5, 6]
    assert callback.stop.history == regime.history and callback.stop.summary() == regime.summary()
    for step in (4, 5, 6):
        for k, v in whole.logged[step].items():
            got = resumed.logged[step][k]
            assert (math.isnan(v) and math.isnan(got)) or math.isclose(got, v, rel_tol=1e-6, abs_tol=1e-9), (step, k)


def test_stop():
    callback = spkern.lightning.SpkernCallback(stop=lambda m: m["step"] >= 2)
    trainer = _fit(callback, Memory(), 6, log_every_n_steps=1)
    assert trainer.global_step == 2


@pytest.mark.parametrize("lr, label", [(1e-3, 0), (1e4, 2)])
def test_a_regime_labels_the_run_and_stops_a_catastrophic_one(lr, label):
    regime, logger = spkern.Regime(), Memory()
    trainer = _fit(spkern.lightning.SpkernCallback(stop=regime), logger, 6, log_every_n_steps=1, lr=lr)
    assert [v["spkern/regime"] for v in logger.logged.values()][-1] == label
    assert trainer.global_step == (6 if label == 0 else regime.step)
    assert regime.step is None if label == 0 else regime.step < 6


@pytest.mark.slow
def test_under_torchrun_with_ddp_equals_one_process(tmp_path):
    # Lightning's DDP calls the module with its forward redirected to training_step, which
    # calls the forward: the tracker measures the outer call, its output the model's
    import os

    from conftest import assert_same_logged, run_worlds

    runs = run_worlds(os.path.join(os.path.dirname(__file__), "lightning_worker.py"), tmp_path)
    two, one = runs[2], runs[1]
    assert two["world"] == 2 and list(one["logged"]) == ["1", "2", "3"]
    assert assert_same_logged(two["logged"], one["logged"]) > 100

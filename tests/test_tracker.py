"""spkern.Tracker against the same statistics computed the slow way (copies of the
initial model, extra forwards, SVDs) on small models."""

import copy
import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import spkern


def _mlp(width=24, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, width, bias=bias), nn.ReLU(), nn.Linear(width, width, bias=bias),
                         nn.ReLU(), nn.Linear(width, 5, bias=bias))


def _data(n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 10, generator=g), torch.randint(0, 5, (n,), generator=g)


def _io(model, x):
    """(input, output) of every Linear of model on x, the slow way."""
    out, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(
                lambda mod, a, o, name=name: out.__setitem__(name, (a[0].detach().clone(), o.detach().clone()))))
    with torch.no_grad():
        y = model(x)
    for h in hooks:
        h.remove()
    return out, y


def _rms(t):
    return (t.double().norm() / math.sqrt(t.numel())).item()


def _close(a, b, **tol):
    """math.isclose, and NaN equals NaN (an alignment of nothing that moved is 0/0)."""
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, **tol)


def _train(model, opt, x, y, steps, tracker=None):
    for _ in range(steps):
        opt.zero_grad()
        loss, stats = spkern.cross_entropy(model(x), y, return_stats=True)
        loss.backward()
        if tracker is not None:
            tracker.record_loss(loss, stats)
        opt.step()


def _with_weights(model, weights):
    other = copy.deepcopy(model)
    other.load_state_dict(weights)
    return other


@pytest.mark.parametrize("optim", ["spkern", "torch"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("on", ["probe", "batch"])
def test_statistics_against_the_slow_way(optim, bias, on):
    model = _mlp(bias=bias)
    init = copy.deepcopy(model)
    x, y = _data()
    cls = spkern.optim.SGD if optim == "spkern" else torch.optim.SGD
    opt = cls(model.named_parameters() if optim == "spkern" else model.parameters(), lr=0.5, momentum=0.9)
    tracker = spkern.Tracker(model, opt, probe=x[:16] if on == "probe" else "batch")
    _train(model, opt, x, y, 2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, opt, x, y, 1, tracker)
    m = tracker.metrics()
    assert m["step"] == 3 and tracker.measurements == 3
    # on a probe: after the step; on the training batch: in the step's forward, before the update
    measured, rows = (model, x[:16]) if on == "probe" else (_with_weights(model, before), x)
    cur, logits = _io(measured, rows)
    ref, logits0 = _io(init, rows)
    for name in ("0", "2", "4"):
        (xt, ht), (x0, h0) = cur[name], ref[name]
        W, W0 = measured.get_submodule(name).weight.detach().double(), init.get_submodule(name).weight.detach().double()
        tol = dict(rel_tol=1e-4, abs_tol=1e-6)
        assert math.isclose(m[f"{name}/act_rms"], _rms(ht), **tol)
        assert math.isclose(m[f"{name}/change_rms"], _rms(ht - h0), **tol)
        assert math.isclose(m[f"{name}/input_change_rms"], _rms(xt - x0), **tol)
        assert math.isclose(m[f"{name}/input_zero_frac"], (xt == 0).double().mean().item(), **tol)
        eff = xt.double() @ (W - W0).t()
        prop = (xt - x0).double() @ W0.t()
        assert math.isclose(m[f"{name}/eff_rms"], _rms(eff), rel_tol=1e-3, abs_tol=1e-6)
        assert math.isclose(m[f"{name}/prop_rms"], _rms(prop), rel_tol=1e-3, abs_tol=1e-6)
        # the RCC splits the change of the output (bias aside)
        bias_change = (measured.get_submodule(name).bias - init.get_submodule(name).bias).detach().double() if bias else 0
        torch.testing.assert_close(eff + prop + bias_change, (ht - h0).double(), rtol=1e-4, atol=1e-5)
        op_dw = torch.linalg.matrix_norm(W - W0, ord=2).item()
        op_w0 = torch.linalg.matrix_norm(W0, ord=2).item()
        assert 0 <= m[f"{name}/eff_align"] <= 1
        if name == "0":  # the first layer's input never changes: 0/0
            assert math.isnan(m[f"{name}/prop_align"])
        else:
            assert 0 <= m[f"{name}/prop_align"] <= 1
        assert math.isclose(m[f"{name}/eff_align"], eff.norm().item() / (op_dw * xt.double().norm().item()),
                            rel_tol=2e-2)
        if name != "0":  # the first layer's input never changes
            assert math.isclose(m[f"{name}/prop_align"],
                                prop.norm().item() / (op_w0 * (xt - x0).double().norm().item()), rel_tol=2e-2)
        for pname in ([f"{name}.weight"] + ([f"{name}.bias"] if bias else [])):
            p, q, p0 = dict(model.named_parameters())[pname], before[pname], dict(init.named_parameters())[pname]
            assert math.isclose(m[f"{pname}/update_rms"], _rms(p.detach() - q), rel_tol=1e-4, abs_tol=1e-8)
            assert math.isclose(m[f"{pname}/drift_rms"], _rms(p.detach() - p0.detach()), rel_tol=1e-4)
            assert math.isclose(m[f"{pname}/weight_rms"], _rms(p.detach()), rel_tol=1e-5)
            assert math.isclose(m[f"{pname}/grad_rms"], _rms(p.grad), rel_tol=1e-5)
    assert math.isclose(m["logits/rms"], _rms(logits), rel_tol=1e-5)
    assert math.isclose(m["logits/change_rms"], _rms(logits - logits0), rel_tol=1e-4)
    assert math.isclose(m["logits/max_abs"], logits.abs().max().item(), rel_tol=1e-6)
    for k in ("train/loss", "train/logit_norm", "train/logit_max", "train/max_prob", "train/entropy",
              "train/accuracy"):
        assert k in m and math.isfinite(m[k])


def _module_monitor_rcc(model, reference, x):
    """torch-module-monitor's refined coordinate check of model against reference on x."""
    tmm = pytest.importorskip("torch_module_monitor")
    monitor = tmm.ModuleMonitor(monitor_step_fn=lambda step: True)
    monitor.set_module(model)
    monitor.set_reference_module(reference)
    rcc = tmm.RefinedCoordinateCheck(monitor)
    monitor.begin_step(1)
    with torch.no_grad():
        reference(x)
        model(x)
    rcc.refined_coordinate_check()
    monitor.end_step()
    out = monitor.get_step_metrics()
    rcc.rcc_forward_hooks.remove_all_hooks()
    rcc.rcc_reference_forward_hooks.remove_all_hooks()
    monitor.activation_hooks.remove_all_hooks()
    monitor.reference_activation_hooks.remove_all_hooks()
    return out


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reference", ["init", "model"])
@pytest.mark.parametrize("on", ["probe", "batch"])
def test_rcc_equals_torch_module_monitor(bias, reference, on):
    # the same model, batch and reference model; torch-module-monitor reports the mean
    # over rows of each row's L2 norm, which the tracker gives with row_l2=True
    model = _mlp(width=48, bias=bias)
    init = copy.deepcopy(model)
    x, y = _data(40)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    tracker = spkern.Tracker(model, opt, probe=x if on == "probe" else "batch", row_l2=True,
                             reference="init" if reference == "init" else init)
    _train(model, opt, x, y, 5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, opt, x, y, 1)
    m = tracker.metrics()
    tracker.close()
    # on the training batch the tracker measures the last step's forward, before its update
    theirs = _module_monitor_rcc(model if on == "probe" else _with_weights(model, before), init, x)
    pairs = {"eff_row_l2": "RCC (W_t-W_0)x_t/{}.weight/l2norm", "prop_row_l2": "RCC W_0(x_t-x_0)/{}.weight/l2norm",
             "input_row_l2": "RCC x_t/{}/l2norm", "input_change_row_l2": "RCC (x_t-x_0)/{}/l2norm"}
    compared = 0
    for layer in ("0", "2", "4"):
        for ours, key in pairs.items():
            want = theirs[key.format(layer)]
            if layer == "0" and ours in ("prop_row_l2", "input_change_row_l2"):
                assert want == 0 and m[f"{layer}/{ours}"] == 0  # the input does not move
                continue
            assert want > 1e-3, (layer, ours)
            assert math.isclose(m[f"{layer}/{ours}"], want, rel_tol=1e-4), (layer, ours, m[f"{layer}/{ours}"], want)
            compared += 1
    assert compared == 10
    # without row_l2 the tracker reports RMS only
    plain = spkern.Tracker(model, probe=x)
    plain.measure()
    assert "2/eff_rms" in plain.metrics() and not any(k.endswith("_row_l2") for k in plain.metrics())
    plain.close()


def test_without_operator_norms():
    model = _mlp()
    x, y = _data()
    opt = spkern.optim.SGD(model.parameters(), lr=0.1)
    full = spkern.Tracker(model, probe=x, reference=copy.deepcopy(model))
    lean = spkern.Tracker(model, opt, probe=x, op_norms=False)
    _train(model, opt, x, y, 3)
    full.measure()
    a, b = full.metrics(), lean.metrics()
    assert not any(k.endswith(("_op", "_align")) for k in b)
    assert any(k.endswith("_op") for k in a) and any(k.endswith("_align") for k in a)
    for k in ("2/eff_rms", "2/prop_rms", "4/change_rms", "2/input_change_rms"):
        assert math.isclose(a[k], b[k], rel_tol=1e-6), k
    full.close()
    lean.close()


def test_probe_from_first_batch_every_and_reference_model():
    model = _mlp()
    ref_model = copy.deepcopy(model)
    x, y = _data()
    opt = spkern.optim.AdamW(model.parameters(), lr=1e-2)
    tracker = spkern.Tracker(model, opt, every=2, probe_rows=8)
    assert tracker.probe is None
    _train(model, opt, x, y, 5)
    args, kwargs = tracker.probe
    assert args[0].shape == (8, 10) and torch.equal(args[0], x[:8]) and kwargs == {}
    assert tracker.measurements == 2  # steps 2 and 4
    m1 = tracker.metrics()
    tracker.close()
    # the same reference given as a model: the same feature changes
    other = spkern.Tracker(model, probe=x[:8], reference=ref_model)
    other.measure()
    m2 = other.metrics()
    for k in ("0/change_rms", "2/eff_rms", "2/prop_rms", "4/change_rms"):
        assert k in m2
    _, h_now = _io(model, x[:8])
    _, h_ref = _io(ref_model, x[:8])
    assert math.isclose(m2["logits/change_rms"], _rms(h_now - h_ref), rel_tol=1e-4)
    assert m1["step"] == 4  # the step it was measured at (tracker.steps is 5)


@pytest.mark.parametrize("on", ["probe", "batch"])
def test_gradient_accumulation_and_checkpointing_do_not_double_count(on):
    class Block(nn.Module):
        def __init__(self, ckpt):
            super().__init__()
            self.ckpt = ckpt
            self.inner = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 5))

        def forward(self, x):
            return checkpoint(self.inner, x, use_reentrant=False) if self.ckpt else self.inner(x)

    results = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = Block(ckpt)
        x, y = _data()
        opt = spkern.optim.SGD(model.parameters(), lr=0.1)
        tracker = spkern.Tracker(model, opt, probe=x[:16] if on == "probe" else "batch")
        for _ in range(3):
            opt.zero_grad()
            for chunk in range(2):  # two micro-batches per step
                sl = slice(32 * chunk, 32 * (chunk + 1))
                torch.nn.functional.cross_entropy(model(x[sl]), y[sl]).div(2).backward()
            opt.step()
        assert tracker.measurements == 3 and tracker.steps == 3
        results.append(tracker.metrics())
    assert results[0].keys() == results[1].keys()
    if on == "batch":  # the first micro-batch of each step is measured, the one before the update
        assert math.isclose(results[0]["inner.0/input_rms"], _rms(x[:32]), rel_tol=1e-5)
    for k in results[0]:
        assert _close(results[0][k], results[1][k], rel_tol=1e-5, abs_tol=1e-7), k


def test_module_selection():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Sequential(nn.Linear(8, 8), nn.ReLU()),
                          nn.Embedding(3, 2))
    assert spkern.Tracker(model, modules=None).names == ["0", "1", "2.0", "3"]
    t = spkern.Tracker(model, modules=["2", r"\d", model[1]])
    assert t.names == ["2", "0", "1", "3"]
    with pytest.raises(ValueError, match="no module"):
        spkern.Tracker(model, modules=["nope"])
    with pytest.raises(ValueError, match="not a submodule"):
        spkern.Tracker(model, modules=[nn.Linear(1, 1)])


def test_embedding_and_layernorm_blocks():
    model = nn.Sequential(nn.Embedding(11, 6), nn.LayerNorm(6), nn.Linear(6, 11))
    tokens = torch.randint(0, 11, (4, 5))
    opt = spkern.optim.AdamW(model.parameters(), lr=0.05)
    tracker = spkern.Tracker(model, opt, probe=tokens)
    for _ in range(2):
        opt.zero_grad()
        out = model(tokens)
        torch.nn.functional.cross_entropy(out.reshape(-1, 11), tokens.reshape(-1)).backward()
        opt.step()
    m = tracker.metrics()
    emb = model[0].weight.detach()[tokens] - tracker.reference.w0["0.weight"][tokens]
    assert math.isclose(m["0/change_rms"], _rms(emb), rel_tol=1e-4)
    assert m["1/act_rms"] > 0 and m["2/eff_rms"] > 0


def test_logging(tmp_path):
    model = _mlp()
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with spkern.Tracker(model, opt, probe=x[:8], log_dir=str(tmp_path), log_every=2) as tracker:
        _train(model, opt, x, y, 5, tracker)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    rows = [json.loads(line) for line in lines]
    assert [r["step"] for r in rows] == [2, 4] and "2/eff_rms" in rows[0]  # (metrics.jsonl: the flat names)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(tmp_path)).Reload().Tags()["scalars"]  # grouped by metric, one section each
    assert "eff_rms/2" in tags and "act_rms/0" in tags and "drift_rms/0.weight" in tags and "logits/rms" in tags
    assert not any(t.startswith(("0/", "2/")) for t in tags)


@pytest.mark.parametrize("kw, error, match", [
    (dict(every=0), ValueError, "every"),
    (dict(reference="nope"), ValueError, "reference"),
    (dict(probe="x"), ValueError, "'batch'"),
    (dict(probe=3), TypeError, "probe"),
    (dict(reference_dtype=torch.int8), ValueError, "reference_dtype"),
])
def test_bad_arguments(kw, error, match):
    with pytest.raises(error, match=match):
        spkern.Tracker(_mlp(), **kw)


def test_probe_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"cannot run on the probe \(\(4, 7\) torch.float32"):
        spkern.Tracker(_mlp(), probe=torch.randn(4, 7))
    with pytest.raises(ValueError, match="probe"):
        spkern.Tracker(_mlp(), probe=torch.ones(4, 10, dtype=torch.long))


def test_probe_after_training_needs_a_reference():
    model = _mlp()
    x, y = _data()
    opt = spkern.optim.SGD(model.parameters(), lr=0.1)
    tracker = spkern.Tracker(model, opt, probe=None)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.warns(RuntimeWarning, match="no probe"):
        opt.step()  # no forward yet: the parameters alone are measured
    assert tracker.measurements == 1 and "0.weight/update_rms" in tracker.metrics()
    assert not any(k.endswith("/act_rms") for k in tracker.metrics())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # (warned once)
    with pytest.raises(RuntimeError, match="before the first optimizer step"):
        tracker.set_probe(x[:4])
    with pytest.raises(RuntimeError, match="no probe"):
        tracker.measure()


def test_tracker_with_the_triton_backend():
    """The probe pass through the Triton kernels (paired products, pair statistics)."""
    model = _mlp(width=12)
    x, y = _data(n=16)
    opt = spkern.optim.SGD(model.parameters(), lr=0.5)
    with spkern.use_backend("triton"):
        tracker = spkern.Tracker(model, opt, probe=x[:8])
        _train(model, opt, x, y, 2)
        m = tracker.metrics()
    ref = spkern.Tracker(model, probe=x[:8], reference=_mlp(width=12))
    ref.measure()
    r = ref.metrics()
    for k in ("2/eff_rms", "2/prop_rms", "4/change_rms", "0.weight/drift_rms"):
        assert math.isclose(m[k], r[k], rel_tol=1e-4), k


def test_bfloat16_reference_weights():
    model = _mlp()
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    exact = spkern.Tracker(model, probe=x[:16])
    half = spkern.Tracker(model, opt, probe=x[:16], reference_dtype=torch.bfloat16)
    assert half.reference.w0["2.weight"].dtype == torch.bfloat16
    _train(model, opt, x, y, 3)
    exact.measure()
    a, b = exact.metrics(), half.metrics()
    for k in ("2.weight/drift_rms", "2/eff_rms", "2/prop_rms", "4/change_rms"):
        assert math.isclose(a[k], b[k], rel_tol=2e-2), k


@pytest.mark.slow
def test_two_processes_on_gloo_equal_one_on_the_full_batch(tmp_path):
    # each rank measures its share of the rows; the sums are added over the ranks before
    # the ratios and square roots, so the metrics are those of one process on all rows
    worker = os.path.join(os.path.dirname(__file__), "ddp_tracker_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runs = {}
    for world in (2, 1):
        out = str(tmp_path / f"{world}.json")
        launch = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
                   f"--master_port={port}"] if world > 1 else [sys.executable])
        proc = subprocess.run(launch + [worker, out], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        runs[world] = json.loads(open(out).read())
    two, one = runs[2], runs[1]
    assert two["world"] == 2 and one["world"] == 1
    for on in ("probe", "batch"):
        a, b = two[on], one[on]
        assert a.keys() == b.keys() and len(a) > 40
        for k, v in b.items():
            assert _close(a[k], v, rel_tol=1e-4, abs_tol=1e-6), (on, k, a[k], v)
    assert "2/eff_row_l2" in one["batch"] and "train/accuracy" in one["batch"]


def test_training_batch_mode_skips_evaluation_forwards():
    model = _mlp()
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = spkern.Tracker(model, opt, probe="batch")
    with torch.no_grad():
        model(x[:7])  # an evaluation between steps is not measured
    _train(model, opt, x, y, 1)
    m = tracker.metrics()
    assert math.isclose(m["0/input_rms"], _rms(x), rel_tol=1e-5)
    # the first forward sees W_0: no effective update, exactly; its alignment is 0/0
    assert m["2/eff_rms"] == 0 and m["2/delta_w_op"] == 0 and math.isnan(m["2/eff_align"])
    with pytest.raises(RuntimeError, match="probe='batch'"):
        tracker.measure()
    with pytest.raises(RuntimeError, match="probe='batch'"):
        tracker.set_probe(x)
    with pytest.warns(RuntimeWarning, match="no forward"):
        opt.step()  # a step without a forward: only the parameters are measured
    assert "0/input_rms" not in tracker.metrics() and "0.weight/drift_rms" in tracker.metrics()
    tracker.close()


def _noisy_model(seed=0):
    """Linear, BatchNorm, ReLU, Dropout, Linear: a forward that draws random numbers and
    updates buffers in training mode."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 5))


def _train_noisy(model, tracker_kw=None, steps=6, every=1):
    opt = spkern.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9)
    tracker = None
    if tracker_kw is not None:
        tracker = spkern.Tracker(model, opt, every=every, **tracker_kw)
    x, y = _data(n=96)
    torch.manual_seed(123)  # the run's own random numbers (dropout) start here
    losses = []
    for step in range(steps):
        xb, yb = x[16 * step:16 * step + 16], y[16 * step:16 * step + 16]
        loss = spkern.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    if tracker is not None:
        assert tracker.measurements > 0 and tracker.metrics()
        tracker.close()
    return torch.stack(losses), {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("probe", ["fixed", "first batch", "batch"])
@pytest.mark.parametrize("every", [1, 2])
def test_training_with_the_tracker_equals_training_without_it(probe, every):
    kw = {"fixed": dict(probe=_data(n=8, seed=5)[0]), "first batch": dict(), "batch": dict(probe="batch")}[probe]
    base_losses, base_state = _train_noisy(_noisy_model())
    losses, state = _train_noisy(_noisy_model(), kw, every=every)
    assert torch.equal(losses, base_losses)
    for k in base_state:
        assert torch.equal(state[k], base_state[k]), k  # weights and BatchNorm's running statistics


def test_every_module_keeps_its_own_mode():
    model = _noisy_model()
    model[1].eval()  # a frozen BatchNorm inside a model in training mode
    tracker = spkern.Tracker(model, probe=_data(n=8)[0])
    tracker.measure()
    assert model.training and not model[1].training and model[0].training and model[3].training


def test_instance_patched_forwards_survive_the_tracker():
    model = _mlp()
    x = _data(n=8)[0]
    lin = model[2]
    original = lin.forward
    lin.forward = lambda inp: original(inp) * 2.0  # as accelerate's hooks or an adapter patch it
    with torch.no_grad():
        before = model(x)
    for probe in (x, "batch"):
        tracker = spkern.Tracker(model, probe=probe)
        if probe == "batch":
            model(x).sum().backward()  # the training forward: the tracker measures it
            assert tracker.measurement.applied, "nothing measured"  # (completed at the step)
        else:
            tracker.measure()
        assert vars(lin)["forward"] is not None, "the instance's forward was removed"
        with torch.no_grad():
            torch.testing.assert_close(model(x), before, rtol=0, atol=0)
        tracker.close()


def test_batch_probe_keeps_the_initial_buffers_as_saved():
    model = _noisy_model()
    initial = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    opt = spkern.optim.SGD(model.named_parameters(), lr=0.1)
    tracker = spkern.Tracker(model, opt, probe="batch")
    x, y = _data(n=48)
    for step in range(3):
        loss = spkern.cross_entropy(model(x[16 * step:16 * step + 16]), y[16 * step:16 * step + 16])
        opt.zero_grad()
        loss.backward()
        opt.step()
    saved = {n: t for n, (t, _) in tracker.reference.init_state.items() if "running" in n}
    for k, v in initial.items():
        assert torch.equal(saved[k], v), k
    tracker.close()


@pytest.mark.parametrize("opt_cls", [spkern.optim.SGD, torch.optim.SGD])
def test_a_group_added_to_the_optimizer_later_is_tracked(opt_cls):
    # the readout joins the optimizer after one step: from its first step on the tracker
    # reports its update and drift (against its value when it joined), as for the others
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = opt_cls(model[0].parameters(), lr=0.1)
    tracker = spkern.Tracker(model, opt, probe=torch.randn(5, 8), every=1)
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step()
    joined = model[2].weight.detach().clone()
    opt.add_param_group({"params": list(model[2].parameters()), "lr": 0.05})
    before = model[2].weight.detach().clone()
    step()
    m = tracker.metrics()
    for key in ("update_rms", "drift_rms", "weight_rms", "grad_rms"):
        assert f"2.weight/{key}" in m and f"2.bias/{key}" in m, key
    moved = (model[2].weight.detach() - before).square().mean().sqrt().item()
    assert m["2.weight/update_rms"] == pytest.approx(moved, rel=1e-5)
    step()
    drift = (model[2].weight.detach() - joined).square().mean().sqrt().item()
    assert tracker.metrics()["2.weight/drift_rms"] == pytest.approx(drift, rel=1e-5)


def test_huge_activations_are_measured_not_inf():
    # squares of 1e25 do not fit in float32: the sums are float64 from the kernel on
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    probe = torch.randn(5, 8)
    tracker = spkern.Tracker(model, probe=probe)
    with torch.no_grad():
        model[0].weight.mul_(1e25)
        model[0].bias.mul_(1e25)
    tracker.measure()
    m = tracker.metrics()
    with torch.no_grad():
        h = model[0](probe).double()
        out = model(probe).double()
    assert m["0/act_rms"] == pytest.approx(h.square().mean().sqrt().item(), rel=1e-5)
    assert m["logits/rms"] == pytest.approx(out.square().mean().sqrt().item(), rel=1e-5)
    assert m["2/input_rms"] == pytest.approx(h.relu().square().mean().sqrt().item(), rel=1e-5)


class _Tied(nn.Module):
    """An embedding and a head that share their weight (GPT-2 and nanoGPT tie them)."""

    def __init__(self, vocab=11, width=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.mid = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(torch.relu(self.mid(self.emb(idx))))


@pytest.mark.parametrize("optim", ["spkern", "torch", None])
def test_tied_weights_keep_one_initial_copy(optim):
    torch.manual_seed(0)
    model = _Tied()
    opt = {"spkern": lambda: spkern.optim.SGD(model.named_parameters(), lr=0.5),
           "torch": lambda: torch.optim.SGD(model.parameters(), lr=0.5), None: lambda: None}[optim]()
    idx = torch.randint(0, 11, (6, 5))
    tracker = spkern.Tracker(model, opt, probe=idx)
    ref = tracker.reference
    copies = {id(t) for t in list(ref.w0.values()) + [ref.weight0(layer) for layer in tracker.layers.values()]}
    assert len(copies) == len(list(model.parameters())) == 3  # the emb/head weight once, mid's two
    assert ref.weight0(tracker.layers["head"]) is ref.w0["emb.weight"]
    for _ in range(2):
        if opt is not None:
            opt.zero_grad()
        torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
        opt.step() if opt is not None else tracker.step()
    m = tracker.metrics()
    w, w0 = model.emb.weight.detach(), tracker.reference.w0["emb.weight"]
    assert math.isclose(m["emb.weight/drift_rms"], _rms(w - w0), rel_tol=1e-5)
    assert "head.weight/drift_rms" not in m  # one parameter, one name
    if opt is not None:  # (without one nothing moves)
        assert m["head/delta_w_op"] > 0


@dataclasses.dataclass
class _Out:
    loss: object
    logits: torch.Tensor


class _Masked(nn.Module):
    """A model called as HF models are: keyword arguments, an attention mask, a structured
    output ('out' picks its kind)."""

    def __init__(self, out="dict"):
        super().__init__()
        self.emb = nn.Embedding(13, 8)
        self.fc = nn.Linear(8, 13)
        self.out = out

    def forward(self, input_ids=None, attention_mask=None, scale=1.0):
        h = self.emb(input_ids) * scale
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        logits = self.fc(torch.relu(h))
        return {"dict": lambda: {"hidden": h, "logits": logits}, "dataclass": lambda: _Out(None, logits),
                "tuple": lambda: (None, logits), "tensor": lambda: logits}[self.out]()


def _masked_batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 13, (6, 5), generator=g)
    mask = (torch.rand(6, 5, generator=g) > 0.3).float()
    return ids, mask


@pytest.mark.parametrize("out", ["dict", "dataclass", "tuple", "tensor"])
@pytest.mark.parametrize("form", ["first call", "kwargs", "args and kwargs", "positional with None"])
def test_probe_is_any_call_and_output_any_structure(form, out):
    ids, mask = _masked_batch()
    model = _Masked(out)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = {"first call": None, "kwargs": {"input_ids": ids[:4], "attention_mask": mask[:4]},
             "args and kwargs": ((ids[:4],), {"attention_mask": mask[:4]}),
             "positional with None": (ids[:4], None, 1.0)}[form]
    tracker = spkern.Tracker(model, opt, probe=probe, probe_rows=4)
    for _ in range(2):
        opt.zero_grad()
        o = model(input_ids=ids, attention_mask=mask)
        logits = o["logits"] if isinstance(o, dict) else o.logits if out == "dataclass" else o[1] if out == "tuple" else o
        F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
        opt.step()
    args, kwargs = tracker.probe
    with torch.no_grad():
        o = model(*args, **kwargs)
    want = o["logits"] if isinstance(o, dict) else o.logits if out == "dataclass" else o[1] if out == "tuple" else o
    m = tracker.metrics()
    assert math.isclose(m["logits/rms"], _rms(want), rel_tol=1e-5)
    if form in ("first call", "kwargs", "args and kwargs"):  # the mask of the call is kept (its first rows)
        assert torch.equal(kwargs["attention_mask"], mask[:4])
    assert m["fc/eff_rms"] > 0


def test_probe_output_fn_and_bad_probes():
    ids, mask = _masked_batch()
    model = _Masked("dict")
    tracker = spkern.Tracker(model, probe={"input_ids": ids}, output_fn=lambda o: o["hidden"])
    tracker.measure()
    with torch.no_grad():
        assert math.isclose(tracker.metrics()["logits/rms"], _rms(model(input_ids=ids)["hidden"]), rel_tol=1e-5)
    with pytest.raises(TypeError, match="probe must be a Tensor, a tuple"):
        spkern.Tracker(model, probe=3)
    with pytest.raises(TypeError, match="at least one Tensor"):
        spkern.Tracker(model, probe={"scale": 2.0})
    with pytest.raises(ValueError, match=r"cannot run on the probe \(\(6, 5\) torch.int64 on cpu, attention_mask="):
        spkern.Tracker(model, probe=((ids,), {"attention_mask": mask[:2]}))
    with pytest.raises(TypeError, match="output_fn must be callable"):
        spkern.Tracker(model, probe=ids, output_fn="logits")


def test_wandb_logging_offline(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    model = _mlp()
    x, y = _data()
    opt = spkern.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="call wandb.init"):
        spkern.Tracker(model, opt, probe=x[:8], wandb=True)  # no run yet
    with pytest.raises(TypeError, match="wandb must be None, True or a wandb run"):
        spkern.Tracker(model, opt, probe=x[:8], wandb="my-project")
    run = wandb.init(project="spkern-test", dir=str(tmp_path), mode="offline")
    logged = []
    log = run.log
    monkeypatch.setattr(run, "log", lambda data, step=None, **kw: (logged.append((step, dict(data))),
                                                                   log(data, step=step, **kw)))
    try:
        with spkern.Tracker(model, opt, probe=x[:8], wandb=True, log_every=2) as tracker:
            _train(model, opt, x, y, 4, tracker)
            last = tracker.metrics()
    finally:
        run.finish()
    assert [s for s, _ in logged] == [2, 4]  # every second measurement, at the tracker's step
    # grouped by metric (one W&B section compares the layers); the loss and the logits as they are
    from spkern.monitor.log import tag

    assert logged[-1][1] == {tag(k): v for k, v in last.items() if k != "step"} and "eff_rms/2" in logged[-1][1]
    assert "train/loss" in logged[-1][1] and "logits/rms" in logged[-1][1] and "update_rms/2.weight" in logged[-1][1]
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))  # what `wandb sync` uploads later


@pytest.mark.parametrize("mode", ["probe", "first call", "batch"])
@pytest.mark.parametrize("wrap", ["model compiled apart", "tracker of the compiled model"])
def test_torch_compile_training_step_is_left_alone(mode, wrap):
    # the tracker's passes run eagerly, outside the compiled step: after the first calls no
    # graph break and no recompilation of the training step; names as in the eager model
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    dynamo.reset()
    counters.clear()
    model = _mlp()
    x, y = _data()
    compiled = torch.compile(model, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = spkern.Tracker(model if wrap == "model compiled apart" else compiled, opt,
                             probe={"probe": x[:8], "first call": None, "batch": "batch"}[mode], probe_rows=8)

    def step():
        opt.zero_grad()
        F.cross_entropy(compiled(x), y).backward()
        opt.step()
    for _ in range(2):
        step()
    breaks, graphs = sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]
    # (the first calls: the default probe taken there, eagerly; probe="batch": its hook's break,
    # where the measurement runs eagerly)
    assert graphs <= 3 and breaks <= (2 if mode == "batch" else 1)
    for _ in range(3):
        step()
    assert sum(counters["graph_break"].values()) == breaks and counters["stats"]["unique_graphs"] == graphs
    m = tracker.metrics()
    assert "2/eff_rms" in m and "0.weight/drift_rms" in m and not any("_orig_mod" in k for k in m)
    assert m["step"] == 5 and m["2/eff_rms"] > 0
    if mode == "batch":  # the same numbers as the eager tracker on the training batch
        eager_model = _mlp()
        eager_opt = torch.optim.SGD(eager_model.parameters(), lr=0.1)
        eager = spkern.Tracker(eager_model, eager_opt, probe="batch")
        for _ in range(5):
            eager_opt.zero_grad()
            F.cross_entropy(eager_model(x), y).backward()
            eager_opt.step()
        e = eager.metrics()
        assert e.keys() == m.keys()
        for k, v in e.items():
            assert _close(m[k], v, rel_tol=1e-4, abs_tol=1e-6), (k, m[k], v)
    dynamo.reset()


@pytest.mark.parametrize("on", ["probe", "batch"])
@pytest.mark.parametrize("op_iters", [1, 2])
def test_operator_norm_product_fused_into_the_step(on, op_iters, monkeypatch):
    # with spkern.optim measuring every step on CPU, each layer's first Lanczos product of
    # a measurement comes from the step's own pass: one pass over W_t and W_0 fewer, the
    # same numbers as a tracker making that pass itself (torch's SGD: the same weights)
    import spkern.backends.cpu as cpu_backend

    passes = []
    real = cpu_backend.gram_matvec

    def counting(A, B):
        f = real(A, B)
        return lambda v: passes.append(1) or f(v)
    key = ("spectral_norm", "cpu")
    monkeypatch.setitem(spkern.registry._KERNELS, key, spkern.registry._KERNELS[key]._replace(fn=counting))
    x, y = _data()
    runs = {}
    for optim in ("spkern", "torch"):
        model = _mlp()
        opt = (spkern.optim.SGD(model.named_parameters(), lr=0.5, momentum=0.9) if optim == "spkern"
               else torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9))
        tracker = spkern.Tracker(model, opt, probe=x[:16] if on == "probe" else "batch", op_iters=op_iters)
        values, counts = [], []
        for _ in range(4):
            before = len(passes)
            _train(model, opt, x, y, 1, tracker)  # (probe="batch": measured in its forward)
            counts.append(len(passes) - before)
            values.append(tracker.metrics())
        runs[optim] = values, counts
    (fused, fused_passes), (own, own_passes) = runs["spkern"], runs["torch"]
    layers = 3
    assert own_passes[2:] == [layers * op_iters] * 2
    assert fused_passes[2:] == [layers * (op_iters - 1)] * 2
    for a, b in zip(fused[1:], own[1:]):
        for name in ("0", "2", "4"):
            for k in ("delta_w_op", "eff_align"):
                assert math.isclose(a[f"{name}/{k}"], b[f"{name}/{k}"], rel_tol=1e-5), (name, k)


def test_operator_norm_in_training_a_lower_bound_and_with_op_tol_close():
    # real training moves W_t - W_0 abruptly (Adam's first steps at a large rate): the warm
    # estimate is a lower bound that may lag there; op_tol follows it
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(512, 10, generator=g), torch.randint(0, 5, (512,), generator=g)
    worst = {}
    for tol in (None, 1e-3):
        model = _mlp(width=64)
        w0 = {n: model.get_submodule(n).weight.detach().clone() for n in ("0", "2", "4")}
        opt = spkern.optim.AdamW(model.named_parameters(), lr=1e-2)
        tracker = spkern.Tracker(model, opt, probe=X[:32], op_tol=tol)
        worst[tol] = 0.0
        for t in range(12):
            i = torch.randint(0, 512, (32,), generator=g)
            _train(model, opt, X[i], Y[i], 1, tracker)
            m = tracker.metrics()
            for n, w in w0.items():
                exact = torch.linalg.matrix_norm((model.get_submodule(n).weight - w).double(), 2).item()
                assert m[f"{n}/delta_w_op"] <= exact * (1 + 1e-5), (tol, t, n)
                worst[tol] = max(worst[tol], 1 - m[f"{n}/delta_w_op"] / exact)
    assert worst[1e-3] < 0.01 and worst[1e-3] <= worst[None]


@pytest.mark.parametrize("on", ["probe", "batch"])
def test_a_measurement_takes_its_statistics_in_a_few_calls(on, monkeypatch):
    # every activation pair of a pass in one multi_pair_stats call (no pair_stats call per
    # activation), the layers' warm Lanczos steps in one spectral_norm_steps call; with
    # probe="batch" the training forward's statistics are taken module by module (its
    # activations are not kept through the step): one call each
    import spkern.monitor.measure as measure_module
    import spkern.monitor.opnorms as opnorms_module
    import spkern.monitor.values as values_module

    calls = {"pairs": [], "steps": 0, "single": 0}
    real_pairs, real_steps = values_module.multi_pair_stats, opnorms_module.spectral_norm_steps

    def pairs(p):
        calls["pairs"].append(len(p))
        return real_pairs(p)

    def steps(*args):
        calls["steps"] += 1
        return real_steps(*args)

    def single(*args, **kwargs):
        calls["single"] += 1
        return real_single(*args, **kwargs)
    real_single = measure_module.pair_stats
    monkeypatch.setattr(values_module, "multi_pair_stats", pairs)
    monkeypatch.setattr(opnorms_module, "spectral_norm_steps", steps)
    monkeypatch.setattr(measure_module, "pair_stats", single)
    x, y = _data()
    model = _mlp()
    opt = spkern.optim.SGD(model.named_parameters(), lr=0.5)
    tracker = spkern.Tracker(model, opt, probe=x[:16] if on == "probe" else "batch")
    _train(model, opt, x, y, 2, tracker)
    for k in calls:
        calls[k] = [] if k == "pairs" else 0
    _train(model, opt, x, y, 1, tracker)
    m = tracker.metrics()
    if on == "probe":  # 3 Linear layers: output, input, effective and propagating update; the logits
        assert calls["pairs"] == [3 * 4 + 1] and calls["steps"] == 1
    else:
        assert calls["pairs"] == [4, 4, 4, 1] and calls["steps"] == 1  # (the steps after the forward)
    assert calls["single"] == 0
    assert m["4/delta_w_op"] > 0 and m["2/eff_rms"] > 0 and m["logits/change_rms"] > 0


def test_reduce_reads_tables_scalars_and_numbers_in_one_gather():
    from spkern.monitor.values import Table, _Max, _Ratio, reduce

    t = Table(lambda: torch.tensor([[4.0, 9.0], [16.0, 2.0]], dtype=torch.float64))
    s = torch.tensor(3.0)
    values = {"a": _Ratio(t[0], 1.0, True), "b": _Ratio(t[1], t[3]), "c": _Ratio(s, 2, False, t[2]),
              "d": _Max(torch.tensor(-1.5)), "e": _Ratio(t[2], 4, True, torch.tensor(0.5)),
              "f": _Ratio(torch.tensor(-1.0), 1, True), "g": _Ratio(torch.tensor(1.0), 0.0)}
    got = reduce(values)
    assert list(got) == list(values)
    assert got["a"] == 2.0 and got["b"] == 4.5 and got["c"] == 24.0 and got["d"] == -1.5
    assert got["e"] == 1.0 and got["f"] == 0.0 and got["g"] > 1e300  # (a root of a negative: 0; no division by 0)
    assert math.isnan(reduce({"n": _Ratio(torch.tensor(float("nan")), 1, True)})["n"])


def test_pairs_on_a_second_device_are_taken_apart():
    # a model across devices: the first device's pairs go to one call, the others' one by one
    from spkern.monitor.values import _Pair

    from spkern.monitor.measure import Measurement

    m = Measurement(1)
    first = m._pair(torch.randn(3, 4))
    other = m._pair(torch.randn(3, 4, device="meta"))
    assert isinstance(first, _Pair) and isinstance(other, torch.Tensor) and other.device.type == "meta"
    m.flush()
    assert first[0].table.sums.shape == (5,)

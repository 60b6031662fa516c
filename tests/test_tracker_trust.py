"""The tracker is an instrument: each test here is a way it could silently change training
or report a wrong or stale number (one per way, as docs/tracker.md's "The measurement" lists
them), checked against training without the tracker or a reference
written here with plain torch."""

import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

import spkern
from spkern.experiments.train import loop

MODES = ["fixed", "first batch", "batch"]


def _data(n=16, d=10, classes=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def _mlp(seed=0, act=nn.ReLU):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 16), act(), nn.Linear(16, 16), act(), nn.Linear(16, 5))


def _probe(mode, x):
    return {"fixed": x[:8], "first batch": None, "batch": "batch"}[mode]


def _step(model, opt, x, y, tracker=None, autocast=False):
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    loss = F.cross_entropy(out.float(), y)
    loss.backward()
    if tracker is not None:
        tracker.record_loss(loss)
    opt.step()
    return loss.detach()


def _rms(t):
    return t.double().square().mean().sqrt().item()


# -- the tracker changes training ----------------------------------------------------------

class _Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8, max_norm=1.0)
        self.head = nn.Linear(8, 5)

    def forward(self, idx):
        return self.head(self.emb(idx).mean(1) * 4)


def _writer(kind):
    torch.manual_seed(0)
    if kind == "embedding max_norm":
        model = _Tokens()
        g = torch.Generator().manual_seed(1)
        return model, [(torch.randint(0, 20, (6, 3), generator=g), torch.randint(0, 5, (6,), generator=g))
                       for _ in range(6)]
    model = _mlp()
    parametrizations.spectral_norm(model[2])
    return model, [_data(seed=s) for s in range(6)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["embedding max_norm", "spectral_norm"])
def test_a_forward_that_writes_state_trains_as_without_the_tracker(kind, mode):
    # an Embedding(max_norm) renormalises its rows in its forward; a parametrized spectral
    # norm advances its power iteration at each read of .weight in training mode
    states = []
    for tracked in (False, True):
        model, batches = _writer(kind)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        tracker = spkern.Tracker(model, opt, probe=_probe(mode, batches[-1][0])) if tracked else None
        for x, y in batches:
            _step(model, opt, x, y, tracker)
        states.append(model.state_dict())
    for k, v in states[0].items():
        assert torch.equal(states[1][k], v), k  # the weights, and the spectral norm's _u and _v


class _Writes(nn.Module):
    """A layer whose forward writes its weight on some inputs (a renormalisation of its own)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(10, 5)

    def forward(self, x):
        if x.shape[0] < 8:  # (the probe, not the training batch)
            with torch.no_grad():
                self.lin.weight.mul_(0.5)
        return self.lin(x)


def test_a_write_the_tracker_did_not_expect_is_named_and_restored_after():
    x, y = _data()
    model = _Writes()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match="wrote 'lin.weight', which it had not saved"):
        tracker = spkern.Tracker(model, opt, probe=x[:4])
    before = model.lin.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracker.measure()  # (saved and restored from then on)
    assert torch.equal(model.lin.weight, before)


# -- one quantity, one definition ----------------------------------------------------------

class _LoRA(nn.Linear):
    """Base F.linear (frozen) plus an adapter."""

    def __init__(self):
        super().__init__(10, 16)
        self.weight.requires_grad_(False)
        self.A = nn.Parameter(torch.randn(2, 10) * 0.3)
        self.B = nn.Parameter(torch.randn(16, 2) * 0.3)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + 2.0 * F.linear(F.linear(x, self.A), self.B)


def test_an_adapter_has_one_definition_in_every_probe_mode():
    # the same batch every step: the fixed probe after step t and the training batch of step
    # t + 1 (measured before its update) see the same x and the same weights
    x, y = _data()
    got = {}
    for mode in MODES:
        torch.manual_seed(0)
        model = nn.Sequential(_LoRA(), nn.Tanh(), nn.Linear(16, 5))
        init = copy.deepcopy(model)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        tracker = spkern.Tracker(model, opt, probe=x if mode != "batch" else "batch")
        history = []
        for _ in range(4):
            _step(model, opt, x, y)
            history.append(tracker.metrics())
        got[mode] = history
    fixed, batch = got["fixed"], got["batch"]
    for t in range(3):
        for k in ("0/eff_rms", "0/prop_rms", "0/change_rms", "2/eff_rms", "2/prop_rms"):
            assert math.isclose(fixed[t][k], batch[t + 1][k], rel_tol=1e-5), (t, k)
    assert got["first batch"][-1]["0/eff_rms"] == fixed[-1]["0/eff_rms"]
    # against the definition, in float64: f(x; θ) = x W^T + 2 x A^T B^T (biases at zero)
    lora, lora0 = model[0], init[0]  # (the last run's model: probe="batch", after 4 steps)

    def f(m, inp):
        return inp @ m.weight.double().t() + 2 * (inp @ m.A.double().t()) @ m.B.double().t()
    # the tracker of that run measured step 4's forward, the weights after 3 steps; recompute them
    torch.manual_seed(0)
    replay = nn.Sequential(_LoRA(), nn.Tanh(), nn.Linear(16, 5))
    ropt = torch.optim.SGD([p for p in replay.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        _step(replay, ropt, x, y)
    with torch.no_grad():
        eff = f(replay[0], x.double()) - f(lora0, x.double())
    assert eff.abs().max() > 1e-3  # (the adapter moved; the base weight did not)
    assert math.isclose(batch[3]["0/eff_rms"], _rms(eff), rel_tol=1e-5)
    assert torch.equal(lora.weight, lora0.weight)


# -- layers half-measured ------------------------------------------------------------------

class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.enc(x).mean(1))


@pytest.mark.parametrize("mode", MODES)
def test_attention_projections_are_measured(mode):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 6, 8, generator=g), torch.randint(0, 5, (4,), generator=g)
    model = _Encoder()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no layer left unmeasured)
        tracker = spkern.Tracker(model, opt, probe=_probe(mode, x))
        for _ in range(2):
            _step(model, opt, x, y)
    m = tracker.metrics()
    for layer in ("enc.self_attn.in_proj", "enc.self_attn.out_proj"):
        for k in ("act_rms", "input_rms", "eff_rms", "delta_w_op", "eff_align"):
            assert f"{layer}/{k}" in m and m[f"{layer}/{k}"] > 0, (layer, k)
    # the input projection's input is the model's: it does not move; the output projection's does
    assert m["enc.self_attn.in_proj/prop_rms"] == 0 and m["enc.self_attn.out_proj/prop_rms"] > 0
    # named alone: still measured
    only = spkern.Tracker(model, probe=x, modules=["enc.self_attn.out_proj"])
    only.measure()
    assert only.metrics()["enc.self_attn.out_proj/act_rms"] > 0


# -- precision -----------------------------------------------------------------------------

def test_the_batch_probe_under_autocast_measures_in_float32():
    x, y = _data()
    model = _mlp()
    init = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tracker = spkern.Tracker(model, opt, probe="batch")
    seen = []
    model[2].register_forward_hook(lambda m, a, o: seen.append(a[0].detach().clone()))
    for _ in range(2):
        before = model[2].weight.detach().clone()
        _step(model, opt, x, y, autocast=True)
    eff = seen[-1].double() @ (before - init[2].weight).double().t()  # the input as the layer got it
    assert math.isclose(tracker.metrics()["2/eff_rms"], _rms(eff), rel_tol=1e-4)


@pytest.mark.parametrize("optim", ["spkern", "torch"])
@pytest.mark.parametrize("mode", MODES)
def test_nothing_moved_means_every_change_is_exactly_zero(mode, optim):
    # learning rate 0, the training step under autocast (the first-batch probe is seen there)
    x, y = _data()
    model = _mlp()
    opt = (spkern.optim.SGD if optim == "spkern" else torch.optim.SGD)(model.parameters(), lr=0.0)
    tracker = spkern.Tracker(model, opt, probe=_probe(mode, x), row_l2=True)
    for _ in range(3):
        _step(model, opt, x, y, autocast=True)
    m = tracker.metrics()
    moved = ("change_rms", "eff_rms", "prop_rms", "drift_rms", "update_rms", "delta_w_op", "relative_update",
             "eff_row_l2", "prop_row_l2", "input_change_row_l2")
    checked = [k for k in m if k.endswith(moved)]
    assert len(checked) > 30
    for k in checked:
        assert m[k] == 0, (k, m[k])
    assert all(math.isnan(v) for k, v in m.items() if k.endswith("_align"))  # 0/0


# -- stale values --------------------------------------------------------------------------

@pytest.mark.parametrize("optim", ["spkern", "torch"])
def test_a_parameter_frozen_mid_training_moved_by_zero(optim):
    x, y = _data()
    model = _mlp()
    opt = (spkern.optim.SGD if optim == "spkern" else torch.optim.SGD)(model.parameters(), lr=0.5)
    tracker = spkern.Tracker(model, opt, probe=x)
    _step(model, opt, x, y)
    assert tracker.metrics()["2.weight/update_rms"] > 0
    model[2].requires_grad_(False)
    _step(model, opt, x, y)
    m = tracker.metrics()
    assert m["2.weight/update_rms"] == 0 and m["2.weight/relative_update"] == 0 and m["2.bias/update_rms"] == 0
    assert "2.weight/grad_rms" not in m and m["0.weight/grad_rms"] > 0 and m["4.weight/update_rms"] > 0
    if optim == "spkern":  # the optimizer's own statistics: of the parameters it stepped
        assert "2.weight" not in {k if isinstance(k, str) else None for k in opt.norm_stats()} and \
            all(p is not model[2].weight for p in opt.norm_stats())


def test_every_value_carries_the_step_it_was_measured_at():
    x, y = _data()
    model = _mlp()
    opt = spkern.optim.SGD(model.parameters(), lr=0.1)
    tracker = spkern.Tracker(model, opt, probe=x[:8], every=10)
    losses = [_step(model, opt, x, y, tracker).item() for _ in range(21)]
    m = tracker.metrics()
    assert tracker.steps == 21 and m["step"] == 20 and tracker.measured_step == 20
    assert m["train/loss"] == pytest.approx(losses[19])  # step 20's loss, not step 21's
    # the trainers' loop: the last step, between two measured ones, measured then and labelled so
    model = _mlp()
    opt = spkern.optim.SGD(model.parameters(), lr=0.1)
    tracker = spkern.Tracker(model, opt, probe=x[:8], every=10)
    history, done, _, _ = loop.run(range(21), 21, lambda i, _: _step(model, opt, x, y, tracker), tracker,
                                   track_every=10, diverge_loss=1e9, device=torch.device("cpu"),
                                   history_row=lambda step, m: {"step": step, "measured": m["step"],
                                                                "act": m["2/act_rms"]})
    assert [(r["step"], r["measured"]) for r in history] == [(10, 10), (20, 20), (21, 21)]


# -- ratios, non-finite values, missing gradients -------------------------------------------

def test_alignments_stay_in_their_range():
    x, y = _data(64)
    model = _mlp()
    model[0].requires_grad_(False)  # a frozen layer: nothing moves, its effective alignment is 0/0
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    tracker = spkern.Tracker(model, opt, probe="batch")
    aligned = 0
    for i in range(8):
        _step(model, opt, x[8 * i:8 * i + 8], y[8 * i:8 * i + 8])
        m = tracker.metrics()
        assert math.isnan(m["0/eff_align"]) and m["0/eff_rms"] == 0
        for k, v in m.items():
            if k.endswith("_align") and not math.isnan(v):
                assert 0 <= v <= 1, (i, k, v)
                aligned += 1
    assert aligned > 20


@pytest.mark.parametrize("optim", ["spkern", "torch"])
def test_a_relative_update_of_nothing_is_nan(optim):
    # a zero-initialised bias that does not move: ||dW|| / ||W|| is 0/0, not 0 nor 1e150
    x, y = _data()
    model = _mlp()
    with torch.no_grad():
        model[2].bias.zero_()
    opt = (spkern.optim.SGD if optim == "spkern" else torch.optim.SGD)(model.parameters(), lr=0.0)
    tracker = spkern.Tracker(model, opt, probe=x)
    _step(model, opt, x, y)
    m = tracker.metrics()
    assert math.isnan(m["2.bias/relative_update"]) and m["2.weight/relative_update"] == 0


def test_a_nan_weight_gives_nan():
    x, y = _data()
    model = _mlp()
    opt = spkern.optim.SGD(model.parameters(), lr=0.1)
    tracker = spkern.Tracker(model, opt, probe=x)
    _step(model, opt, x, y)
    assert tracker.metrics()["2/delta_w_op"] > 0
    with torch.no_grad():
        model[2].weight[3, 4] = float("nan")
    tracker.measure()  # (the weights now; the parameter statistics are the last step's)
    m = tracker.metrics()
    for k in ("2/delta_w_op", "2/eff_rms", "2/act_rms", "4/act_rms", "logits/rms", "2/eff_align"):
        assert math.isnan(m[k]), k
    assert m["0/delta_w_op"] > 0  # (the other layers as they are)
    _step(model, opt, x, y, tracker)  # a step with it: everything downstream is NaN, said so
    m = tracker.metrics()
    for k in ("0/delta_w_op", "2/delta_w_op", "2.weight/drift_rms", "0.weight/update_rms", "train/loss"):
        assert math.isnan(m[k]), k


def test_one_missing_gradient_hides_no_other():
    x, y = _data()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # (every parameter, the frozen one too)
    tracker = spkern.Tracker(model, opt, probe=x)
    model[0].requires_grad_(False)
    _step(model, opt, x, y)
    m = tracker.metrics()
    assert "0.weight/grad_rms" not in m and m["0.weight/update_rms"] == 0
    for n in ("2.weight", "2.bias", "4.weight", "4.bias"):
        assert m[f"{n}/grad_rms"] > 0, n


# -- resume --------------------------------------------------------------------------------

def _resumable(optim, mode, x):
    model = _mlp()
    opt = (spkern.optim.SGD(model.parameters(), lr=0.3, momentum=0.9) if optim == "spkern"
           else torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9))
    return model, opt


@pytest.mark.parametrize("optim", ["spkern", "torch"])
@pytest.mark.parametrize("mode", MODES)
def test_a_resumed_run_continues_the_uninterrupted_one(mode, optim):
    x, y = _data()
    batches = [(x.roll(i, 0), y.roll(i, 0)) for i in range(6)]
    model, opt = _resumable(optim, mode, x)
    tracker = spkern.Tracker(model, opt, probe=_probe(mode, x))
    whole = []
    for xb, yb in batches:
        _step(model, opt, xb, yb, tracker)
        whole.append(tracker.metrics())
    # three steps, saved, then a new process's model, optimizer and tracker, three more
    model, opt = _resumable(optim, mode, x)
    tracker = spkern.Tracker(model, opt, probe=_probe(mode, x))
    for xb, yb in batches[:3]:
        _step(model, opt, xb, yb, tracker)
    f = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "tracker": tracker.state_dict()}, f)
    f.seek(0)
    saved = torch.load(f, weights_only=True)
    model, opt = _resumable(optim, mode, x)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    tracker = spkern.Tracker(model, opt, probe=_probe(mode, x[3:11]))  # (a probe that is not the saved one)
    tracker.load_state_dict(saved["tracker"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i, (xb, yb) in enumerate(batches[3:], 3):
            _step(model, opt, xb, yb, tracker)
            got, want = tracker.metrics(), whole[i]
            assert got.keys() == want.keys()
            for k, v in want.items():
                same = (math.isnan(v) and math.isnan(got[k])) or math.isclose(got[k], v, rel_tol=1e-6, abs_tol=1e-9)
                assert same, (i, k, got[k], v)


def test_resumed_without_the_trackers_state():
    x, y = _data()
    # an optimizer that keeps W_0 (track_drift=True): the tracker takes it, one W_0 for every metric
    model = _mlp()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = spkern.optim.SGD(model.parameters(), lr=0.3, track_drift=True)
    for _ in range(3):
        _step(model, opt, x, y)
    saved = copy.deepcopy(opt.state_dict())
    opt = spkern.optim.SGD(model.parameters(), lr=0.3, track_drift=True)
    opt.load_state_dict(saved)
    tracker = spkern.Tracker(model, opt, probe=x)
    _step(model, opt, x, y)
    m = tracker.metrics()
    dw = model[2].weight.detach().double() - w0["2.weight"].double()
    assert math.isclose(m["2.weight/drift_rms"], _rms(dw), rel_tol=1e-5)
    assert math.isclose(m["2/delta_w_op"], torch.linalg.matrix_norm(dw, 2).item(), rel_tol=0.2)  # (not 0)
    # an optimizer with state but no W_0: said, at the first measurement
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    _step(model, opt, x, y)
    tracker = spkern.Tracker(model, opt, probe=x)
    with pytest.warns(RuntimeWarning, match="the optimizer had state when the tracker was made"):
        _step(model, opt, x, y)
    with pytest.raises(ValueError, match="not a state dict"):
        tracker.load_state_dict({"steps": 3})


# -- wrong setups, torch.compile, parametrized weights ---------------------------------------

def test_wrong_setups_are_named():
    model, other = _mlp(), _mlp()
    with pytest.raises(ValueError, match="none of the model's parameters"):
        spkern.Tracker(model, torch.optim.SGD(other.parameters(), lr=0.1))
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="meta device"):
        spkern.Tracker(meta, probe=torch.randn(2, 4))


@pytest.mark.parametrize("mode", ["first batch", "batch"])
def test_a_reused_compiled_graph_is_explained(mode):
    import torch._dynamo as dynamo

    dynamo.reset()
    x, y = _data()
    untracked = torch.compile(_mlp(), backend="aot_eager")
    F.cross_entropy(untracked(x), y).backward()  # the same architecture, compiled before any tracker
    model = _mlp()
    compiled = torch.compile(model, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = spkern.Tracker(compiled, opt, probe=_probe(mode, x))
    with pytest.warns(RuntimeWarning, match="torch.compile reused a graph compiled before"):
        _step(compiled, opt, x, y)
    assert "2.weight/update_rms" in tracker.metrics()
    dynamo.reset()


@pytest.mark.parametrize("kind", ["weight_norm", "orthogonal", "old spectral_norm"])
def test_parametrized_weights_in_every_probe_mode(kind):
    x, y = _data()
    for mode in MODES:
        model = _mlp(act=nn.Tanh)
        {"weight_norm": parametrizations.weight_norm, "orthogonal": parametrizations.orthogonal,
         "old spectral_norm": nn.utils.spectral_norm}[kind](model[2])
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        tracker = spkern.Tracker(model, opt, probe=_probe(mode, x))
        assert tracker.names == ["0", "2", "4"]  # (the parametrizations are no layers)
        for _ in range(2):
            _step(model, opt, x, y)
        m = tracker.metrics()
        assert m["2/eff_rms"] > 0 and m["2/act_rms"] > 0, (kind, mode)
        assert ("2/delta_w_op" in m) == (kind != "old spectral_norm")  # (a hook-computed weight: no matrix)


# -- found alongside: an output changed in place after its layer -----------------------------

def test_an_output_changed_in_place_later_is_measured_as_the_layer_gave_it():
    x, y = _data()
    model = _mlp(act=lambda: nn.ReLU(inplace=True))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = spkern.Tracker(model, opt, probe=x)
    _step(model, opt, x, y)
    with torch.no_grad():
        h = F.linear(x, model[0].weight, model[0].bias)  # before the ReLU that follows in place
    assert math.isclose(tracker.metrics()["0/act_rms"], _rms(h), rel_tol=1e-5)
    assert tracker.metrics()["0/zero_frac"] == 0

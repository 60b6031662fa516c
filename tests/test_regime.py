"""spkern.Regime: the regime label of a run, from the tracker's measurements.

The criteria are checked on measurement sequences written here, and on real training
against the criterion computed in the test with plain torch (the logit RMS on the probe at
initialisation and within the first steps, the hidden activations' RMS)."""

import math

import pytest
import torch
from torch import nn

import spkern
from spkern.regime import CATASTROPHIC, CONTROLLED, STABLE, Criteria, Regime


def _m(step, loss=1.0, logits=1.0, act=1.0, out=1.0, grad=1.0):
    return {"step": step, "train/loss": loss, "logits/rms": logits, "layers.0/act_rms": act,
            "layers.1/act_rms": out, "layers.0.weight/grad_rms": grad}


def _run(*measurements, regime=None):
    regime = regime or Regime()
    for m in measurements:
        regime.observe(m)
    return regime


def test_stable_while_nothing_crosses_a_threshold():
    r = _run(_m(0), _m(10, loss=0.9, logits=2.5, act=5.0, grad=50.0), _m(20, loss=2.9, logits=2.9))
    assert r.regime == STABLE and r.step is None and r.evidence == [] and not r.catastrophic
    assert r.summary() == {"regime": STABLE, "regime_step": None, "regime_reached": {}, "regime_evidence": []}


def test_logits_grown_early_are_controlled_divergence_and_the_label_stays():
    r = _run(_m(0, logits=2.0), _m(10, logits=5.0), _m(20, logits=7.0), _m(30, logits=1.0))
    assert r.regime == CONTROLLED and r.step == 20 and r.reached == {CONTROLLED: 20}
    assert str(r.evidence[0]) == "step 20: logits/rms at 3.5x its initial scale > 3 -> controlled-divergence"
    assert r.history == [(0, STABLE), (10, STABLE), (20, CONTROLLED), (30, CONTROLLED)]


def test_logits_that_grow_late_are_not_counted():
    # (a run that fits its data under CE grows its logits at any learning rate)
    r = _run(_m(0, logits=2.0), _m(10, logits=2.5), _m(20, logits=3.0), _m(100, logits=50.0))
    assert r.regime == STABLE


def test_without_a_step_0_measurement_the_first_one_is_the_reference_and_counts_early():
    r = _run(_m(50, logits=2.0), _m(100, logits=20.0))  # (every=50: no measurement within 20 steps)
    assert r.regime == STABLE
    r = Regime(Criteria(early_steps=60))
    _run(_m(50, logits=2.0), _m(60, logits=7.0), regime=r)
    assert r.regime == CONTROLLED and r.step == 60


@pytest.mark.parametrize("metric, value, reason", [
    ("train/loss", math.nan, "train/loss is nan"),
    ("logits/rms", math.inf, "logits/rms is inf"),
    ("layers.0/act_rms", 101.0, "layers.0/act_rms at 101x its initial scale > 100"),
    ("layers.0.weight/grad_rms", 1001.0, "layers.0.weight/grad_rms at 1e+03x its initial scale > 1000"),
    ("train/loss", 101.0, "train/loss = 101 > 100"),
])
def test_catastrophic_by_each_criterion(metric, value, reason):
    late = _m(30)
    late[metric] = value
    r = _run(_m(0), _m(10), late)
    assert r.regime == CATASTROPHIC and r.step == 30 and r(late) is True
    assert [str(e) for e in r.evidence] == [f"step 30: {reason} -> catastrophic"]


def test_the_readout_layer_is_not_a_hidden_layer():
    # layers.1 is the last layer (the logits): its growth is the logits', not a blow-up
    r = _run(_m(0), _m(10, out=150.0))
    assert r.regime == STABLE
    r = _run(_m(0), _m(10, out=150.0), regime=Regime(hidden=r"layers\.\d+"))
    assert r.regime == CATASTROPHIC


def test_a_loss_that_rises_and_comes_back_is_not_catastrophic():
    # (the catapult at the edge of stability)
    r = _run(_m(0), _m(10, loss=0.5), _m(20, loss=4.0), _m(30, loss=0.1))
    assert r.regime == STABLE


def test_a_layer_initialised_near_zero_is_measured_against_the_hidden_scale():
    # (a residual branch's output projection: 0.005 at init, 1.0 once it learned)
    first = dict(_m(0), **{"proj/act_rms": 0.005})
    r = _run(first, dict(_m(10), **{"proj/act_rms": 1.0}), regime=Regime(hidden=["layers.0", "proj"]))
    assert r.regime == STABLE
    _run(dict(_m(20), **{"proj/act_rms": 150.0}), regime=r)
    assert r.regime == CATASTROPHIC and "proj/act_rms at 150x" in str(r.evidence[0])


def test_controlled_divergence_then_catastrophic_keeps_both_steps():
    r = _run(_m(0), _m(10, logits=4.0), _m(20, logits=4.0, act=1e3), _m(30, loss=math.nan))
    assert r.regime == CATASTROPHIC and r.step == 20 and r.reached == {CONTROLLED: 10, CATASTROPHIC: 20}
    assert [e.regime for e in r.evidence] == [CONTROLLED, CATASTROPHIC]
    assert r.history[-1] == (30, CATASTROPHIC) and len(r.evidence) == 2  # (nothing added once catastrophic)


def test_a_measurement_seen_twice_counts_once_and_diverged_marks_the_run():
    r = _run(_m(0), _m(10), _m(10, loss=math.nan))
    assert r.regime == STABLE and r.history == [(0, STABLE), (10, STABLE)]
    r.diverged(13, "the training loss of step 13 is NaN")
    assert r.regime == CATASTROPHIC and r.step == 13
    assert r.summary()["regime_evidence"] == ["step 13: the training loss of step 13 is NaN -> catastrophic"]


def test_state_dict_round_trip():
    a = _run(_m(0, logits=2.0), _m(10, logits=7.0))
    b = Regime()
    b.load_state_dict(a.state_dict())
    for r in (a, b):
        r.observe(_m(20, act=500.0))
    assert a.summary() == b.summary() and a.history == b.history


def test_bad_arguments():
    with pytest.raises(ValueError, match="Criteria.act_growth must be a finite number > 1"):
        Criteria(act_growth=0.5)
    with pytest.raises(ValueError, match="Criteria.logit_growth"):
        Criteria(logit_growth=math.nan)
    with pytest.raises(TypeError, match="criteria must be a spkern.regime.Criteria"):
        Regime(criteria={"act_growth": 10})
    with pytest.raises(TypeError, match="hidden must be"):
        Regime(hidden=3)
    with pytest.raises(TypeError, match="takes a measurement"):
        Regime().observe({"train/loss": 1.0})


# -- on real training, against the criterion computed with plain torch --------------------


def _mlp(width, seed=0):
    """In SP: He initialisation (O(1) activations and logits)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 5))
    for layer in model[::2]:
        nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        nn.init.zeros_(layer.bias)
    return model


def _data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(96, 16, generator=g)
    return x, (x[:, :5] * 3).argmax(1)


def _train(width, lr, steps=20, regime=True, every=5):
    model = _mlp(width)
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    tracker = spkern.Tracker(model, opt, probe=x[:32], every=every)
    r = Regime().start(tracker) if regime else None
    logits = []
    for step in range(steps):
        i = torch.arange(step * 16, step * 16 + 16) % 96
        loss = nn.functional.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        tracker.record_loss(loss)
        opt.step()
        with torch.no_grad():
            logits.append(model(x[:32]).double().pow(2).mean().sqrt().item())
        if r is not None and tracker.measured_step == tracker.steps and r(tracker.metrics()):
            break
    tracker.close()
    return model, r, logits


@pytest.mark.parametrize("width, lr", [(32, 0.1), (256, 1.0), (1024, 0.3), (1024, 1.0)])
def test_the_label_on_an_mlp_follows_the_logits_computed_with_plain_torch(width, lr):
    with torch.no_grad():
        x, _ = _data()
        initial = _mlp(width)(x[:32]).double().pow(2).mean().sqrt().item()
    _, r, logits = _train(width, lr)
    grown = [v / max(initial, 1.0) for s, v in enumerate(logits, 1) if s % 5 == 0 and s <= 20]  # (O(1): at least 1)
    want = CONTROLLED if max(grown) > 3 else STABLE
    assert r.regime == want, (grown, r.summary())
    if want == CONTROLLED:
        first = 5 * (1 + next(i for i, g in enumerate(grown) if g > 3))
        assert r.step == first


def test_an_lr_far_too_large_is_catastrophic_and_stops():
    _, r, logits = _train(64, 50.0)
    assert r.regime == CATASTROPHIC and len(logits) == r.step < 20


def test_labelling_a_run_does_not_change_its_training():
    a, _, _ = _train(64, 0.3, regime=False)
    b, _, _ = _train(64, 0.3, regime=True)  # (a measurement at step 0 in addition)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_a_transformers_gpt2_is_labelled():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0))
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    for lr, want in ((1e-4, STABLE), (1e4, CATASTROPHIC)):
        m = transformers.GPT2LMHeadModel(model.config)
        m.load_state_dict(model.state_dict())
        opt = torch.optim.SGD(m.parameters(), lr=lr)
        tracker = spkern.Tracker(m, opt, probe=ids[:2], every=2)
        r = Regime().start(tracker)
        assert r.history == [(0, STABLE)] and "logits/rms" in r._base
        for _ in range(6):
            loss = m(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            tracker.record_loss(loss)
            opt.step()
            if tracker.measured_step == tracker.steps and r(tracker.metrics()):
                break
        tracker.close()
        assert r.regime == want, r.summary()


@pytest.mark.parametrize("lr", [1.0, 3.0, 30.0])
def test_on_transformers_gpt2_the_logits_criterion_follows_a_float64_reference(lr):
    # the logit RMS on the probe computed here in float64 with plain torch, on a copy of the model
    import copy

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0))
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))

    def logit_rms():
        with torch.no_grad():
            return copy.deepcopy(model).double()(input_ids=ids[:2]).logits.pow(2).mean().sqrt().item()

    initial = max(logit_rms(), 1.0)  # (counted as at least 1: Criteria.logit_floor)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    tracker = spkern.Tracker(model, opt, probe=ids[:2], every=1)
    r = Regime().start(tracker)
    ratios = []
    for _ in range(12):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        tracker.record_loss(loss)
        opt.step()
        ratios.append(logit_rms() / initial)
        if r(tracker.metrics()):
            break
    tracker.close()
    first = next((s for s, v in enumerate(ratios, 1) if v > 3), None)
    if first is None:
        assert CONTROLLED not in r.reached, r.summary()
        return
    assert r.reached[CONTROLLED] == first, (ratios, r.summary())
    ev = next(e for e in r.evidence if e.regime == CONTROLLED)
    assert ev.quantity == "logits/rms" and ev.value == pytest.approx(ratios[first - 1], rel=1e-4)

"""The tracker on a zoo of layers and training setups, each in every probe mode, checked
two ways: training with the tracker is training without it, bit for bit (losses, weights,
buffers), and every metric the tracker reports equals a float64 reference computed here
with plain torch from copies of the model (its layers' inputs and outputs seen by hooks
of the test's own, the measured quantities written out below), not with spkern's code.

The reference of a layer's refined coordinate check is its definition: with f(x; θ) the
layer's forward with its biases at zero (evaluation mode),
eff = f(x_t; θ_t) - f(x_t; θ_0) and prop = f(x_t; θ_0) - f(x_0; θ_0), over all the
layer's applications in the pass; attention's projections are F.linear with their
weights, on the inputs written out in ``_attention``.
"""

import copy
import dataclasses
import math
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize
from torch.utils.checkpoint import checkpoint

import spkern

MODES = ["fixed", "first batch", "batch"]


# -- the zoo's layers ----------------------------------------------------------------------

class LoRALinear(nn.Linear):
    """A Linear with a low-rank adapter: the base weight frozen, y = x W^T + b + s x A^T B^T."""

    def __init__(self, n_in, n_out, rank=2, scale=2.0):
        super().__init__(n_in, n_out)
        self.weight.requires_grad_(False)
        self.A = nn.Parameter(torch.randn(rank, n_in) / n_in**0.5)
        self.B = nn.Parameter(torch.randn(n_out, rank) * 0.1)
        self.scale = scale

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.scale * F.linear(F.linear(x, self.A), self.B)


class Twice(nn.Module):
    """One Linear applied twice (a shared block)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(10, 16)
        self.shared = nn.Linear(16, 16)
        self.out = nn.Linear(16, 5)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        return self.out(torch.tanh(self.shared(h)))


class Ckpt(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(10, 16)
        self.b = nn.Linear(16, 5)

    def forward(self, x):
        return checkpoint(lambda t: self.b(torch.relu(self.a(t))), x, use_reentrant=False)


class Tokens(nn.Module):
    """Embedding (optionally max_norm), a Linear, and a head tied to the embedding."""

    def __init__(self, max_norm=None, tied=True):
        super().__init__()
        self.emb = nn.Embedding(13, 8, max_norm=max_norm)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 13, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.mid(self.emb(idx) * 3)))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.enc(x).mean(1))


def _mlp(*widths, act=nn.ReLU, bias=True):
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def _parametrized(kind):
    lin = nn.Linear(12, 12)
    if kind == "weight_norm":
        parametrizations.weight_norm(lin)
    elif kind == "spectral_norm":
        parametrizations.spectral_norm(lin)
    elif kind == "orthogonal":
        parametrizations.orthogonal(lin)
    else:
        torch.nn.utils.spectral_norm(lin)  # the old, hook-based one
    return nn.Sequential(nn.Linear(10, 12), nn.Tanh(), lin, nn.Tanh(), nn.Linear(12, 5))


def _gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


# -- the setups ----------------------------------------------------------------------------

def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _vectors(n=12, d=10, classes=5, steps=3, seed=1):
    g = _gen(seed)
    return [(torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)) for _ in range(steps)]


def _tokens(vocab=13, steps=3, seed=1, shape=(3, 6)):
    g = _gen(seed)
    out = []
    for _ in range(steps):
        idx = torch.randint(0, vocab, shape, generator=g)
        out.append((idx, idx))
    return out


def _ce(out, y):
    if not isinstance(out, torch.Tensor):
        out = out.logits
    return F.cross_entropy(out.flatten(0, -2).float(), y.flatten())


@dataclasses.dataclass
class Setup:
    build: Callable[[], nn.Module]
    batches: Callable[[], list]  # [(input, target)] per step
    optim: str = "sgd"  # "sgd" (torch), "spkern" (spkern.optim.SGD), "adamw" (torch)
    lr: float = 0.2
    accum: int = 1  # micro-batches per step (the batch split in equal parts)
    autocast: bool = False  # bfloat16 autocast of the training forward
    scaler: bool = False  # torch.amp.GradScaler
    freeze: Optional[tuple] = None  # (step, module name): frozen from that step on (grad None)
    kwargs: bool = False  # the model takes input_ids=
    tol: float = 2e-4  # relative tolerance of the comparison with float64
    expect: tuple = ()  # layers that must be tracked (with their refined coordinate check)


SETUPS = {
    "mlp": Setup(lambda: _mlp(10, 16, 16, 5), _vectors, optim="spkern"),
    "inplace relu": Setup(lambda: _mlp(10, 16, 16, 5, act=lambda: nn.ReLU(inplace=True)), _vectors),
    "conv + batchnorm": Setup(lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                                    nn.Flatten(), nn.Linear(4 * 5 * 4, 5)),
                              lambda: [(torch.randn(6, 2, 5, 4, generator=g), torch.randint(0, 5, (6,), generator=g))
                                       for g in [_gen(1)] for _ in range(3)], expect=("0", "4")),
    "conv1d": Setup(lambda: nn.Sequential(nn.Conv1d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 5, 5)),
                    lambda: [(torch.randn(6, 3, 7, generator=g), torch.randint(0, 5, (6,), generator=g))
                             for g in [_gen(1)] for _ in range(3)]),
    "embedding tied": Setup(Tokens, _tokens, optim="adamw", lr=0.05, expect=("emb", "mid", "head")),
    "embedding max_norm": Setup(lambda: Tokens(max_norm=1.0, tied=False), _tokens, lr=0.5),
    "gpt2": Setup(_gpt2, lambda: _tokens(vocab=32), optim="adamw", lr=0.02, kwargs=True,
                  expect=("transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj", "lm_head")),
    "transformer encoder (attention)": Setup(Encoder, lambda: [(torch.randn(4, 5, 8, generator=g),
                                                                torch.randint(0, 5, (4,), generator=g))
                                                               for g in [_gen(1)] for _ in range(3)],
                                             expect=("enc.self_attn.in_proj", "enc.self_attn.out_proj",
                                                     "enc.linear1", "enc.linear2")),
    "lora adapter": Setup(lambda: nn.Sequential(LoRALinear(10, 16), nn.Tanh(), nn.Linear(16, 5)), _vectors,
                          expect=("0",)),
    "weight_norm": Setup(lambda: _parametrized("weight_norm"), _vectors, expect=("2",)),
    "spectral_norm": Setup(lambda: _parametrized("spectral_norm"), _vectors, expect=("2",)),
    "orthogonal": Setup(lambda: _parametrized("orthogonal"), _vectors, lr=0.05, expect=("2",)),
    "old spectral_norm": Setup(lambda: _parametrized("old"), _vectors, expect=("2",)),
    "applied twice": Setup(Twice, _vectors, expect=("shared",)),
    "frozen mid-training": Setup(lambda: _mlp(10, 16, 16, 5), lambda: _vectors(steps=4), optim="spkern",
                                 freeze=(3, "2")),
    "gradient accumulation": Setup(lambda: _mlp(10, 16, 16, 5), _vectors, accum=2),
    "checkpointing": Setup(Ckpt, _vectors),
    "bf16 autocast": Setup(lambda: _mlp(10, 16, 16, 5), _vectors, autocast=True, tol=2e-2),
    "GradScaler": Setup(lambda: _mlp(10, 16, 16, 5), _vectors, scaler=True),
    "bf16 parameters": Setup(lambda: _mlp(10, 16, 16, 5).to(torch.bfloat16),
                             lambda: [(x.bfloat16(), y) for x, y in _vectors()], optim="spkern", lr=0.5, tol=3e-2),
}


# -- training ------------------------------------------------------------------------------

def _call(setup, x):
    return ((), {"input_ids": x}) if setup.kwargs else ((x,), {})


def _train(setup, mode=None):
    """Trains the setup, with a tracker in ``mode`` (None: none); returns what the run did:
    losses, the state after each step, the gradients at each step and the tracker's
    metrics after each step."""
    torch.manual_seed(0)
    model = setup.build()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = {"sgd": lambda: torch.optim.SGD(params, lr=setup.lr, momentum=0.9),
           "spkern": lambda: spkern.optim.SGD(params, lr=setup.lr, momentum=0.9),
           "adamw": lambda: torch.optim.AdamW(params, lr=setup.lr)}[setup.optim]()
    batches = setup.batches()
    tracker = None
    if mode is not None:
        probe = {"fixed": _call(setup, batches[0][0][:5]), "first batch": None, "batch": "batch"}[mode]
        tracker = spkern.Tracker(model, opt, probe=probe, op_tol=1e-6, row_l2=True)
    scaler = torch.amp.GradScaler("cpu") if setup.scaler else None
    run = {"losses": [], "states": [_state(model)], "pre": [], "grads": [], "metrics": [], "model": model,
           "tracker": tracker}
    torch.manual_seed(123)
    for step, (x, y) in enumerate(batches, 1):
        if setup.freeze is not None and step == setup.freeze[0]:
            model.get_submodule(setup.freeze[1]).requires_grad_(False)
        opt.zero_grad(set_to_none=True)
        for part_x, part_y in zip(x.chunk(setup.accum), y.chunk(setup.accum)):
            args, kwargs = _call(setup, part_x)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=setup.autocast):
                out = model(*args, **kwargs)
            loss = _ce(out, part_y) / setup.accum
            (scaler.scale(loss) if scaler is not None else loss).backward()
            run["losses"].append(loss.detach().clone())
        if tracker is not None:
            tracker.record_loss(loss)
        if scaler is not None:
            scaler.unscale_(opt)
        run["grads"].append({n: p.grad.detach().clone() if p.grad is not None else None
                             for n, p in model.named_parameters()})
        run["pre"].append(_state(model))  # (the weights the step starts from: a forward may write them)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        run["states"].append(_state(model))
        if tracker is not None:
            run["metrics"].append(tracker.metrics())
    run["batches"] = batches
    return run


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


# -- the float64 reference -----------------------------------------------------------------

def _attention(mha, x):
    """(in_proj input, output), (out_proj input, output) of self-attention on x, written out."""
    n, t, e = x.shape
    h = mha.num_heads
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)
    q, k, v = (z.reshape(n, t, h, e // h).transpose(1, 2) for z in qkv.chunk(3, -1))
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(e // h), -1) @ v
    ctx = att.transpose(1, 2).reshape(n, t, e)
    return (x, qkv), (ctx, F.linear(ctx, mha.out_proj.weight, mha.out_proj.bias))


def _reference_pass(setup, model, state, call, training, dtype, autocast):
    """A copy of the model with ``state`` (in ``dtype``), run on ``call`` in ``training``
    mode: {layer: [(input, output)]} of the modules and attention projections, the
    model's output, and the copy."""
    m = copy.deepcopy(model)
    m.load_state_dict({k: v for k, v in state.items()})
    m.to(dtype)
    seen, hooks = {}, []
    for name, mod in m.named_modules():
        if ".parametrizations." in f".{name}.":
            continue
        hooks.append(mod.register_forward_hook(  # (copies: the model may change them in place later)
            lambda mod, a, o, name=name: seen.setdefault(name, []).append(
                (a[0].detach().clone() if a and isinstance(a[0], torch.Tensor) else None,
                 (o if isinstance(o, torch.Tensor) else o[0]).detach().clone()))))
        if isinstance(mod, nn.MultiheadAttention):
            def attention(mod, a, kw, o, name=name):
                (xi, yi), (xo, yo) = _attention(mod, a[0])
                seen.setdefault(f"{name}.in_proj", []).append((xi.detach(), yi.detach()))
                seen.setdefault(f"{name}.out_proj", []).append((xo.detach(), yo.detach()))
            hooks.append(mod.register_forward_hook(attention, with_kwargs=True))
    m.train(training)
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        cast = lambda v: v.to(dtype) if v.is_floating_point() else v  # noqa: E731
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = m(*[cast(a) for a in call[0]], **{k: cast(v) for k, v in call[1].items()})
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
        for h in hooks:
            h.remove()
    return seen, (out if isinstance(out, torch.Tensor) else out.logits).detach(), m


def _copy(model, state, dtype):
    m = copy.deepcopy(model)
    m.load_state_dict(state)
    return m.to(dtype)


def _theta(module):
    """{name: float64 tensor} of a module's own parameters (parametrizations' originals)."""
    out = {n: p.detach().double() for n, p in module._parameters.items() if p is not None}
    if parametrize.is_parametrized(module):
        for pn, plist in module.parametrizations.items():
            for n, p in plist.named_parameters():
                out[f"parametrizations.{pn}.{n}"] = p.detach().double()
    return out


def _f(module, x, theta):
    """The layer's map f(x; θ) in float64: its forward in eval mode with θ, biases at zero."""
    mod = copy.deepcopy(module).double().eval()
    params = {n: (torch.zeros_like(t) if n.rsplit(".", 1)[-1] == "bias" else t.clone()) for n, t in theta.items()}
    with torch.no_grad():
        out = torch.func.functional_call(mod, params, (x.double() if x.is_floating_point() else x,))
    return (out if isinstance(out, torch.Tensor) else out[0]).double()


def _sq(ts):
    return sum(t.double().square().sum().item() for t in ts)


def _numel(ts):
    return sum(t.numel() for t in ts)


def _op(a):
    return torch.linalg.matrix_norm(a.double().reshape(a.shape[0], -1), 2).item()


def _reference(setup, run, mode, step, tracker_layers):
    """{metric: float64 value} of the measurement after ``step`` (1-based)."""
    model, states, batches = run["model"], run["states"], run["batches"]
    if mode == "batch":  # the step's forward (its first micro-batch), before its update
        x = batches[step - 1][0].chunk(setup.accum)[0]
        call, training, at = _call(setup, x), True, step - 1
    else:
        x = batches[0][0][:5] if mode == "fixed" else batches[0][0].chunk(setup.accum)[0]
        call, training, at = _call(setup, x), False, step
    exact = not (setup.autocast or any(v.dtype == torch.bfloat16 for v in states[0].values()))
    dtype = torch.float64 if exact else next(v.dtype for v in states[0].values() if v.is_floating_point())
    autocast = setup.autocast and mode == "batch"
    torch.manual_seed(0)
    now, out_t, m_t = _reference_pass(setup, model, states[at], call, training, dtype, autocast)
    ref, out_0, _ = _reference_pass(setup, model, states[0], call, training, dtype, autocast)
    m_0 = _copy(model, states[0], dtype)  # θ_0: the parameters and buffers at initialisation
    if mode != "batch":  # θ_t: the parameters as the optimizer left them (the probe pass writes none)
        m_t = _copy(model, states[at], dtype)
    want = {}
    for name in tracker_layers:
        kind = tracker_layers[name]
        apps_t, apps_0 = now.get(name, []), ref.get(name, [])
        assert apps_t, f"{name}: not applied in the reference"
        hs, hs0 = [h for _, h in apps_t], [h for _, h in apps_0]
        want[f"{name}/act_rms"] = math.sqrt(_sq(hs) / _numel(hs))
        want[f"{name}/zero_frac"] = sum((h == 0).sum().item() for h in hs) / _numel(hs)
        want[f"{name}/change_rms"] = math.sqrt(_sq([a.double() - b.double() for a, b in zip(hs, hs0)]) / _numel(hs))
        if kind == "output":
            continue
        xs, xs0 = [x for x, _ in apps_t], [x for x, _ in apps_0]
        if xs[0].is_floating_point():
            dx = [a.double() - b.double() for a, b in zip(xs, xs0)]
            want[f"{name}/input_rms"] = math.sqrt(_sq(xs) / _numel(xs))
            want[f"{name}/input_zero_frac"] = sum((t == 0).sum().item() for t in xs) / _numel(xs)
            want[f"{name}/input_change_rms"] = math.sqrt(_sq(dx) / _numel(xs))
            want[f"{name}/input_row_l2"] = sum(t.double().reshape(-1, t.shape[-1]).norm(dim=1).sum().item()
                                               for t in xs) / sum(t.reshape(-1, t.shape[-1]).shape[0] for t in xs)
            want[f"{name}/input_change_row_l2"] = (sum(t.reshape(-1, t.shape[-1]).norm(dim=1).sum().item() for t in dx)
                                                   / sum(t.reshape(-1, t.shape[-1]).shape[0] for t in dx))
        # f(x; θ): attention's projections are F.linear with their weights; the others their forward
        if name.endswith(("in_proj", "out_proj")) and isinstance(m_t.get_submodule(name.rsplit(".", 1)[0]),
                                                                 nn.MultiheadAttention):
            mha_t, mha_0 = m_t.get_submodule(name.rsplit(".", 1)[0]), m_0.get_submodule(name.rsplit(".", 1)[0])
            attr = "in_proj_weight" if name.endswith("in_proj") else "out_proj.weight"
            w_t, w_0 = mha_t.get_parameter(attr).double(), mha_0.get_parameter(attr).double()

            def f(x, which):
                return F.linear(x.double(), w_t if which == "t" else w_0)
        else:
            mod_t, mod_0 = m_t.get_submodule(name), m_0.get_submodule(name)
            th_t, th_0 = _theta(mod_t), _theta(mod_0)
            w_t = w_0 = None
            if kind != "generic":
                w_t, w_0 = (_weight64(mod) for mod in (mod_t, mod_0))

            def f(x, which, mod_t=mod_t, mod_0=mod_0):
                return _f(mod_t, x, th_t) if which == "t" else _f(mod_0, x, th_0)
        eff = [f(x, "t") - f(x, "0") for x in xs]
        prop = [f(x, "0") - f(x0, "0") for x, x0 in zip(xs, xs0)]
        want[f"{name}/eff_rms"] = math.sqrt(_sq(eff) / _numel(eff))
        want[f"{name}/prop_rms"] = math.sqrt(_sq(prop) / _numel(prop))
        if kind != "conv":
            want[f"{name}/eff_row_l2"] = (sum(t.reshape(-1, t.shape[-1]).norm(dim=1).sum().item() for t in eff)
                                          / sum(t.reshape(-1, t.shape[-1]).shape[0] for t in eff))
            want[f"{name}/prop_row_l2"] = (sum(t.reshape(-1, t.shape[-1]).norm(dim=1).sum().item() for t in prop)
                                           / sum(t.reshape(-1, t.shape[-1]).shape[0] for t in prop))
        if w_t is not None:
            op = _op(w_t - w_0)
            want[f"{name}/delta_w_op"] = op
            if kind in ("linear", "map") and xs[0].is_floating_point():
                want[f"{name}/eff_align"] = _align(_sq(eff), _sq(xs), op)
                want[f"{name}/prop_align"] = _align(_sq(prop), _sq(dx), _op(w_0))
    want["logits/rms"] = out_t.double().square().mean().sqrt().item()
    want["logits/change_rms"] = (out_t.double() - out_0.double()).square().mean().sqrt().item()
    want["logits/max_abs"] = out_t.double().abs().max().item()
    # the parameter statistics of the step
    before, after, grads = run["pre"][step - 1], states[step], run["grads"][step - 1]
    for n, _ in model.named_parameters():
        p, q, p0 = after[n].double(), before[n].double(), states[0][n].double()
        k = max(p.numel(), 1)
        want[f"{n}/update_rms"] = (p - q).norm().item() / math.sqrt(k)
        want[f"{n}/relative_update"] = (p - q).norm().item() / p.norm().item()
        want[f"{n}/drift_rms"] = (p - p0).norm().item() / math.sqrt(k)
        want[f"{n}/weight_rms"] = p.norm().item() / math.sqrt(k)
        if grads[n] is not None:
            want[f"{n}/grad_rms"] = grads[n].double().norm().item() / math.sqrt(k)
    want["train/loss"] = run["losses"][step * setup.accum - 1].item()
    return want


def _weight64(module):
    """The layer's weight matrix in float64, as its forward uses it (eval mode)."""
    mod = copy.deepcopy(module).double().eval()
    if isinstance(mod, nn.Linear) and "weight_orig" in mod._parameters:  # the old spectral_norm
        return None
    with torch.no_grad():
        return mod.weight.detach().double()


def _align(num, den, op):
    if num == 0:
        return math.nan if (den == 0 or op == 0) else 0.0
    return min(1.0, math.sqrt(num / den) / op)


def _close(got, want, tol, scale):
    if math.isnan(want) or math.isnan(got):
        return math.isnan(want) and math.isnan(got)
    return math.isclose(got, want, rel_tol=tol, abs_tol=tol * scale)


# -- the tests -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def untracked():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = _train(SETUPS[name])
        return cache[name]
    return get


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(SETUPS))
def test_zoo(name, mode, untracked):
    setup = SETUPS[name]
    base = untracked(name)
    run = _train(setup, mode)
    tracker = run["tracker"]
    # 1. training with the tracker is training without it, bit for bit
    assert torch.equal(torch.stack(run["losses"]), torch.stack(base["losses"]))
    for k, v in base["states"][-1].items():
        assert torch.equal(run["states"][-1][k], v), k
    # 2. every metric it reports is the float64 reference's
    kinds = {n: ("conv" if isinstance(layer.module, (nn.Conv1d, nn.Conv2d)) else
                 "output" if not layer.rcc else layer.kind) for n, layer in tracker.layers.items()}
    for n in setup.expect:
        assert n in kinds and kinds[n] != "output", (n, kinds)
    checked = 0
    for step, got in enumerate(run["metrics"], 1):
        assert got["step"] == step
        want = _reference(setup, run, mode, step, kinds)
        scale = {}
        for k, v in want.items():
            layer = k.rsplit("/", 1)[0]
            scale[layer] = max(scale.get(layer, 0.0), abs(v) if k.endswith(("act_rms", "input_rms", "/rms")) else 0)
        for k, v in got.items():
            if k in ("step",) or k.endswith("/op_iters"):
                continue
            assert k in want, f"{k} has no reference"
            layer = k.rsplit("/", 1)[0]
            tol = setup.tol * (5 if k.endswith(("_align", "delta_w_op")) else 1)
            if k.endswith("eff_align") and want[f"{layer}/eff_rms"] < 1e-5 * scale[layer]:
                continue  # (a ratio of rounding errors: the weight has not moved but by a parametrization's state)
            assert _close(v, want[k], tol, scale.get(layer, 0.0) or abs(want[k])), (step, k, v, want[k])
            checked += 1
        # (spkern's optimizer: the tracker covers the parameters it steps)
        stepped = {n for n, p in run["model"].named_parameters() if p.requires_grad or setup.freeze}
        missing = [k for k in want if k not in got and not k.endswith("_row_l2")
                   and not (setup.optim == "spkern" and k.rsplit("/", 1)[0] in dict(run["model"].named_parameters())
                            and k.rsplit("/", 1)[0] not in stepped)]
        assert not missing, f"not reported: {missing[:6]}"
    assert checked > 30
    tracker.close()

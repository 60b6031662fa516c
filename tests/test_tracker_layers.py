"""The tracker on the layers people's models are made of: every layer that applies a
weight as a linear map gets the refined coordinate check (checked against a float64
computation from the layer's own inputs), norm layers by duck type, parameters of no
layer, the extension point, and Hugging Face's GPT-2."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spkern
from spkern.monitor.layers import is_norm, linear_map


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D as it is written there: y = x W + b, W (in, out)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * nx**-0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        shape = x.shape[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(shape)


class LayerNorm(nn.Module):
    """nanoGPT's LayerNorm: its own class, an optional bias."""

    def __init__(self, n, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


def _rms(t):
    return t.double().pow(2).mean().sqrt().item()


def _inputs(model, names, probe):
    """Each named layer's input on the probe (float64 copies), the model in eval mode."""
    got, hooks = {}, []
    mods = dict(model.named_modules())
    for n in names:
        hooks.append(mods[n].register_forward_hook(lambda m, a, o, n=n: got.__setitem__(n, a[0].detach().clone())))
    was = model.training
    model.eval()
    with torch.no_grad():
        model(probe)
    model.train(was)
    for h in hooks:
        h.remove()
    return got


def _apply(kind, x, w):
    x64, w64 = (x.double() if x.is_floating_point() else x), w.double()
    if kind == "linear":
        return F.linear(x64, w64)
    if kind == "conv1d_hf":
        return x64 @ w64
    if kind == "embedding":
        return F.embedding(x, w64)
    return F.conv2d(x64, w64, padding=1)


def _model(kind):
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 5)), torch.randn(9, 6)
    if kind == "conv1d_hf":
        return nn.Sequential(Conv1D(12, 6), nn.Tanh(), Conv1D(5, 12)), torch.randn(3, 4, 6)
    if kind == "embedding":
        return nn.Sequential(nn.Embedding(17, 8), nn.Tanh(), nn.Linear(8, 5)), torch.randint(0, 17, (4, 6))
    return (nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 4, 3, padding=1)),
            torch.randn(2, 3, 7, 5))


@pytest.mark.parametrize("kind", ["linear", "conv1d_hf", "embedding", "conv2d"])
def test_rcc_of_every_linear_map_against_float64(kind):
    model, probe = _model(kind)
    first, second = "0", "2"
    w0 = {n: dict(model.named_modules())[n].weight.detach().clone() for n in (first, second)}
    x0 = _inputs(model, (first, second), probe)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    tracker = spkern.Tracker(model, opt, probe=probe)
    for _ in range(3):
        opt.zero_grad()
        model(probe).float().pow(2).mean().backward()
        opt.step()
    m = tracker.metrics()
    xt = _inputs(model, (first, second), probe)
    for n in (first, second):
        mod = dict(model.named_modules())[n]
        k = "linear" if isinstance(mod, nn.Linear) else kind
        dw = mod.weight.detach() - w0[n]
        eff = _apply(k, xt[n], dw)
        prop = _apply(k, xt[n], w0[n]) - _apply(k, x0[n], w0[n])
        assert math.isclose(m[f"{n}/eff_rms"], _rms(eff), rel_tol=1e-4), (n, m[f"{n}/eff_rms"], _rms(eff))
        assert math.isclose(m[f"{n}/prop_rms"], _rms(prop), rel_tol=1e-4, abs_tol=1e-9), n
        exact = torch.linalg.matrix_norm(dw.double().reshape(dw.shape[0], -1), 2).item()
        assert m[f"{n}/delta_w_op"] <= exact * (1 + 1e-5) and m[f"{n}/delta_w_op"] > 0.5 * exact, n
        assert f"{n}.weight/drift_rms" in m and f"{n}/act_rms" in m
    if kind == "embedding":  # indices in: no input statistics, and a fixed probe has no propagating update
        assert "0/input_rms" not in m and m["0/prop_rms"] == 0 and "0/eff_align" not in m
    if kind == "conv2d":
        assert "0/eff_align" not in m and "0/input_rms" in m


def test_norm_layers_by_duck_type_and_parameters_of_no_layer():
    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(3, 8, 2, stride=2)
            self.cls_token = nn.Parameter(torch.randn(1, 1, 8))
            self.pos_embed = nn.Parameter(torch.randn(1, 5, 8) * 0.1)
            self.norm = LayerNorm(8, bias=False)
            self.rms = nn.RMSNorm(8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            t = self.patch(x).flatten(2).transpose(1, 2)
            t = torch.cat([self.cls_token.expand(len(x), -1, -1), t], 1) + self.pos_embed
            return self.head(self.rms(self.norm(t)).mean(1))  # (every token: the patches learn)

    torch.manual_seed(0)
    model = ViT()
    x = torch.randn(4, 3, 4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    tracker = spkern.Tracker(model, opt, probe=x)
    assert set(tracker.names) == {"patch", "norm", "rms", "head"}
    for _ in range(2):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    m = tracker.metrics()
    for k in ("patch/eff_rms", "norm/act_rms", "rms/change_rms", "cls_token/drift_rms", "pos_embed/update_rms",
              "cls_token/grad_rms", "norm.weight/drift_rms"):
        assert k in m and m[k] > 0, k
    assert is_norm(model.norm) and is_norm(model.rms) and not is_norm(model.head) and linear_map(model.norm) is None


def test_layers_of_your_own_by_their_forward_and_register_layer():
    class Scaled(nn.Module):  # a layer of its own: y = 2 x W^T
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 6))

        def forward(self, x):
            return 2 * x @ self.weight.t()

    torch.manual_seed(0)
    model = nn.Sequential(Scaled(), nn.Tanh())
    x = torch.randn(3, 6)

    def train_one(tracker_kw):
        w0 = model[0].weight.detach().clone()
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        tracker = spkern.Tracker(model, opt, probe=x, **tracker_kw)
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
        dw = (model[0].weight.detach() - w0).double()
        m = tracker.metrics()
        tracker.close()
        return m, 2 * x.double() @ dw.t(), dw

    # unknown: measured through its own forward, f(x; θ_t) - f(x; θ_0); no operator norm
    m, eff, _ = train_one({})
    assert linear_map(model[0]) is None and m["0/eff_rms"] > 0
    assert math.isclose(m["0/eff_rms"], _rms(eff), rel_tol=1e-5) and "0/delta_w_op" not in m
    m, *_ = train_one({"modules": ["0"], "rcc": False})  # output statistics only
    assert "0/act_rms" in m and "0/eff_rms" not in m

    class ScaledMap(spkern.monitor.LinearMap):
        def apply(self, module, x, weight):
            return 2 * x @ weight.t()

    spkern.monitor.register_layer(Scaled, ScaledMap())
    try:
        m, eff, dw = train_one({})
        assert math.isclose(m["0/eff_rms"], _rms(eff), rel_tol=1e-5)
        exact = torch.linalg.matrix_norm(dw, 2).item()  # (one step of SGD: a rank-one change, found at once)
        assert math.isclose(m["0/delta_w_op"], exact, rel_tol=1e-4) and 0 <= m["0/eff_align"] <= 1
        with pytest.raises(TypeError, match="LinearMap"):
            spkern.monitor.register_layer(Scaled, object())
    finally:
        from spkern.monitor import layers
        layers._LAYERS[:] = [(t, mp) for t, mp in layers._LAYERS if t is not Scaled]


def test_hf_gpt2_every_projection_measured():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (4, 12), generator=g)
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[0, -3:] = 0
    opt = spkern.optim.AdamW(model.named_parameters(), lr=1e-2)
    tracker = spkern.Tracker(model, opt)  # the default probe: the first call, keyword arguments and mask
    for _ in range(2):
        opt.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        opt.step()
    m = tracker.metrics()
    args, kwargs = tracker.probe
    assert not args and torch.equal(kwargs["attention_mask"], mask) and torch.equal(kwargs["labels"], ids)
    projections = [f"transformer.h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                          "mlp.c_proj")]
    for n in projections:  # HF's Conv1D: every projection gets the RCC
        assert m[f"{n}/eff_rms"] > 0 and m[f"{n}/prop_rms"] > 0 and m[f"{n}/delta_w_op"] > 0, n
    for n in ("transformer.wte", "transformer.wpe", "lm_head", "transformer.ln_f"):
        assert f"{n}/act_rms" in m, n
    with torch.no_grad():
        model.eval()
        logits = model(**kwargs).logits
    assert math.isclose(m["logits/rms"], _rms(logits), rel_tol=1e-5)  # the ModelOutput's logits
    # the tied head shares the embedding's initial copy
    assert tracker.reference.weight0(tracker.layers["lm_head"]) is tracker.reference.w0["transformer.wte.weight"]


def _tiny_gpt2(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def test_hf_fused_loss_equals_the_models_own():
    import spkern.hf

    own, fused = _tiny_gpt2(), _tiny_gpt2()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 64, (3, 10), generator=g)
    labels = ids.clone()
    labels[1, :4] = -100  # a prompt left out of the loss
    mask = torch.ones_like(ids)
    opt = torch.optim.SGD(fused.parameters(), lr=0.1)
    tracker = spkern.Tracker(fused, opt, probe={"input_ids": ids})
    handle = spkern.hf.fused_loss(fused, tracker=tracker)
    a = own(input_ids=ids, attention_mask=mask, labels=labels)
    b = fused(input_ids=ids, attention_mask=mask, labels=labels)
    assert b.logits.numel() == 0  # never materialised
    assert torch.allclose(a.loss, b.loss, rtol=1e-5, atol=1e-6)
    a.loss.backward()
    b.loss.backward()
    for (n, p), q in zip(own.named_parameters(), fused.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), n
    # Trainer's num_items_in_batch: a sum over the tokens divided by it
    c = fused(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(7))
    d = own(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(7))
    assert torch.allclose(c.loss, d.loss, rtol=1e-5)
    opt.zero_grad()
    b = fused(input_ids=ids, attention_mask=mask, labels=labels)  # (the batch the tracker records)
    b.loss.backward()
    opt.step()
    m = tracker.metrics()
    assert math.isclose(m["train/loss"], b.loss.item(), rel_tol=1e-6)
    valid = F.pad(labels, (0, 1), value=-100)[:, 1:] != -100
    logits = own(input_ids=ids, attention_mask=mask).logits.detach()[valid]
    assert math.isclose(m["train/logit_norm"], logits.double().norm(dim=-1).mean().item(), rel_tol=1e-4)
    assert m["transformer.h.0.attn.c_attn/eff_rms"] > 0
    with torch.no_grad():  # evaluation: the model's own forward, logits and all
        assert fused(input_ids=ids, labels=labels).logits.shape == (3, 10, 64)
    with pytest.raises(ValueError, match="already"):
        spkern.hf.fused_loss(fused)
    handle.remove()
    assert "forward" not in fused.__dict__ and fused(input_ids=ids, labels=labels).logits.shape == (3, 10, 64)

"""A compact GPT whose head loss is spkern's fused linear loss (the logits are never
materialised), initialised and given per-layer learning rates by a parameterization.

Pre-LayerNorm blocks: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``; causal self-attention
through ``F.scaled_dot_product_attention`` with heads of ``head_dim`` (the number of heads
grows with the width), optional LayerNorm on queries and keys per head (qk-LayerNorm); a
GELU MLP of 4 x width; learned positions; a final LayerNorm and an untied head.

Parameterizations (``lr_l = lr * (width / base_width) ** -c_l``, the exponents c by role
from the one table of :mod:`spkern.experiments.param`; the initialisation is the GPT's own):

=====  =================================================  ===============  ===============
name   init std                                           SGD c            Adam c
                                                          (emb/hid/head)   (emb/hid/head)
=====  =================================================  ===============  ===============
sp     0.02 everywhere; residual outputs 0.02/sqrt(2L)    0 / 0 / 0        0 / 0 / 0
mup    emb 0.02; hidden 0.02 sqrt(base/width) (residual   -1 / 0 / 1       0 / 1 / 1
       outputs / sqrt(2L)); head 0.02 base/width;
       attention scores scaled 1/head_dim
=====  =================================================  ===============  ===============

Embeddings, LayerNorm gains and biases count as "emb" (vector-like) parameters. Under
``sp`` attention scores are scaled by 1/sqrt(head_dim), as usual.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import spkern
from spkern.experiments import param as P

GPT_PARAMS = ("sp", "mup")  # their learning-rate exponents by role: spkern.experiments.param's table


@dataclass
class GPTConfig:
    vocab: int = 256
    width: int = 128
    depth: int = 2
    head_dim: int = 32
    context: int = 128
    qk_norm: bool = True
    param: str = "sp"
    base_width: int = 64

    def check(self):
        for name in ("vocab", "width", "depth", "head_dim", "context", "base_width"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.width % self.head_dim:
            raise ValueError(f"width ({self.width}) must be a multiple of head_dim ({self.head_dim})")
        if self.param not in GPT_PARAMS:
            raise ValueError(f"param must be one of {GPT_PARAMS} for the GPT, got {self.param!r}")
        return self


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.width // cfg.head_dim, cfg.head_dim
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)
        self.proj = nn.Linear(cfg.width, cfg.width, bias=False)
        self.q_norm = nn.LayerNorm(cfg.head_dim) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(cfg.head_dim) if cfg.qk_norm else nn.Identity()
        self.scale = 1.0 / cfg.head_dim if cfg.param == "mup" else 1.0 / math.sqrt(cfg.head_dim)

    tp_group = None  # tensor parallelism: this rank's heads only (tensor_parallel)

    def forward(self, x):
        B, T, C = x.shape
        # (under tensor parallelism the rank's heads: their q, k, v, laid out so by tensor_parallel)
        q, k, v = self.qkv(x).view(B, T, 3, -1, self.head_dim).unbind(2)
        q, k = self._norm(self.q_norm, q), self._norm(self.k_norm, k)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, scale=self.scale)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))

    def _norm(self, norm, x):
        if self.tp_group is None or not isinstance(norm, nn.LayerNorm):
            return norm(x)
        # every head shares the LayerNorm: under tensor parallelism each rank's gradient of
        # its gain and bias is its heads' part, summed over the ranks in the backward
        g = self.tp_group
        return F.layer_norm(x, norm.normalized_shape, _grad_summed(norm.weight, g), _grad_summed(norm.bias, g),
                            norm.eps)


class _GradSummed(torch.autograd.Function):
    """The identity, whose backward adds the gradient over a process group."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)  # (all_reduce writes in place)
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def _grad_summed(t, group):
    return _GradSummed.apply(t, group)


class MLPBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc = nn.Linear(width, 4 * width, bias=False)
        self.proj = nn.Linear(4 * width, width, bias=False)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(cfg.width), Attention(cfg)
        self.ln2, self.mlp = nn.LayerNorm(cfg.width), MLPBlock(cfg.width)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """``forward(idx)`` returns the final hidden states ``(B, T, width)``;
    ``forward(idx, targets)`` and :meth:`loss` apply the head through spkern's fused
    linear loss."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg.check()
        self.tok = nn.Embedding(cfg.vocab, cfg.width)
        self.pos = nn.Embedding(cfg.context, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.ln_f = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.vocab, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        cfg = self.cfg
        hidden = 0.02 * (math.sqrt(cfg.base_width / cfg.width) if cfg.param == "mup" else 1.0)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # LayerNorm gains stay 1, biases 0
            if name.startswith(("tok.", "pos.")):
                p.normal_(0.0, 0.02)
            elif name.startswith("head."):
                p.normal_(0.0, 0.02 * (cfg.base_width / cfg.width if cfg.param == "mup" else 1.0))
            else:
                residual_out = name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight")
                p.normal_(0.0, hidden / (math.sqrt(2 * cfg.depth) if residual_out else 1.0))

    def forward(self, idx, targets=None, kind: str = "ce", return_stats: bool = True):
        """Hidden states ``(B, T, width)``; with ``targets``, :meth:`loss` instead (so that
        a DistributedDataParallel wrapper runs the head too)."""
        if targets is not None:
            return self.loss(idx, targets, kind, return_stats)
        return self._hidden(idx)

    def _hidden(self, idx):
        T = idx.shape[1]
        if T > self.cfg.context:
            raise ValueError(f"sequence length {T} exceeds the context {self.cfg.context}")
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def loss(self, idx, targets, kind: str = "ce", return_stats: bool = True):
        """Mean loss per token over the head, without materialising the logits: ``ce``
        (cross-entropy) or ``mse`` (squared error of the softmax probabilities against
        one-hot targets, summed over the vocabulary); and the per-token logit statistics."""
        h = self._hidden(idx)
        w = self.head.weight
        if h.dtype != w.dtype:  # under autocast: the head in the activations' dtype
            w = w.to(h.dtype)
        if kind == "ce":
            return spkern.linear_cross_entropy(h, w, targets, return_stats=return_stats)
        if kind == "mse":
            out = spkern.linear_mse_onehot_loss(h, w, targets, on="probs", reduction="none",
                                                return_stats=return_stats)
            return (out[0].float().mean(), out[1]) if return_stats else out.float().mean()
        raise ValueError(f"kind must be 'ce' or 'mse', got {kind!r}")

    def role(self, name: str) -> str:
        if name.startswith("head."):
            return "output"
        if name.startswith(("tok.", "pos.")) or name.endswith("bias") or self.get_parameter(name).dim() < 2:
            return "input"
        return "hidden"

    def param_groups(self, optim: str, lr: float, weight_decay: float = 0.0):
        """Optimizer groups with each parameter's learning rate (and weight decay on
        matrices only), named for spkern.optim and the tracker."""
        if optim not in ("sgd", "adam"):
            raise ValueError(f"optim must be 'sgd' or 'adam', got {optim!r}")
        param = P.get(self.cfg.param)
        groups = {}
        for name, p in self.named_parameters():
            role = self.role(name)
            decay = weight_decay if p.dim() >= 2 and role != "input" else 0.0
            key = (role, decay)
            g = groups.setdefault(key, {"params": [], "param_names": [], "role": role, "weight_decay": decay,
                                        "lr": param.lr(lr, optim, role, self.cfg.width, self.cfg.base_width)})
            g["params"].append(p)
            g["param_names"].append(name)
        return list(groups.values())


def tensor_parallel(model: "GPT", mesh):
    """Splits the GPT over the ranks of a 1-D device mesh, as torchtitan and Megatron do: in
    each block the query/key/value projection and the MLP's first layer ``ColwiseParallel``
    (each rank its heads, its hidden units), the attention's and the MLP's output
    projections ``RowwiseParallel``; the head's weight sharded over the vocabulary for
    spkern's vocabulary-parallel fused loss. Embeddings and LayerNorms stay whole on every
    rank (the per-head q/k LayerNorms' gradients summed over the ranks). The qkv weight's
    rows are first laid out so that each rank's rows are its heads' q, k and v."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    n = mesh.size()
    cfg = model.cfg
    heads = cfg.width // cfg.head_dim
    for what, size in (("the number of heads (width / head_dim)", heads), ("the MLP's width (4 x width)", 4 * cfg.width),
                       ("the vocabulary", cfg.vocab)):
        if size % n:
            raise ValueError(f"tensor parallelism over {n} ranks needs {what}, {size}, to be a multiple of {n}")
    order = torch.arange(3 * cfg.width).view(3, n, -1).transpose(0, 1).reshape(-1)  # [q_r, k_r, v_r] per rank
    plan = {"head": ColwiseParallel()}
    for i, block in enumerate(model.blocks):
        with torch.no_grad():
            block.attn.qkv.weight.copy_(block.attn.qkv.weight[order])
        block.attn.tp_group = mesh.get_group()
        plan.update({f"blocks.{i}.attn.qkv": ColwiseParallel(), f"blocks.{i}.attn.proj": RowwiseParallel(),
                     f"blocks.{i}.mlp.fc": ColwiseParallel(), f"blocks.{i}.mlp.proj": RowwiseParallel()})
    parallelize_module(model, mesh, plan)
    return model


__all__ = ["GPT", "GPTConfig", "GPT_PARAMS", "tensor_parallel"]

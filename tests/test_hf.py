"""spkern with Hugging Face transformers as people use it: imported from the checkout, the
fused loss under the Trainer's default arguments, on tiny random-weight Llama, Qwen2 and
GPT-2 models."""

import inspect
import os
import subprocess
import sys

import pytest
import torch

import spkern
import spkern.hf

transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_transformers_imports_from_the_checkouts_root():
    # the checkout's kernels/ (spkern's Triton kernels) must not stand in for Hugging Face's
    # `kernels` package, which transformers imports
    code = ("import kernels, transformers\n"
            "from transformers import GPT2LMHeadModel, LlamaForCausalLM\n"
            "print(kernels.__file__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not proc.stdout.strip().startswith(os.path.join(ROOT, "kernels"))
    assert spkern.registry.triton_kernels("features") is None or \
        spkern.registry.triton_kernels("features").__name__ == "spkern.kernels.features"


def _model(arch, seed=0):
    torch.manual_seed(seed)
    common = dict(vocab_size=64, max_position_embeddings=32)
    if arch == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            **common))
    if arch == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            **common))
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0))


class Tokens(torch.utils.data.Dataset):
    """Rows of token ids with their mask and labels (a prompt left out of one loss)."""

    def __init__(self, n=8, length=12):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 64, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].clone()
        if i % 3 == 0:
            labels[:4] = -100
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": labels}


def test_the_fused_loss_keeps_the_models_signature():
    model = _model("llama")
    own = inspect.signature(model.forward)
    handle = spkern.hf.fused_loss(model)
    assert inspect.signature(model.forward) == own  # (the Trainer's column filter reads it)
    ids = Tokens()[1]["input_ids"][None]
    # labels passed positionally are found too
    position = list(own.parameters).index("labels")
    args = [None] * (position + 1)
    args[0], args[position] = ids, ids
    with torch.no_grad():
        want = model(input_ids=ids, labels=ids).loss  # (no gradients: the model's own loss)
    got = model(*args).loss
    assert got.grad_fn is not None and "spkern" in type(got.grad_fn).__name__
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    handle.remove()
    assert "forward" not in model.__dict__


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_the_fused_loss_under_the_trainer_with_its_default_arguments(arch, tmp_path):
    runs = {}
    for fused in (False, True):
        model = _model(arch)
        if fused:
            spkern.hf.fused_loss(model)
        args = transformers.TrainingArguments(output_dir=str(tmp_path / str(fused)), max_steps=3,
                                              per_device_train_batch_size=2, use_cpu=True, report_to="none",
                                              logging_steps=1, save_strategy="no")
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens())
        # the gradients of one batch, as the Trainer computes its loss
        batch = trainer.data_collator([Tokens()[i] for i in range(3)])
        model.zero_grad()
        trainer.compute_loss(model, dict(batch)).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        runs[fused] = losses, grads, {n: p.detach().clone() for n, p in model.named_parameters()}
    (loss_own, grad_own, w_own), (loss_fused, grad_fused, w_fused) = runs[False], runs[True]
    assert len(loss_own) == 3 and loss_fused == pytest.approx(loss_own, rel=1e-5)
    assert grad_own.keys() == grad_fused.keys()
    for n, g in grad_own.items():
        torch.testing.assert_close(grad_fused[n], g, rtol=1e-4, atol=1e-6, msg=n)
    for n, w in w_own.items():
        torch.testing.assert_close(w_fused[n], w, rtol=1e-4, atol=1e-5, msg=n)

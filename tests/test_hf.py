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


def _trainer(model, tmp_path, callbacks, **args):
    defaults = dict(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, use_cpu=True,
                    report_to="none", logging_steps=2, save_strategy="no", train_sampling_strategy="sequential",
                    learning_rate=1e-2)
    defaults.update(args)
    return transformers.Trainer(model=model, args=transformers.TrainingArguments(**defaults),
                                train_dataset=Tokens(), callbacks=callbacks)


def _logged(trainer):
    """{step: {key: value}} of the tracker's entries in the Trainer's log history."""
    return {h["step"]: {k: v for k, v in h.items() if k.startswith("spkern/")}
            for h in trainer.state.log_history if any(k.startswith("spkern/") for k in h)}


def test_the_trainer_callback_measures_and_logs_through_the_trainer(tmp_path):
    model = _model("llama")
    callback = spkern.hf.SpkernCallback()
    trainer = _trainer(model, tmp_path, [callback], report_to="tensorboard", gradient_accumulation_steps=2)
    trainer.train()
    tracker = callback.tracker
    assert tracker.steps == trainer.state.global_step == 4 and tracker.measured_step == 4  # (every logging_steps)
    logged = _logged(trainer)
    assert list(logged) == [2, 4]
    last = tracker.metrics()
    want = {"spkern/" + spkern.monitor.log.tag(k): v for k, v in last.items() if k != "step"}
    assert logged[4] == pytest.approx(want, nan_ok=True)
    assert "spkern/eff_rms/model.layers.0.self_attn.q_proj" in logged[4] and "loss" not in logged[4]
    assert "spkern/update_rms/model.layers.1.mlp.down_proj.weight" in logged[4]
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [2, 4]  # (the Trainer's own logs kept)
    # every report_to integration gets them: TensorBoard's tags (the Trainer's "train/" first)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for folder, _, files in os.walk(tmp_path):
        if any(f.startswith("events.out") for f in files):
            tags |= set(EventAccumulator(folder).Reload().Tags()["scalars"])
    assert "train/spkern/eff_rms/model.layers.0.self_attn.q_proj" in tags and "train/loss" in tags


def test_the_trainer_callback_resumes_from_a_checkpoint(tmp_path):
    def run(folder, resume=None, max_steps=4):
        callback = spkern.hf.SpkernCallback(probe="batch", stop=spkern.Regime())  # (the regime saved too)
        trainer = _trainer(_model("gpt2"), folder, [callback], logging_steps=1, save_strategy="steps", save_steps=2,
                           max_steps=max_steps)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, callback

    whole, whole_callback = run(tmp_path / "whole")
    first, _ = run(tmp_path / "parts", max_steps=4)  # (saves checkpoint-2 and checkpoint-4)
    assert os.path.isfile(tmp_path / "parts" / "checkpoint-2" / spkern.hf.STATE_FILE)
    resumed, callback = run(tmp_path / "parts", resume=str(tmp_path / "parts" / "checkpoint-2"))
    assert callback.tracker.steps == 4
    a, b = _logged(whole), _logged(resumed)
    assert list(b) == [1, 2, 3, 4]  # (1 and 2 from the checkpoint's history, 3 and 4 measured after it)
    for step in (3, 4):
        assert b[step] == pytest.approx(a[step], rel=1e-5, nan_ok=True), step
    assert callback.stop.history == whole_callback.stop.history and "spkern/regime" in b[4]


def test_the_trainer_callback_can_stop_training(tmp_path):
    seen = []
    callback = spkern.hf.SpkernCallback(stop=lambda m: seen.append(m["step"]) or m["step"] >= 2)
    trainer = _trainer(_model("qwen2"), tmp_path, [callback], logging_steps=1)
    trainer.train()
    assert seen == [1, 2] and trainer.state.global_step == 2


def test_a_regime_labels_the_trainers_run_and_stops_a_catastrophic_one(tmp_path):
    regime = spkern.Regime()
    trainer = _trainer(_model("gpt2"), tmp_path, [spkern.hf.SpkernCallback(stop=regime)], logging_steps=1,
                       learning_rate=1e5, optim="sgd", max_grad_norm=0.0)
    trainer.train()
    assert regime.regime == "catastrophic" and trainer.state.global_step == regime.step < 4
    logged = _logged(trainer)
    assert logged[regime.step]["spkern/regime"] == 2 and regime.evidence
    saved = spkern.Regime()
    saved.load_state_dict(regime.state_dict())
    assert saved.summary() == regime.summary()


def test_the_trainer_callback_with_the_fused_loss(tmp_path):
    callback = spkern.hf.SpkernCallback(fused_loss=True)
    trainer = _trainer(_model("llama"), tmp_path, [callback])
    trainer.train()
    logged = _logged(trainer)[4]
    assert logged["spkern/train/loss"] > 0 and "spkern/train/logit_norm" in logged
    assert "forward" not in trainer.model.__dict__  # (the model's own forward again, after training)


def test_a_model_and_optimizer_prepared_by_accelerate_are_tracked():
    accelerate = pytest.importorskip("accelerate")
    data = Tokens()
    runs = []
    for prepared in (False, True):
        model = _model("gpt2")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        if prepared:
            accelerator = accelerate.Accelerator(cpu=True)
            model, opt = accelerator.prepare(model, opt)
        tracker = spkern.Tracker(model, opt, probe={"input_ids": data.ids[:4]})
        for i in range(3):
            batch = data.ids[2 * i:2 * i + 2]
            loss = model(input_ids=batch, labels=batch).loss
            (accelerator.backward(loss) if prepared else loss.backward())
            opt.step()
            opt.zero_grad()
        assert tracker.steps == 3 and not any(k.startswith("module.") for k in tracker.names)
        runs.append(tracker.metrics())
    plain, prepared = runs
    assert plain.keys() == prepared.keys() and len(plain) > 100
    assert prepared == pytest.approx(plain, rel=1e-6, nan_ok=True)


@pytest.mark.slow
def test_the_trainer_callback_under_torchrun_equals_one_process(tmp_path):
    # 2 gloo processes, 2 rows a rank, against 1 process with the 4 rows: every logged metric
    from conftest import assert_same_logged, run_worlds

    runs = run_worlds(os.path.join(os.path.dirname(__file__), "trainer_worker.py"), tmp_path)
    two, one = runs[2], runs[1]
    assert two["distributed"] and list(one["logged"]) == ["1", "2", "3"]
    assert assert_same_logged(two["logged"], one["logged"]) > 300

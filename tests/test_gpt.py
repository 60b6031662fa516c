"""The GPT, its token data, training runs (one process and two on gloo) and its sweep."""

import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from spkern.experiments import cli, sweep
from spkern.experiments.gpt import GPT, GPTConfig
from spkern.experiments.text import load_tokens, read_shard, write_modded_shard
from spkern.experiments.train.gpt import GPTRunConfig, lr_factor, train

TINY = dict(width=32, depth=1, context=16, batch_size=4, steps=6, track_every=3, warmup=2, eval_batches=2)


def test_head_loss_equals_eager_logits():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab=50, width=64, depth=2, context=12))
    x = torch.randint(0, 50, (3, 12))
    y = torch.randint(0, 50, (3, 12))
    loss, stats = model.loss(x, y, "ce")
    logits = model(x) @ model.head.weight.t()
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits.reshape(-1, 50), y.reshape(-1)))
    torch.testing.assert_close(stats.logit_norm, logits.norm(dim=-1), rtol=1e-5, atol=1e-5)
    mse, _ = model.loss(x, y, "mse")
    p = torch.softmax(logits, -1)
    ref = (p - torch.nn.functional.one_hot(y, 50)).square().sum(-1).mean()
    torch.testing.assert_close(mse, ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_param_groups_and_init():
    sp = GPT(GPTConfig(width=256, depth=2, param="sp"))
    mup = GPT(GPTConfig(width=256, depth=2, param="mup", base_width=64))
    assert abs(sp.blocks[0].attn.qkv.weight.std().item() - 0.02) < 1e-3
    assert abs(mup.blocks[0].attn.qkv.weight.std().item() - 0.01) < 1e-3  # 0.02 sqrt(64 / 256)
    assert abs(mup.head.weight.std().item() - 0.005) < 5e-4
    groups = {g["role"]: g for g in mup.param_groups("adam", 1e-2, 0.1)}
    assert groups["hidden"]["lr"] == pytest.approx(1e-2 / 4) and groups["output"]["lr"] == pytest.approx(1e-2 / 4)
    assert groups["input"]["lr"] == pytest.approx(1e-2) and groups["input"]["weight_decay"] == 0
    sgd = {g["role"]: g["lr"] for g in mup.param_groups("sgd", 1e-2)}
    assert sgd["input"] == pytest.approx(4e-2) and sgd["hidden"] == pytest.approx(1e-2)
    assert all(g["lr"] == 1e-2 for g in sp.param_groups("adam", 1e-2))


@pytest.mark.parametrize("kw", [
    dict(loss="ce", optim="adam", param="sp"),
    dict(loss="mse", optim="sgd", param="mup", lr=0.1),
    dict(loss="ce", optim="adam", param="mup", dtype="bfloat16", grad_accum=2),
    dict(loss="ce", optim="sgd", param="sp", lr=0.3, qk_norm=False, clip=0.0),
])
def test_training_steps(kw):
    r = train(GPTRunConfig(**{**TINY, **kw}), device="cpu")
    assert r["status"] == "ok" and math.isfinite(r["val_ce"]) and r["score"] == -r["val_ce"]
    h = r["history"][-1]
    assert h["step"] == 6 and "blocks.0.mlp.fc/eff_rms" in h and "train/logit_norm" in h
    json.dumps(r)


def test_loss_decreases_on_the_default_corpus():
    r = train(GPTRunConfig(width=64, depth=1, context=32, batch_size=8, steps=60, track_every=10, warmup=5,
                           lr=1e-2), device="cpu")
    assert r["history"][0]["step"] == 0 and "train/loss" not in r["history"][0]  # (the initial measurement)
    losses = [h["train/loss"] for h in r["history"][1:]]
    # from log(256) = 5.5 at initialisation (uniform over bytes)
    assert losses[-1] < losses[0] < 1.01 * math.log(256) and losses[-1] < 0.5 * math.log(256)
    assert r["val_ce"] < 0.6 * math.log(256)


def test_lr_schedule():
    cfg = GPTRunConfig(steps=100, warmup=10, min_lr_frac=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0) and lr_factor(100, cfg) == pytest.approx(0.1)


def test_divergence_is_recorded():
    r = train(GPTRunConfig(**{**TINY, "optim": "sgd", "lr": 1e6, "clip": 0.0, "diverge_loss": 10.0}), device="cpu")
    assert r["status"] == "diverged" and r["diverged_step"] is not None


def test_shard_formats(tmp_path):
    rng = np.random.default_rng(0)
    nano = tmp_path / "nano"
    nano.mkdir()
    rng.integers(0, 50000, 5000, dtype=np.uint16).tofile(nano / "train.bin")
    rng.integers(0, 50000, 600, dtype=np.uint16).tofile(nano / "val.bin")
    t = load_tokens(f"shards:{nano}")
    assert len(t.train) == 5000 and len(t.val) == 600 and t.vocab == 50304
    modded = tmp_path / "modded"
    modded.mkdir()
    for i in range(2):
        write_modded_shard(modded / f"fineweb_train_{i:06d}.bin", rng.integers(0, 50257, 3000))
    write_modded_shard(modded / "fineweb_val_000000.bin", rng.integers(0, 50257, 700))
    t = load_tokens(f"shards:{modded}")
    assert len(t.train) == 6000 and len(t.val) == 700
    x, y = t.batch("train", 3, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (3, 16) and torch.equal(x[:, 1:], y[:, :-1])
    np.testing.assert_array_equal(read_shard(str(modded / "fineweb_val_000000.bin"))[:5],
                                  np.asarray(t.val[:5]))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.bin").write_bytes(b"\x01\x02\x03")
    (bad / "val.bin").write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="odd size"):
        load_tokens(f"shards:{bad}")
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    write_modded_shard(trunc / "x_train.bin", np.arange(10))
    with open(trunc / "x_train.bin", "ab") as f:
        f.write(b"\x00\x00")
    write_modded_shard(trunc / "x_val.bin", np.arange(10))
    with pytest.raises(ValueError, match="header says"):
        load_tokens(f"shards:{trunc}")


def _what_failed(proc):
    """The processes' own messages (torchrun prints them before its summary) and the end."""
    return (proc.stdout + proc.stderr)[:3000] + "\n...\n" + proc.stderr[-1000:]


@pytest.mark.slow
def test_two_processes_on_gloo_equal_one(tmp_path):
    args = ["--width", "32", "--depth", "1", "--steps", "4", "--track-every", "2", "--batch-size", "8",
            "--context", "16", "--grad-accum", "2", "--eval-batches", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:  # a free port, not a fixed one another job may hold
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                          "-m", "spkern.experiments.train.gpt", *args, "--out", str(tmp_path / "two.json")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, _what_failed(two)
    one = subprocess.run([sys.executable, "-m", "spkern.experiments.train.gpt", *args, "--out", str(tmp_path / "one.json")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, _what_failed(one)
    a, b = json.loads((tmp_path / "two.json").read_text()), json.loads((tmp_path / "one.json").read_text())
    assert a["processes"] == 2 and b["processes"] == 1
    assert math.isclose(a["val_ce"], b["val_ce"], rel_tol=1e-5)
    assert [h["step"] for h in a["history"]] == [h["step"] for h in b["history"]] == [0, 1, 2, 3, 4]
    for ha, hb in zip(a["history"], b["history"]):
        assert ha.keys() == hb.keys()
        for k, v in hb.items():
            if v is None:  # (the step-0 row's learning-rate factor: no step yet)
                assert ha[k] is None, k
                continue
            assert math.isclose(ha[k], v, rel_tol=1e-4, abs_tol=1e-6), k
    assert (a["regime"], a["regime_step"]) == (b["regime"], b["regime_step"])


def test_sweep_gpt_cli_and_resume(tmp_path):
    out = str(tmp_path / "gpt")
    argv = ["sweep", "gpt", "--widths", "32,64", "--lrs", "1e-3,1e-2", "--loss", "ce", "--steps", "4",
            "--track-every", "2", "--context", "16", "--batch-size", "4", "--depth", "1", "--out", out, "--no-progress"]
    assert cli.main(argv) == 0
    assert len(sweep.read_results(out)) == 4
    assert os.path.exists(os.path.join(out, "score_vs_lr.png")) and os.path.exists(os.path.join(out, "report.md"))
    assert cli.main(argv) == 0  # everything already there: skipped
    assert len(sweep.read_results(out)) == 4


@pytest.mark.parametrize("argv, match", [
    (["--widths", "48"], "multiple of head_dim"),
    (["--param", "ntp"], "--param"),
    (["--data", "shards:/nonexistent"], "not found"),
    (["--data", "words"], "unknown token data"),
])
def test_bad_arguments(argv, match, tmp_path):
    with pytest.raises(SystemExit, match=match):
        cli.main(["sweep", "gpt", *argv, "--out", str(tmp_path), "--no-progress"])


def test_bad_model_config():
    with pytest.raises(ValueError, match="multiple of head_dim"):
        GPTConfig(width=40).check()
    with pytest.raises(ValueError, match="exceeds the context"):
        GPT(GPTConfig(context=8, width=32))(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(SystemExit, match="batch_size"):
        from spkern.experiments.train.gpt import main
        main(["--batch-size", "5", "--grad-accum", "2"])


def test_a_gpt_run_carries_its_regime():
    # the logits' RMS (from the fused loss's statistics) against its initial value, counted as at least 1
    labels = {}
    for lr in (1e-3, 1e-2, 1.0):
        r = train(GPTRunConfig(**{**TINY, "steps": 30, "track_every": 5, "lr": lr}), device="cpu")
        rms = [h.get("train/logit_rms") for h in r["history"]]
        assert rms[0] is None and r["history"][0]["step"] == 0  # (the initial measurement: no batch yet)
        labels[lr] = r["regime"]
        if r["regime"] == "controlled-divergence":  # (its first steps measured: track_first)
            assert any(h["train/logit_rms"] > 3 for h in r["history"] if 0 < h["step"] <= 20)
    assert labels == {1e-3: "stable", 1e-2: "controlled-divergence", 1.0: "catastrophic"}

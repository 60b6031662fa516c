"""GPT training-step benchmark: tokens per second and peak memory of one AdamW step of
the compact GPT (spkern.experiments.gpt; depth 2, context 128, batch 8, GPT-2's padded vocabulary of
50304 on random tokens) with spkern's fused head loss, fused optimizer and tracker, against
the same model with eager logits, F.cross_entropy, torch.optim.AdamW and no tracker, all
in the same run.

    python bench/bench_gpt.py             # widths 256, 512, 768
    python bench/bench_gpt.py --quick

Method: bench/harness.py. Peak memory is what a step needs above the model, its
gradients and optimizer state (created by the warm-up).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

IMPLS = ["eager logits + F.cross_entropy", "spkern head loss + tracker every 10", "spkern head loss + tracker every step"]
VOCAB, CONTEXT, BATCH, DEPTH = 50304, 128, 8, 2


def run_one(impl, width, device, repeats):
    import torch
    import torch.nn.functional as F

    import spkern
    from spkern.experiments.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab=VOCAB, width=width, depth=DEPTH, context=CONTEXT)).to(device)
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randint(0, VOCAB, (BATCH, CONTEXT), device=device, generator=g)
    y = torch.randint(0, VOCAB, (BATCH, CONTEXT), device=device, generator=g)
    if impl.startswith("eager"):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step():
            opt.zero_grad(set_to_none=True)
            logits = model(x) @ model.head.weight.t()
            F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1)).backward()
            opt.step()
    else:
        opt = spkern.optim.AdamW(model.named_parameters(), lr=1e-3)
        tracker = spkern.Tracker(model, opt, probe=x[:2], every=10 if "every 10" in impl else 1,
                                 output_key="final_hidden")

        def one():
            opt.zero_grad(set_to_none=True)
            loss, stats = model.loss(x, y)
            loss.backward()
            tracker.record_loss(loss, stats)
            opt.step()
            if tracker.steps % tracker.every == 0:
                tracker.metrics()

        if tracker.every > 1:
            r = harness.measure_cycles(one, device, repeats, tracker.every)
            r["tokens_per_s"] = BATCH * CONTEXT / (r["median_ms"] / 1e3)
            return r
        step = one
    r = harness.measure(step, device, repeats, warmup=2)
    r["tokens_per_s"] = BATCH * CONTEXT / (r["median_ms"] / 1e3)
    return r


def main(argv=None):
    parser = harness.parser(__doc__)
    parser.add_argument("--widths", default=None, help="model widths, e.g. 256,512,768")
    args = harness.parse(parser, argv, run_one)
    if args is None:
        return 0
    widths = harness.parse_ints(parser, args.widths or ("256" if args.quick else "256,512,768"), "--widths")
    repeats = args.repeats or (3 if args.quick else 7)
    info = harness.machine_info(args.device)
    harness.print_header("GPT training step", info, args.device)
    print("| width | implementation | median ms per step | tokens/s | vs eager | peak extra MB |")
    print("|---|---|---|---|---|---|")
    results = []
    for width in widths:
        base = None
        for impl in IMPLS:
            r = harness.run_isolated(__file__, [impl, width, args.device, repeats])
            if "error" in r:
                print(f"| {width} | {impl} | failed: {r['error']} |")
                continue
            base = r["tokens_per_s"] if impl.startswith("eager") else base
            r.update(width=width, impl=impl, device=args.device, vocab=VOCAB, context=CONTEXT, batch=BATCH,
                     depth=DEPTH, throughput_vs_eager=r["tokens_per_s"] / base if base else None)
            results.append(r)
            vs = "-" if r["throughput_vs_eager"] is None else f"{r['throughput_vs_eager']:.2f}x"
            print(f"| {width} | {impl} | {r['median_ms']:.1f} | {r['tokens_per_s']:.0f} | {vs} | "
                  f"{r['peak_extra_mb']:.0f} |", flush=True)
    if args.out:
        harness.save(args.out, f"gpt_{args.device}", args.quick, info, results, repeats=repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())

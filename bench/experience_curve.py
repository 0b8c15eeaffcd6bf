#!/usr/bin/env python3
"""Training-Free GRPO benchmark: held-out reward vs epochs, with and without
the learned experience library, on a running ouro server.

Posts one learn job (arithmetic questions that ask for a \\boxed{} answer;
the verifier rewards a boxed integer), polls it to the end, prints a table
and writes a PNG (matplotlib). Usage (bench/experience.sh does all of it):

    python bench/experience_curve.py --url http://127.0.0.1:8000 --out bench/out/experience
"""
import argparse
import json
import random
import sys
import time
import urllib.request


def call(url, method="GET", body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.load(r)


def dataset(n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        op = rng.choice(["+", "-", "times"])
        ans = {"+": a + b, "-": a - b, "times": a * b}[op]
        rows.append({"prompt": f"What is {a} {op} {b}? Put the final answer in \\boxed{{}}.", "answer": str(ans)})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--library", default="bench-boxed")
    ap.add_argument("--train", type=int, default=24)
    ap.add_argument("--heldout", type=int, default=12)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--eval-temperature", type=float, default=0.7)
    ap.add_argument("--eval-samples", type=int, default=4)
    ap.add_argument("--out", default="bench/out/experience")
    args = ap.parse_args()

    body = {
        "dataset": dataset(args.train + args.heldout, args.seed),
        "verifier": {"type": "regex", "pattern": "\\\\boxed\\{\\s*-?\\d+\\s*\\}"},
        "group_size": args.group_size,
        "epochs": args.epochs,
        "batch_size": 4,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "heldout_size": args.heldout,
        "seed": args.seed,
        # Sampled evaluation (fixed seeds, the same for every library): greedy
        # decoding of the 135M model is one fixed answer per prompt and hides
        # a change in how often it boxes.
        "eval_temperature": args.eval_temperature,
        "eval_samples": args.eval_samples,
        # No gate: the curve shows what each epoch's library scores.
        "gate": False,
    }
    job = call(f"{args.url}/v1/experiences/{args.library}/learn", "POST", body)
    started = time.time()
    while job["state"] in ("queued", "running"):
        time.sleep(2)
        job = call(f"{args.url}/v1/experiences/jobs/{job['id']}")
        print(f"\r{job['state']} step {job['step']}/{job['total_steps']} ({time.time() - started:.0f} s)", end="", file=sys.stderr)
    print(file=sys.stderr)
    if job["state"] != "done":
        sys.exit(f"job ended {job['state']}: {job.get('error')}")
    without = job["heldout_reward_without_library"]
    epochs = [0] + [r["epoch"] for r in job["epoch_reports"]]
    with_lib = [without] + [r["heldout_reward"] for r in job["epoch_reports"]]
    train = [None] + [r["train_reward"] for r in job["epoch_reports"]]
    print(f"| epoch | held-out reward, no library | held-out reward, with library | train reward | library version |")
    print("|---|---|---|---|---|")
    for i, e in enumerate(epochs):
        version = job["epoch_reports"][i - 1]["version"] if i else job["start_version"]
        tr = "" if train[i] is None else f"{train[i]:.3f}"
        print(f"| {e} | {without:.3f} | {with_lib[i]:.3f} | {tr} | {version} |")
    lib = call(f"{args.url}/v1/experiences/{args.library}")
    print("\nlearned items:")
    for it in lib["items"]:
        print(f"  [{it['id']}] {it['text']}")
    import os

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(job, f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no PNG (pip install matplotlib)", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [without] * len(epochs), "--", label="without library")
    ax.plot(epochs, with_lib, "o-", label="with learned library")
    ax.set_xlabel("epoch")
    ax.set_ylabel("held-out reward (boxed answer)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"Training-Free GRPO on {lib.get('name')} (G={args.group_size})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=120)
    print(f"wrote {args.out}.png")


if __name__ == "__main__":
    main()

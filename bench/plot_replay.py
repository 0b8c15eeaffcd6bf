#!/usr/bin/env python3
"""Summarizes and plots `ouro replay` CSVs (one per configuration).

Prints, per configuration, decode tokens/s and mean acceptance length over
phases of the stream (domain A = code, domain B = math: A's second half, B's
first and last 100 requests) and each configuration's tokens/s relative to
`off`; writes a PNG of acceptance length and tokens/s over the requests.
"""
import argparse
import csv
import os
import statistics


def load(path):
    with open(path) as f:
        return [
            {"i": int(r["index"]), "domain": r["domain"], "mal": float(r["acceptance_length"]), "tok_s": float(r["decode_tok_s"]),
             "tokens": int(r["completion_tokens"]), "version": r["speculator_version"]}
            for r in csv.DictReader(f)
        ]


def decode_rate(rows):
    """Tokens over decoding seconds of all the requests together."""
    tokens = sum(r["tokens"] for r in rows)
    secs = sum(r["tokens"] / r["tok_s"] for r in rows if r["tok_s"] > 0)
    return tokens / secs if secs else float("nan")


def mean(xs):
    xs = list(xs)
    return statistics.fmean(xs) if xs else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv", nargs="+")
    ap.add_argument("--png", default="bench/out/replay.png")
    ap.add_argument("--smooth", type=int, default=15)
    ap.add_argument("--paused", nargs="*", default=[], help="CSVs served with the trainer paused (the trainer check)")
    ap.add_argument("--resumed", nargs="*", default=[], help="the same with the trainer on")
    args = ap.parse_args()
    if args.paused and args.resumed:
        paused = decode_rate([r for p in args.paused for r in load(p)])
        resumed = decode_rate([r for p in args.resumed for r in load(p)])
        print(f"trainer check (same server, alternated): decode {resumed:.1f} tok/s with the trainer on, "
              f"{paused:.1f} paused: {resumed / paused:.2f}x (target >= 0.85x)")
    series = {os.path.basename(p).removesuffix(".csv").removeprefix("replay-"): load(p) for p in args.csv}
    phases = {}
    for name, rows in series.items():
        a = [r for r in rows if r["domain"] == "code"]
        b = [r for r in rows if r["domain"] == "math"]
        k = min(100, len(b) // 2) or 1
        phases[name] = {"A late": a[len(a) // 2:], "B early": b[:k], "B late": b[-k:]}
    base = phases.get("off")
    print("| configuration | phase | decode tok/s | vs off | mean acceptance length |")
    print("|---|---|---|---|---|")
    for name, ph in phases.items():
        for phase, rows in ph.items():
            t = mean(r["tok_s"] for r in rows)
            ratio = t / mean(r["tok_s"] for r in base[phase]) if base else float("nan")
            print(f"| {name} | {phase} | {t:.1f} | {ratio:.2f}x | {mean(r['mal'] for r in rows):.2f} |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no PNG")
        return
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    s = max(1, args.smooth)
    for name, rows in series.items():
        xs = [mean(r["i"] for r in rows[j:j + s]) for j in range(0, len(rows), s)]
        top.plot(xs, [mean(r["mal"] for r in rows[j:j + s]) for j in range(0, len(rows), s)], label=name)
        bottom.plot(xs, [mean(r["tok_s"] for r in rows[j:j + s]) for j in range(0, len(rows), s)], label=name)
        swaps = [r["i"] for prev, r in zip(rows, rows[1:]) if r["version"] != prev["version"] and r["version"]]
        for x in swaps:
            top.axvline(x, color="gray", alpha=0.3, linewidth=0.8)
    n_code = sum(1 for r in next(iter(series.values())) if r["domain"] == "code")
    for ax in (top, bottom):
        ax.axvline(n_code, color="black", linestyle="--", linewidth=1)
        ax.legend()
    top.set_ylabel("mean acceptance length")
    bottom.set_ylabel("decode tokens/s")
    bottom.set_xlabel("request (code, then math at the dashed line; gray: speculator swaps)")
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()

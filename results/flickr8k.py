"""Reproduce the Flickr8k results in this folder: prepare, train (EfficientNet-Lite0 frozen, features cached), evaluate VAL.

    python results/flickr8k.py                         # about 75 minutes on 2 CPU cores
    python results/flickr8k.py --skip-prepare --skip-train   # only re-evaluate runs/flickr8k/best.pt
    python results/flickr8k.py --skip-prepare --scst-from runs/flickr8k/best.pt --out-dir runs/flickr8k_scst
                                                     # the self-critical stage (at most 60 more minutes)

Writes runs/flickr8k/benchmark.json and benchmark.md (BLEU-1..4, METEOR, ROUGE-L, CIDEr at beams 1, 3, 5,
train minutes, epochs, images/s, peak RSS). Test images are withheld in the shared folder: VAL only.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_measured(cmd, log_path):
    """Run a command (output to a log file); return (seconds, peak RSS in MiB of it and its children)."""
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)} (see {log_path})")
    return time.time() - start, usage.ru_maxrss / 1024.0


def markdown(report):
    names = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]
    t = report["train"]
    lines = ["| stage | split | beam | " + " | ".join(names) + " | train min | epochs | train img/s | peak RSS (MiB) |",
             "|---" * (len(names) + 7) + "|"]
    for r in report["val"]:
        cells = [f"{100 * r['scores'][n]:.1f}" if n != "CIDEr" else f"{r['scores'][n]:.3f}" for n in names]
        lines.append(f"| {t['stage']} | VAL | {r['beam_size']} | " + " | ".join(cells) +
                     f" | {t['minutes']:.1f} | {t['epochs']} | {t['img_per_s']:.0f} | {t['peak_rss_mb']:.0f} |")
    lines.append("")
    lines.append("BLEU, METEOR and ROUGE-L in %, coco-caption definitions (pycocoevalcap, PTB tokenizer); "
                 f"selected on VAL {t['select_on']} (greedy); best epoch {t['best_epoch']}, {t['epochs']} epochs "
                 f"in this stage; hardware: {report['hardware']}.")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # relative to the repository (every command runs there), so the reports carry no machine's paths
    p.add_argument("--flickr", default=os.path.join("..", "shared", "data", "flickr8k"))
    p.add_argument("--data-folder", default=os.path.join("data", "flickr8k"))
    p.add_argument("--out-dir", default=os.path.join("runs", "flickr8k"))
    p.add_argument("--max-minutes", type=float, default=60)
    p.add_argument("--skip-prepare", action="store_true")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--scst-from", help="run the SCST stage from this cross-entropy checkpoint instead")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="extra train.py options after --")
    args = p.parse_args()
    os.makedirs(os.path.join(ROOT, args.out_dir), exist_ok=True)
    log = lambda name: os.path.join(ROOT, args.out_dir, f"{name}.log")  # noqa: E731
    report = {"hardware": f"{os.cpu_count()} CPU cores, no GPU", "commands": {}}

    prepare = [sys.executable, "create_input_files.py", "--dataset", "flickr8k", "--karpathy-json",
               os.path.join(args.flickr, "dataset_flickr8k.json"), "--image-folder",
               os.path.join(args.flickr, "images"), "--output-folder", args.data_folder, "--image-size", "224"]
    train = [sys.executable, "train.py", "--data-folder", args.data_folder, "--encoder", "efficientnet_lite0",
             "--encoded-size", "0", "--max-minutes", str(args.max_minutes), "--out-dir", args.out_dir,
             *[a for a in args.train_args if a != "--"]]
    if args.scst_from:
        train += ["--resume", args.scst_from, "--scst"]
    evaluate = [sys.executable, "eval.py", "--checkpoint", os.path.join(args.out_dir, "best.pt"), "--split", "VAL",
                "--data-folder", args.data_folder, "--beam-size", "1", "3", "5", "--batch-size", "50",
                "--out", os.path.join(args.out_dir, "val_results.json")]
    for name, cmd, skip in (("prepare", prepare, args.skip_prepare), ("train", train, args.skip_train),
                            ("eval", evaluate, False)):
        report["commands"][name] = " ".join(cmd[1:])
        if skip:
            continue
        print(f"running: python {' '.join(cmd[1:])}", flush=True)
        seconds, rss = run_measured(cmd, log(name))
        report[f"{name}_seconds"], report[f"{name}_peak_rss_mb"] = seconds, rss
        print(f"  {seconds / 60:.1f} min, peak RSS {rss:.0f} MiB", flush=True)

    import torch

    state = torch.load(os.path.join(ROOT, args.out_dir, "last.pt"), map_location="cpu", weights_only=True)
    history = state["history"]
    select_on = state["select_on"]
    if args.scst_from:
        history = [h for h in history if "reward" in h]  # this stage's epochs only
    best = max(history, key=lambda h: h.get(f"val_{select_on}", 0))
    report["train"] = {"stage": "scst" if args.scst_from else "cross-entropy", "select_on": select_on,
                       "minutes": history[-1].get("minutes", float("nan")), "epochs": len(history),
                       "best_epoch": best["epoch"], "best_val_greedy": {k: best.get(f"val_{k}") for k in ("Bleu_4", "CIDEr")},
                       "reward_share": best.get("reward_share"),
                       "img_per_s": sum(h["img_per_s"] for h in history) / len(history),
                       "peak_rss_mb": report.get("train_peak_rss_mb", history[-1].get("peak_rss_mb", float("nan")))}
    results = json.load(open(os.path.join(ROOT, args.out_dir, "val_results.json")))
    report["val"] = [{"beam_size": r["beam_size"], "scores": r["scores"]} for r in results["results"]]
    with open(os.path.join(ROOT, args.out_dir, "benchmark.json"), "w") as f:
        json.dump(report, f, indent=2)
    table = markdown(report)
    with open(os.path.join(ROOT, args.out_dir, "benchmark.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()

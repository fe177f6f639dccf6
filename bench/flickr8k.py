"""The Flickr8k recipe behind the bundled model, end to end on 2 CPU cores in under 2 hours:
prepare, cache EfficientNet-Lite2 features, cross-entropy training, self-critical training, VAL scores,
the average of the two models' decoders (its weight chosen on VAL), and the inference-only model file
with its agreement check.

    python bench/flickr8k.py                      # everything (skips preparing when the data is there)
    python bench/flickr8k.py --stages eval export # only re-score and re-export existing runs

Writes runs/flickr8k_recipe.json and .md: BLEU-1..4, METEOR, ROUGE-L, CIDEr at beams 1, 3 and 5 for each
stage, wall time and peak RSS per stage, the distinct words in the VAL captions and the share of images whose
caption is unique. Test images are withheld in the shared folder: models are selected and scored on VAL only.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from checkpoints import DEFAULT_MODEL  # noqa: E402

STAGES = ("prepare", "xe", "scst", "eval", "average", "export")
MODEL = ["--encoder", "efficientnet_lite2", "--input-size", "260", "--encoded-size", "0"]
# Counted in epochs, not minutes: the bundled model had 5 epochs of cross-entropy (0-4) and 12 of SCST (5-16, the
# best on VAL kept), sampled without dropout, with the other samples' mean as baseline (it beat the greedy baseline
# on VAL from the same start: model card), at learning rate 1e-4 (twice train.py's default; it beat 5e-5 on VAL from
# the same start) and with the decoder in bf16 autocast. A wall-time budget gives a slower machine fewer epochs,
# another model; --xe-minutes and --scst-minutes still set one where time matters more than reproducing it.
XE = ["--cache", "disk", "--select-on", "CIDEr", "--val-beam-size", "3", "--lr-step", "3", "--lr-decay", "0.8",
      "--epochs", "5"]
SCST = ["--scst", "--scst-no-dropout", "--scst-baseline", "mean", "--scst-lr", "1e-4", "--amp", "--cache", "disk",
        "--val-beam-size", "3", "--epochs", "17"]
# the bundled model's decoding, tuned on VAL at beam 3 (model card): recorded in the file by export.py,
# and given to eval.py for the full-precision models so that every row is decoded alike
DECODING = ["--length-penalty", "1.0", "--block-trigrams"]
# The bundle's decoder is (1 - w) * SCST + w * cross-entropy (export.py --average-with). w is chosen on VAL at beam 3
# from this grid (0: SCST alone) as the one whose weakest score is nearest its target (TARGETS: issue 13's VAL
# goals). The recipe's run chose 0.3, inside the grid; the weakest score fell on both sides of it (model card).
AVERAGE_WEIGHTS = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
TARGETS = {"Bleu_4": 0.235, "METEOR": 0.21, "CIDEr": 0.60}


def balanced_score(scores):
    """The weakest of BLEU-4, METEOR and CIDEr as a share of its target: 1 meets all three."""
    return min(scores[name] / target for name, target in TARGETS.items())


def run_measured(cmd, log_path):
    """Run `python cmd...` with its output in log_path; return (seconds, peak RSS in MiB of it and its children)."""
    print(f"running: python {' '.join(cmd)}", flush=True)
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: python {' '.join(cmd)} (see {log_path})")
    seconds, rss = time.time() - start, usage.ru_maxrss / 1024.0
    print(f"  {seconds / 60:.1f} min, peak RSS {rss:.0f} MiB", flush=True)
    return seconds, rss


def caption_statistics(captions):
    """Distinct words over all captions, and the share of images whose caption no other image has."""
    sentences = [c["caption"] for c in captions]
    counts = {}
    for s in sentences:
        counts[s] = counts.get(s, 0) + 1
    words = {w for s in sentences for w in s.split()}
    return {"distinct_words": len(words), "unique_caption_share": sum(counts[s] == 1 for s in sentences) / len(sentences)}


def agreement(reference, candidate):
    """Share of images with the same caption in two eval.py results of the same beam size."""
    ref = {c["file_name"]: c["caption"] for c in reference["captions"]}
    same = sum(ref[c["file_name"]] == c["caption"] for c in candidate["captions"])
    return same / len(ref)


NAMES = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]


def markdown(report):
    lines = ["| model | beam | " + " | ".join(NAMES) + " | distinct words | unique captions |",
             "|---" * (len(NAMES) + 4) + "|"]
    for stage, results in report["val"].items():
        for r in results:
            cells = [f"{100 * r['scores'][n]:.1f}" if n != "CIDEr" else f"{r['scores'][n]:.3f}" for n in NAMES
                     if n in r["scores"]]
            lines.append(f"| {stage} | {r['beam_size']} | " + " | ".join(cells) +
                         f" | {r['distinct_words']} | {100 * r['unique_caption_share']:.1f} % |")
    lines += ["", "| stage | minutes | peak RSS (MiB) |", "|---|---|---|"]
    for stage, t in report["stages"].items():
        lines.append(f"| {stage} | {t['seconds'] / 60:.1f} | {t['peak_rss_mb']:.0f} |")
    if "average" in report:
        lines += ["", "| weight of the cross-entropy model | BLEU-4 | METEOR | CIDEr | weakest / target |",
                  "|---|---|---|---|---|"]
        for w, g in report["average"]["weights"].items():
            lines.append(f"| {w} | {100 * g['scores']['Bleu_4']:.1f} | {100 * g['scores']['METEOR']:.1f} | "
                         f"{g['scores']['CIDEr']:.3f} | {g['balanced']:.3f} |")
        lines += ["", f"Chosen weight: {report['average']['weight']:g} (beam 3 on VAL)."]
    if "bundle" in report:
        b = report["bundle"]
        lines += ["", f"Bundled file {b['path']}: {b['mib']:.1f} MiB; beam-3 VAL captions identical to the "
                      f"full-precision model's on {100 * b['agreement']:.1f} % of images; BLEU-4 "
                      f"{100 * b['bleu4']:.2f} against {100 * b['full_bleu4']:.2f}."]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flickr", default=os.path.join("..", "shared", "data", "flickr8k"))
    p.add_argument("--data-folder", default=os.path.join("data", "flickr8k"))
    p.add_argument("--xe-dir", default=os.path.join("runs", "flickr8k_xe"))
    p.add_argument("--scst-dir", default=os.path.join("runs", "flickr8k_scst"))
    p.add_argument("--xe-minutes", type=float, help="a cross-entropy budget, feature caching included (default: none)")
    p.add_argument("--scst-minutes", type=float, help="an SCST budget (default: none)")
    p.add_argument("--bundle", default=os.path.relpath(DEFAULT_MODEL, ROOT))
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    args = p.parse_args()
    report_path = os.path.join(ROOT, "runs", "flickr8k_recipe.json")
    os.makedirs(os.path.dirname(report_path), exist_ok=True)
    report = json.load(open(report_path)) if os.path.exists(report_path) else {"stages": {}, "val": {}}
    report["hardware"] = f"{os.cpu_count()} CPU cores, no GPU"
    log = lambda name: os.path.join(ROOT, "runs", f"flickr8k_{name}.log")  # noqa: E731
    data = ["--data-folder", args.data_folder]
    budget = lambda minutes: ["--max-minutes", str(minutes)] if minutes else []  # noqa: E731

    def stage(name, cmd):
        seconds, rss = run_measured(cmd, log(name))
        report["stages"][name] = {"command": "python " + " ".join(cmd), "seconds": seconds, "peak_rss_mb": rss}

    if "prepare" in args.stages and not os.path.isdir(os.path.join(ROOT, args.data_folder)):
        stage("prepare", ["create_input_files.py", "--dataset", "flickr8k", "--karpathy-json",
                          os.path.join(args.flickr, "dataset_flickr8k.json"), "--image-folder",
                          os.path.join(args.flickr, "images"), "--output-folder", args.data_folder, "--image-size", "224"])
    if "xe" in args.stages:
        stage("xe", ["train.py", *data, *MODEL, *XE, *budget(args.xe_minutes), "--out-dir", args.xe_dir])
    if "scst" in args.stages:
        # from the last cross-entropy epoch (4, also the best here), not an earlier best: SCST from a less converged
        # model (epoch 1) lowered VAL CIDEr for four epochs, with either baseline (README, model card)
        stage("scst", ["train.py", *data, "--resume", os.path.join(args.xe_dir, "last.pt"), *SCST,
                       *budget(args.scst_minutes), "--out-dir", args.scst_dir])
    results, decodings = {}, {}

    def evaluate(name, checkpoint, out, beams=("1", "3", "5"), decoding=DECODING):
        """eval.py on VAL; keeps its results under `name` and returns them."""
        stage(f"eval {name}", ["eval.py", "--checkpoint", checkpoint, *data, "--split", "VAL", "--beam-size", *beams,
                               "--batch-size", "50", *decoding, "--out", out])
        return read_results(name, out)

    def read_results(name, out):
        if not os.path.exists(os.path.join(ROOT, out)):
            return None
        evaluated = json.load(open(os.path.join(ROOT, out)))
        results[name], decodings[name] = evaluated["results"], evaluated["decoding"]
        report["val"][name] = [{"beam_size": r["beam_size"], "scores": r["scores"], **caption_statistics(r["captions"])}
                               for r in results[name]]
        return results[name]

    for name, folder in (("cross-entropy", args.xe_dir), ("+ SCST", args.scst_dir)):
        out = os.path.join(folder, "val_results.json")
        if "eval" in args.stages:
            evaluate(name, os.path.join(folder, "best.pt"), out)
        read_results(name, out)

    def mix(out, weight, *extra):
        """export.py: (1 - weight) * the SCST model + weight * the cross-entropy model, written to `out`."""
        return ["export.py", os.path.join(args.scst_dir, "best.pt"), out, "--average-with",
                os.path.join(args.xe_dir, "best.pt"), "--weight", f"{weight:g}", *DECODING, *extra]

    averaged, averaged_out = "+ weight averaging", os.path.join("runs", "flickr8k_averaged_val.json")
    if "average" in args.stages:
        grid = {}
        for w in AVERAGE_WEIGHTS:  # full-precision mixes (the decoding is recorded in them), each scored at beam 3
            path = os.path.join("runs", f"flickr8k_average_{w:g}.pt")
            stage(f"average {w:g}", mix(path, w, "--dtype", "fp32"))
            scores = evaluate(f"weight {w:g}", path, os.path.join("runs", f"flickr8k_average_{w:g}_val.json"),
                              beams=("3",), decoding=())[0]["scores"]
            grid[f"{w:g}"] = {"scores": scores, "balanced": balanced_score(scores)}
            report["val"].pop(f"weight {w:g}")  # the grid is reported on its own, below
        weight = max(AVERAGE_WEIGHTS, key=lambda w: grid[f"{w:g}"]["balanced"])
        report["average"] = {"weights": grid, "weight": weight}
        evaluate(averaged, os.path.join("runs", f"flickr8k_average_{weight:g}.pt"), averaged_out, decoding=())
    read_results(averaged, averaged_out)
    if "export" in args.stages:
        if "average" not in report:
            sys.exit("export: no averaging weight chosen yet; run the average stage first")
        stage("export", mix(args.bundle, report["average"]["weight"]))
        out = os.path.join("runs", "flickr8k_bundle_val.json")
        stage("eval bundle", ["eval.py", "--checkpoint", args.bundle, *data, "--split", "VAL", "--beam-size", "3",
                              "--batch-size", "50", "--out", out])
        bundle = json.load(open(os.path.join(ROOT, out)))["results"][0]
        full = next(r for r in results[averaged] if r["beam_size"] == 3)
        report["bundle"] = {"path": args.bundle, "mib": os.path.getsize(os.path.join(ROOT, args.bundle)) / 2**20,
                            "agreement": agreement(full, bundle), "bleu4": bundle["scores"]["Bleu_4"],
                            "full_bleu4": full["scores"]["Bleu_4"]}
        # the full-precision model's beam-3 VAL captions ship beside the bundle: tests compare against them
        reference = {"beam_size": 3, "scores": full["scores"], "decoding": decodings[averaged],
                     "captions": {c["file_name"]: c["caption"] for c in full["captions"]}}
        with open(os.path.join(ROOT, os.path.splitext(args.bundle)[0] + "_val_reference.json"), "w") as f:
            json.dump(reference, f, indent=1, sort_keys=True)
    with open(report_path, "w") as f:
        json.dump(report, f, indent=2)
    table = markdown(report)
    with open(os.path.splitext(report_path)[0] + ".md", "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()

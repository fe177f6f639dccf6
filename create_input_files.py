"""Prepare a captioned image collection: per-split HDF5 images, encoded captions and a word map.

Reads a Karpathy split JSON, the original Flickr8k token file, or a Kaggle-style captions.txt,
or draws the built-in synthetic "shapes" set. The output layout is the sgrvinod tutorial's, plus
{SPLIT}_REFS (raw reference tokens) and {SPLIT}_IMAGEINFO (file names and ids).

    python create_input_files.py --dataset flickr8k --karpathy-json dataset_flickr8k.json \
        --image-folder Flickr8k/images --output-folder data/flickr8k
"""
import argparse
import collections
import contextlib
import csv
import json
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time

import h5py

from utils import (END, PAD, PREPARED_KINDS, SPLITS, START, UNK, ImageLoadError, UserError, data_base_name,
                   disk_errors, folder_lock, int_at_least, load_image, non_negative_int, positive_int,
                   prepared_name, progress, read_json, remove_leftovers, run_cli, size_text, tokenize,
                   writable_dir, write_json)

KARPATHY_SPLITS = {"train": "TRAIN", "restval": "TRAIN", "val": "VAL", "test": "TEST"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=["coco", "flickr8k", "flickr30k", "shapes"])
    src = p.add_argument_group("caption source (give one; shapes needs none)")
    src.add_argument("--karpathy-json", help="Karpathy split file, e.g. dataset_flickr8k.json")
    src.add_argument("--token-file", help="original Flickr8k.token.txt (needs --split-lists)")
    src.add_argument("--captions-csv", help="Kaggle-style captions.txt with an 'image,caption' header")
    src.add_argument("--split-lists", nargs=3, metavar=("TRAIN", "VAL", "TEST"),
                     help="files listing the images of each split, one name per line")
    src.add_argument("--val-size", type=non_negative_int, default=1000,
                     help="random split (captions.txt without lists)")
    src.add_argument("--test-size", type=non_negative_int, default=1000,
                     help="random split (captions.txt without lists)")
    p.add_argument("--image-folder", help="folder holding the images (COCO: the folder above train2014/ etc.)")
    p.add_argument("--output-folder", help="where to write (default: data/DATASET)")
    p.add_argument("--captions-per-image", type=positive_int, default=5)
    p.add_argument("--min-word-freq", type=non_negative_int, default=5,
                   help="keep words seen at least this often in TRAIN")
    p.add_argument("--max-len", type=positive_int, default=50, help="longest caption in words")
    p.add_argument("--truncate-long", action="store_true", help="truncate longer captions instead of dropping")
    p.add_argument("--image-size", type=int_at_least(16), default=256)
    p.add_argument("--workers", type=non_negative_int, default=os.cpu_count() or 1, help="image decoding processes")
    p.add_argument("--word-map", help="reuse this WORDMAP_*.json instead of building one from TRAIN")
    p.add_argument("--strict", action="store_true", help="a missing or unreadable image is an error")
    p.add_argument("--limit", type=positive_int, help="use only the first N images of each split (quick trials)")
    p.add_argument("--seed", type=int, default=0, help="caption sampling and random splits")
    p.add_argument("--shapes-sizes", type=non_negative_int, nargs=3, default=[1500, 250, 250],
                   metavar=("TRAIN", "VAL", "TEST"),
                   help="shapes only: images per split")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------
# Reading the three caption formats into one list of records:
#   {"path", "file_name", "image_id", "split", "refs": [[token, ...], ...]}
# ---------------------------------------------------------------------------


def _require(cond, where, message):
    if not cond:
        raise UserError(f"{where}: {message}")


def read_karpathy_json(json_path, image_folder):
    data = read_json(json_path)
    _require(isinstance(data, dict) and isinstance(data.get("images"), list), json_path,
             "missing field 'images' (a list); is this a Karpathy split file?")
    records = []
    for i, img in enumerate(data["images"]):
        where = f"{json_path}: images[{i}]"
        _require(isinstance(img, dict), where, "not an object")
        for field in ("filename", "split", "sentences"):
            _require(field in img, where, f"missing field '{field}'")
        for field in ("filename", "split", "filepath"):
            value = img.get(field, "")  # filepath is optional (Flickr files have none)
            _require(isinstance(value, str), where,
                     f"field '{field}' is {type(value).__name__} {json.dumps(value)[:40]}, not a string")
        _require(img["split"] in KARPATHY_SPLITS, where,
                 f"unknown split '{img['split']}' (expected one of {', '.join(KARPATHY_SPLITS)})")
        _require(isinstance(img["sentences"], list), where, "field 'sentences' is not a list")
        refs = []
        for j, sent in enumerate(img["sentences"]):
            _require(isinstance(sent, dict) and "tokens" in sent, f"{where}.sentences[{j}]", "missing field 'tokens'")
            tokens = sent["tokens"]
            _require(isinstance(tokens, list) and all(isinstance(t, str) for t in tokens),
                     f"{where}.sentences[{j}]", "field 'tokens' is not a list of strings")
            refs.append([t.lower() for t in tokens])
        rel = os.path.join(img.get("filepath", ""), img["filename"])
        image_id = img.get("cocoid", img.get("imgid", i))
        records.append({"path": os.path.join(image_folder, rel), "file_name": rel, "image_id": image_id,
                        "split": KARPATHY_SPLITS[img["split"]], "refs": refs})
    return records


def _read_split_lists(paths, problems):
    """{file_name: split} from three list files (TRAIN, VAL, TEST). A name in two lists is an error;
    one listed twice in the same list is counted."""
    split_of, across = {}, []
    for split, path in zip(SPLITS, paths):
        try:
            with open(path, encoding="utf-8-sig") as f:  # -sig: a BOM would hide the first name
                names = [line.strip() for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"{path}: cannot read split list ({getattr(err, 'strerror', None) or err})") from None
        for name in names:
            if name not in split_of:
                split_of[name] = split
            elif split_of[name] == split:
                problems[f"duplicate names in the {split} list, used once"].append(name)
            else:
                across.append(f"{name} in {split_of[name]} and {split}")
    if across:
        raise UserError(f"{paths[0]}, ...: {len(across)} image(s) in more than one split list, which would leak "
                        f"training images into evaluation (first: {across[0]})")
    return split_of


def _records_from_captions(captions_by_image, split_of, image_folder, ignored):
    records = []
    for image_id, (name, captions) in enumerate(captions_by_image.items()):
        if name not in split_of:
            ignored.append(name)
            continue
        records.append({"path": os.path.join(image_folder, name), "file_name": name, "image_id": image_id,
                        "split": split_of[name], "refs": [tokenize(c) for c in captions]})
    return records


def merge_duplicates(records, source, problems):
    """One record per image file. The same file in two splits is an error (it would leak training images
    into evaluation); listed twice in one split, its captions are merged and the merge is counted."""
    first, merged, across = {}, [], []
    for rec in records:
        seen = first.setdefault(os.path.normpath(rec["file_name"]), rec)
        if seen is rec:
            merged.append(rec)
        elif seen["split"] != rec["split"]:
            across.append(f"{rec['file_name']} in {seen['split']} and {rec['split']}")
        else:
            seen["refs"] += [r for r in rec["refs"] if r not in seen["refs"]]
            problems[f"images listed twice in {rec['split']}, captions merged"].append(rec["file_name"])
    if across:
        raise UserError(f"{source}: {len(across)} image(s) listed in more than one split, which would leak "
                        f"training images into evaluation (first: {across[0]})")
    return merged


def _clean_flickr_name(name):
    """'x.jpg.1' -> 'x.jpg': Flickr8k.token.txt names one photo with a stray '.1' suffix."""
    base, ext = os.path.splitext(name)
    if ext[1:].isdigit() and os.path.splitext(base)[1]:
        return base
    return name


def read_flickr_token_file(token_path, split_lists, image_folder, ignored, problems):
    _require(split_lists, token_path, "--token-file needs --split-lists TRAIN VAL TEST")
    captions = collections.OrderedDict()
    try:
        with open(token_path, encoding="utf-8-sig") as f:  # -sig: a BOM would hide the first image
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                key, sep, caption = line.rstrip("\n").partition("\t")
                _require(sep and "#" in key, f"{token_path}: line {n}", "expected 'IMAGE.jpg#N<TAB>caption'")
                name = _clean_flickr_name(key.rsplit("#", 1)[0])
                captions.setdefault(name, []).append(caption)
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{token_path}: cannot read ({getattr(err, 'strerror', None) or err})") from None
    return _records_from_captions(captions, _read_split_lists(split_lists, problems), image_folder, ignored)


def _random_split(names, val_size, test_size, seed):
    order = sorted(names)
    random.Random(seed).shuffle(order)
    if val_size + test_size >= len(order):
        raise UserError(f"--val-size {val_size} + --test-size {test_size} leave no training images "
                        f"out of {len(order)}")
    split_of = {name: "VAL" for name in order[:val_size]}
    split_of.update({name: "TEST" for name in order[val_size:val_size + test_size]})
    split_of.update({name: "TRAIN" for name in order[val_size + test_size:]})
    return split_of


def read_captions_csv(csv_path, split_lists, image_folder, val_size, test_size, seed, ignored, problems):
    captions = collections.OrderedDict()
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:  # -sig: a BOM would spoil the header
            reader = csv.reader(f)
            header = next(reader, None)
            _require(header is not None and [h.strip().lower() for h in header[:2]] == ["image", "caption"],
                     csv_path, "expected a header line 'image,caption'")
            for n, row in enumerate(reader, 2):
                if not row:
                    continue
                _require(len(row) >= 2, f"{csv_path}: line {n}", "expected 'image,caption'")
                captions.setdefault(row[0].strip(), []).append(",".join(row[1:]))
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{csv_path}: cannot read ({getattr(err, 'strerror', None) or err})") from None
    if split_lists:
        split_of = _read_split_lists(split_lists, problems)
    else:
        split_of = _random_split(captions.keys(), val_size, test_size, seed)
    return _records_from_captions(captions, split_of, image_folder, ignored)


# ---------------------------------------------------------------------------
# Captions: filter, sample exactly cpi per image, build and apply the word map.
# ---------------------------------------------------------------------------


def usable_captions(refs, max_len, truncate, counts):
    """Drop empty captions; drop (or truncate) long ones. Counts what happened in `counts`."""
    kept = []
    for tokens in refs:
        if not tokens:
            counts["captions dropped: empty"] += 1
        elif len(tokens) > max_len and not truncate:
            counts[f"captions dropped: longer than {max_len} words"] += 1
        else:
            if len(tokens) > max_len:
                counts[f"captions truncated to {max_len} words"] += 1
            kept.append(tokens[:max_len])
    return kept


def choose_captions(captions, cpi, seed, file_name):
    """Exactly cpi captions, chosen the same way on every run (seeded by the file name)."""
    rng = random.Random(f"{seed}:{file_name}")
    if len(captions) >= cpi:
        return rng.sample(captions, cpi) if len(captions) > cpi else list(captions)
    return captions + [rng.choice(captions) for _ in range(cpi - len(captions))]


def build_word_map(train_captions, min_word_freq):
    """<pad>=0, words by falling frequency from 1, then <unk>, <start>, <end>."""
    freq = collections.Counter(w for tokens in train_captions for w in tokens)
    words = sorted((w for w, c in freq.items() if c >= min_word_freq), key=lambda w: (-freq[w], w))
    word_map = {PAD: 0}
    word_map.update({w: i + 1 for i, w in enumerate(words)})
    for tok in (UNK, START, END):
        word_map[tok] = len(word_map)
    return word_map


def load_word_map(path):
    word_map = read_json(path)
    _require(isinstance(word_map, dict) and all(t in word_map for t in (PAD, UNK, START, END)), path,
             "not a word map (needs <pad>, <unk>, <start> and <end>)")
    return word_map


def encode_caption(tokens, word_map, max_len):
    ids = [word_map[START]] + [word_map.get(w, word_map[UNK]) for w in tokens] + [word_map[END]]
    return ids + [word_map[PAD]] * (max_len + 2 - len(ids)), len(ids)


# ---------------------------------------------------------------------------
# Images: decode in parallel, stream into HDF5 (memory stays bounded).
# ---------------------------------------------------------------------------


def _load_for_pool(job):
    path, size = job
    try:
        return load_image(path, size), None
    except ImageLoadError as err:
        return None, str(err)


def _decoded_images(paths, size, workers):
    """Yield (array or None, error) for each path, in order, decoding with `workers` processes."""
    jobs = [(p, size) for p in paths]
    if workers <= 1:
        yield from map(_load_for_pool, jobs)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_load_for_pool, jobs, chunksize=8)


class _GuardedFile:
    """The HDF5 file's bytes pass through this object, which keeps the first write error to itself.

    HDF5 (2.0) crashes the whole process with a segmentation fault when it closes or frees a file
    whose write failed, as happens when the disk fills up. So HDF5 never sees a failure: after the
    first one, writes are dropped, the caller stops, h5py closes the file normally, and close()
    raises the saved error."""

    def __init__(self, path):
        self._file = open(path, "w+b")
        self.error = None

    def _guarded(self, method, *args):
        if self.error is None:
            try:
                method(*args)
            except OSError as err:
                self.error = err

    def write(self, data):
        self._guarded(self._file.write, data)
        return len(data)

    def truncate(self, size=None):
        self._guarded(self._file.truncate, size)
        return size

    def flush(self):
        self._guarded(self._file.flush)

    def read(self, size=-1):
        return self._file.read(size)

    def readinto(self, buffer):
        return self._file.readinto(buffer)

    def seek(self, offset, whence=0):
        return self._file.seek(offset, whence)

    def tell(self):
        return self._file.tell()

    def close(self):
        self._guarded(self._file.close)  # flushes: may fail too
        self._file.close()
        if self.error is not None:
            raise self.error


def write_split(split, records, folder, base, args, word_map, problems):
    """Write one split's files into `folder`. Returns the number of images written."""
    size, cpi = args.image_size, args.captions_per_image
    enc_captions, caplens, refs, info = [], [], [], []
    sink = _GuardedFile(os.path.join(folder, prepared_name("IMAGES", base, split)))
    try:
        with h5py.File(sink, "w") as h5:
            h5.attrs["captions_per_image"] = cpi
            images = h5.create_dataset("images", (len(records), 3, size, size), maxshape=(None, 3, size, size),
                                       dtype="uint8", chunks=(1, 3, size, size))
            n = 0
            results = _decoded_images([r["path"] for r in records], size, args.workers)
            for rec, (array, error) in progress(zip(records, results), total=len(records),
                                                desc=f"{split:5s} images", unit="img", file=sys.stdout):
                if error is not None:
                    if args.strict:
                        raise UserError(f"{error} (--strict)")
                    problems["images skipped: unreadable"].append(error)
                    continue
                images[n] = array
                if sink.error is not None:
                    break  # the disk is full: stop at once, close() below says so
                n += 1
                for tokens in rec["captions"]:
                    ids, length = encode_caption(tokens, word_map, args.max_len)
                    enc_captions.append(ids)
                    caplens.append(length)
                refs.append(rec["refs"])
                info.append({"file_name": rec["file_name"], "image_id": rec["image_id"]})
            images.resize(n, axis=0)
    finally:
        sink.close()
    for kind, obj in (("CAPTIONS", enc_captions), ("CAPLENS", caplens), ("REFS", refs), ("IMAGEINFO", info)):
        write_json(os.path.join(folder, prepared_name(kind, base, split)), obj)
    return n


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def read_records(args, ignored, problems):
    sources = [s for s in (args.karpathy_json, args.token_file, args.captions_csv) if s]
    if args.dataset == "shapes" and not sources:
        import shapes

        raw_folder = args.image_folder or os.path.join("data", "shapes_raw")
        args.karpathy_json = shapes.generate(raw_folder, args.shapes_sizes, seed=args.seed)
        args.image_folder = raw_folder
        sources = [args.karpathy_json]
    if len(sources) != 1:
        raise UserError("give exactly one of --karpathy-json, --token-file or --captions-csv")
    if not args.image_folder:
        raise UserError("--image-folder is required")
    if not os.path.isdir(args.image_folder):
        raise UserError(f"{args.image_folder}: image folder not found")
    if args.karpathy_json:
        records = read_karpathy_json(args.karpathy_json, args.image_folder)
    elif args.token_file:
        records = read_flickr_token_file(args.token_file, args.split_lists, args.image_folder, ignored, problems)
    else:
        records = read_captions_csv(args.captions_csv, args.split_lists, args.image_folder, args.val_size,
                                    args.test_size, args.seed, ignored, problems)
    return merge_duplicates(records, sources[0], problems)


def plan_splits(records, args, counts, problems):
    """Choose each image's captions; set aside missing images and images without captions."""
    by_split = {s: [] for s in SPLITS}
    for rec in records:
        if args.limit is not None and len(by_split[rec["split"]]) >= args.limit:
            continue
        captions = usable_captions(rec["refs"], args.max_len, args.truncate_long, counts)
        if not captions:
            problems["images skipped: no usable caption"].append(rec["file_name"])
            continue
        if not os.path.exists(rec["path"]):
            if args.strict:
                raise UserError(f"{rec['path']}: no such file (--strict)")
            problems[f"images missing ({rec['split']})"].append(rec["path"])
            continue
        rec["captions"] = choose_captions(captions, args.captions_per_image, args.seed, rec["file_name"])
        by_split[rec["split"]].append(rec)
    return by_split


def print_summary(base, out, written, by_split, word_map, counts, problems, ignored, seconds):
    total = sum(written.values())
    print(f"\nPrepared {base} in {out}")
    for split in SPLITS:
        print(f"  {split:5s}: {written[split]:7d} images, {written[split] * by_split['cpi']:8d} captions")
    print(f"  vocabulary: {len(word_map)} entries (including <pad>, <unk>, <start>, <end>)")
    for what, n in sorted(counts.items()):
        print(f"  {what}: {n}")
    if ignored:
        print(f"  images in no split list, ignored: {len(ignored)} (first: {', '.join(ignored[:3])})")
    for what, items in sorted(problems.items()):
        print(f"  warning: {what}: {len(items)} (first: {'; '.join(items[:3])})")
    print(f"  time: {seconds:.1f} s, {total / max(seconds, 1e-9):.1f} images/s")


# ---------------------------------------------------------------------------
# Output: each run writes a whole new set into a folder of its own, out/.prepared/BASE-XXXX, and swaps
# it in with one rename of the link out/.prepared/BASE. The public names (out/TRAIN_IMAGES_BASE.hdf5, ...)
# are links through that link, so a crash at any moment leaves readers the whole old set or the whole
# new one, never a mix (dataset.snapshot_folder resolves the link once per reader).
# ---------------------------------------------------------------------------

SETS_DIR = ".prepared"


def _all_names(base):
    return [prepared_name(kind, base, split) for split in SPLITS for kind in PREPARED_KINDS] + \
        [prepared_name("WORDMAP", base)]


def _link(target, path):
    """Make `path` a symbolic link to `target` with one rename: it is never missing, even for a moment."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.urandom(4).hex()}.tmp")
    os.symlink(target, tmp)
    os.replace(tmp, path)


def _sync(path):
    """Flush a file or folder to the disk, so a power cut cannot undo a rename that readers rely on."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def orphaned_sets(out):
    """Entries of out/.prepared that no BASE link leads to: sets of runs that crashed, temporary links."""
    sets = os.path.join(out, SETS_DIR)
    if not os.path.isdir(sets):
        return []
    entries = os.listdir(sets)
    links = [e for e in entries if not e.startswith(".") and os.path.islink(os.path.join(sets, e))]
    current = set(links) | {os.readlink(os.path.join(sets, e)) for e in links}
    return [os.path.join(sets, e) for e in sorted(entries) if e not in current]


def _adopt_plain_files(out, base):
    """A folder prepared before sets existed holds plain files: move them into a set of their own, name by
    name, each public name leading to the same file at every moment; the word map last, since readers
    find the set through it."""
    public_map = os.path.join(out, prepared_name("WORDMAP", base))
    if os.path.islink(public_map) or not os.path.isfile(public_map):
        return
    link = os.path.join(out, SETS_DIR, base)
    if not os.path.isdir(link):
        old_set = tempfile.mkdtemp(prefix=f"{base}-", dir=os.path.dirname(link))
        _link(os.path.basename(old_set), link)
    old_set = os.path.realpath(link)
    for name in _all_names(base):  # the word map comes last
        public = os.path.join(out, name)
        if os.path.islink(public) or not os.path.isfile(public):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(old_set, name))  # from an adoption that was interrupted
        try:
            os.link(public, os.path.join(old_set, name))
        except OSError:  # no hard links on this file system: move it (the name is missing for a moment)
            os.rename(public, os.path.join(old_set, name))
        _link(os.path.join(SETS_DIR, base, name), public)


def publish(out, base, new_set):
    """Make `new_set` the current set of `base` (one rename). Returns the folder of the set it replaced."""
    link = os.path.join(out, SETS_DIR, base)
    _adopt_plain_files(out, base)
    old_set = os.path.realpath(link) if os.path.islink(link) else None
    for name in sorted(os.listdir(new_set)):  # until the swap these lead into the old set, or nowhere
        public, target = os.path.join(out, name), os.path.join(SETS_DIR, base, name)
        if not (os.path.islink(public) and os.readlink(public) == target):
            _link(target, public)
    for name in os.listdir(new_set):
        _sync(os.path.join(new_set, name))
    _sync(new_set)
    _link(os.path.basename(new_set), link)  # the switch
    _sync(os.path.dirname(link))
    return old_set


def remove_stale(out, base, new_set, old_set):
    """After the switch: drop public names the new set does not have, and the old set's folder."""
    for split in SPLITS:
        for kind in PREPARED_KINDS:
            name = prepared_name(kind, base, split)
            public = os.path.join(out, name)
            if os.path.lexists(public) and not os.path.exists(os.path.join(new_set, name)):
                os.remove(public)
                print(f"  removed stale {name} (this run has no {split} images)")
    if old_set and old_set != os.path.realpath(new_set):
        shutil.rmtree(old_set, ignore_errors=True)


def check_free_space(out, by_split, size):
    """Refuse at once, rather than after hours of decoding, when the images cannot fit."""
    need = sum(len(records) for records in by_split.values()) * 3 * size * size
    free = shutil.disk_usage(out).free
    if need > free:
        raise UserError(f"--output-folder {out}: the images need about {size_text(need)} but only "
                        f"{size_text(free)} are free (the previous output, if any, stays until the new one is "
                        "complete)")


def write_and_publish(out, base, by_split, args, word_map, problems):
    """Write a whole new set, then switch to it. On any failure, the new set is removed and the old one kept."""
    sets = os.path.join(out, SETS_DIR)
    os.makedirs(sets, exist_ok=True)
    new_set = tempfile.mkdtemp(prefix=f"{base}-", dir=sets)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(new_set, 0o777 & ~umask)  # mkdtemp makes a private folder; others may read prepared data
    written, old_set = {}, None
    try:
        with disk_errors(f"cannot write in {out}", "(the previous output was left as it was)"):
            for split in SPLITS:
                written[split] = write_split(split, by_split[split], new_set, base, args, word_map, problems)
                if written[split] == 0:  # no images: this split has no files in the new set
                    for kind in PREPARED_KINDS:
                        os.remove(os.path.join(new_set, prepared_name(kind, base, split)))
            write_json(os.path.join(new_set, prepared_name("WORDMAP", base)), word_map)
            old_set = publish(out, base, new_set)
    except BaseException:
        if os.path.realpath(os.path.join(sets, base)) != os.path.realpath(new_set):  # not switched to it
            shutil.rmtree(new_set, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.rmdir(sets)  # only if empty: a first run that failed leaves nothing
        raise
    remove_stale(out, base, new_set, old_set)
    return written


def prepare(args):
    start = time.time()
    out = args.output_folder or os.path.join("data", args.dataset)
    writable_dir(out, "--output-folder")  # before any work
    counts, problems, ignored = collections.Counter(), collections.defaultdict(list), []
    records = read_records(args, ignored, problems)
    by_split = plan_splits(records, args, counts, problems)
    if args.word_map:
        word_map = load_word_map(args.word_map)
    else:
        if not by_split["TRAIN"]:
            raise UserError("no usable TRAIN images found, so no word map can be built "
                            "(check --image-folder, or pass --word-map)")
        word_map = build_word_map([t for r in by_split["TRAIN"] for t in usable_captions(
            r["refs"], args.max_len, args.truncate_long, collections.Counter())], args.min_word_freq)

    base = data_base_name(args.dataset, args.captions_per_image, args.min_word_freq)
    with folder_lock(out, "create_input_files.py"):
        remove_leftovers(out, also=orphaned_sets(out))  # the lock says no live run owns them
        check_free_space(out, by_split, args.image_size)
        written = write_and_publish(out, base, by_split, args, word_map, problems)
    by_split["cpi"] = args.captions_per_image
    print_summary(base, out, written, by_split, word_map, counts, problems, ignored, time.time() - start)
    return out, base


def main(argv=None):
    prepare(parse_args(argv))


if __name__ == "__main__":
    run_cli(main)

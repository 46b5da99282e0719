"""CapFilt (BLIP, section 3.3): bootstrap a noisy image-text dataset with a captioner and a filter.

    qformer capfilt --captioner CAPTIONER --filter FILTER --data web.json --out web_capfilt.json

The captioner is a BLIP model fine-tuned with the LM loss on clean data (recipe `blip_caption`),
the filter one fine-tuned with ITC + ITM (recipe `blip_retrieval`). For every image we sample
`num_captions` synthetic captions with nucleus sampling (top_p 0.9: diverse captions, which the
paper found to help more than beam search), score the image's original captions and the synthetic
ones with the filter's ITM head, and keep each caption whose match probability is at least
`threshold` (0.5). BLIP released no code for this step; this module is our own reading of the paper.

Files, for `--out OUT.json` (a JSON list; `OUT.jsonl` gives JSON lines):

* `OUT.json`: the input's records, each with `caption` now the list of kept captions (originals
  first), `itm_scores` and `caption_source` ("original" / "synthetic") beside it, and `removed`
  ({caption, itm_score, source}). Records left with no caption, and unreadable images, are left
  out; question-answer records (a `question` key) pass through unchanged.
* `OUT.json.progress.jsonl`: a settings line, then one line per image done (or skipped), appended
  after every batch. A rerun with the same settings skips the images written there.
* `OUT.summary.json`: captions kept, removed and added, images skipped (listed), settings, seconds.

Legend: b images in a batch, k synthetic captions per image, c captions scored in a batch.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from qformer.blip import BlipModel

SOURCES = ("original", "synthetic")


def run_capfilt(
    *,
    captioner: str | Path,
    filter: str | Path,  # noqa: A002 - the paper's name for it
    data: str | Path,
    out: str | Path,
    threshold: float = 0.5,
    num_captions: int = 1,
    top_p: float = 0.9,
    batch_size: int = 32,
    max_new_tokens: int = 20,
    min_new_tokens: int = 5,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Clean `data` into `out` (see the module docstring) and return the summary."""
    from qformer.blip import BlipModel
    from qformer.evaluate import read_records

    data, out = Path(data), Path(out)
    problems = []
    if not 0.0 <= threshold <= 1.0:
        problems.append(f"--threshold {threshold} must be a probability in [0, 1]")
    if num_captions < 0:
        problems.append(f"--num-captions {num_captions} must be >= 0 (0: filter the original captions only)")
    if not 0.0 < top_p <= 1.0:
        problems.append(f"--top-p {top_p} must be in (0, 1]")
    if batch_size < 1:
        problems.append(f"--batch-size {batch_size} must be at least 1")
    if out.suffix not in (".json", ".jsonl"):
        problems.append(f"--out {out} must end in .json (a JSON list) or .jsonl (JSON lines)")
    if out.resolve() == data.resolve():
        problems.append(f"--out {out} is the input file: write the cleaned set elsewhere")
    if problems:
        raise ValueError("Bad capfilt settings:\n  - " + "\n  - ".join(problems))

    started = time.perf_counter()
    records, root = read_records(data)
    kinds = [_kind(r, i, data) for i, r in enumerate(records)]
    # fail on a checkpoint that cannot do its job before any work starts
    filt = BlipModel.from_pretrained(filter, need="itm", device=device).eval()
    capt = BlipModel.from_pretrained(captioner, need="caption", device=device).eval() if num_captions else None

    settings = {
        "captioner": str(Path(captioner).resolve()), "filter": str(Path(filter).resolve()),
        "data": str(data.resolve()), "num_records": len(records), "threshold": threshold,
        "num_captions": num_captions, "top_p": top_p, "max_new_tokens": max_new_tokens,
        "min_new_tokens": min_new_tokens, "seed": seed,
    }  # fmt: skip
    progress_path = out.with_name(out.name + ".progress.jsonl")
    done = _read_progress(progress_path, settings)
    todo = [i for i, kind in enumerate(kinds) if kind == "caption" and i not in done]
    out.parent.mkdir(parents=True, exist_ok=True)
    if not progress_path.is_file():
        _append(progress_path, [{"settings": settings}])

    images = sum(kind == "caption" for kind in kinds)
    bar = tqdm(total=images, initial=images - len(todo), desc="capfilt", unit="img", disable=not progress)
    for rows in _chunks(todo, batch_size):
        results = _process(
            [records[i] for i in rows], rows, root, capt, filt, threshold=threshold, num_captions=num_captions,
            top_p=top_p, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, seed=seed,
        )  # fmt: skip
        _append(progress_path, results)  # one write per batch: an interruption loses this batch at most
        done.update({r["row"]: r for r in results})
        bar.update(len(rows))
    bar.close()

    cleaned, summary = _assemble(records, kinds, done, root, data, out)
    _write_records(out, cleaned)
    summary = {
        **summary, "settings": settings, "out": str(out), "progress": str(progress_path),
        "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    summary_path = out.with_name(out.stem + ".summary.json")
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(format_summary(summary))
    return summary


# ------------------------------------------------------------------------------------------
# one batch
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def _process(
    records: list[dict[str, Any]],
    rows: list[int],
    root: Path,
    captioner: BlipModel | None,
    filt: BlipModel,
    *,
    threshold: float,
    num_captions: int,
    top_p: float,
    max_new_tokens: int,
    min_new_tokens: int,
    seed: int,
) -> list[dict[str, Any]]:
    """The progress lines of one batch: per image its scored captions, or why it was skipped."""
    from bridges.vision import load_image
    from qformer.data import clean_caption

    results: list[dict[str, Any]] = []
    readable: list[tuple[int, dict[str, Any], Any]] = []
    for row, record in zip(rows, records):
        path = root / record["image"]
        try:
            readable.append((row, record, load_image(path)))
        except ValueError as error:
            results.append({"row": row, "image": str(path), "skipped": str(error)})
    if not readable:
        return results

    filter_pixels = torch.stack([filt.vision.eval_transform()(image) for _, _, image in readable])  # (b, 3, S, S)
    synthetic: list[list[str]] = [[] for _ in readable]
    if num_captions:
        pixels = torch.stack([captioner.vision.eval_transform()(image) for _, _, image in readable])
        device = captioner.temp.device
        # seeded by the batch's first row: a resumed run samples what the interrupted one would have
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + readable[0][0])
        texts = captioner.generate(
            pixels.to(device).repeat_interleave(num_captions, dim=0), num_beams=1, top_p=top_p,
            max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, generator=generator,
        )  # fmt: skip  # (b k,)
        synthetic = [texts[j * num_captions : (j + 1) * num_captions] for j in range(len(readable))]

    # every (image, caption) pair of the batch through the filter's ITM at once; the filter was
    # trained on cleaned captions, so it scores the cleaned text of the originals
    owners, texts = [], []
    for j, (_, record, _) in enumerate(readable):
        for caption in _captions(record):
            owners.append(j)
            texts.append(clean_caption(caption))
        for caption in synthetic[j]:
            owners.append(j)
            texts.append(caption)
    device = filt.temp.device
    scores = filt.itm_score(filter_pixels.to(device)[torch.tensor(owners)], texts).tolist()  # (c,)

    position = 0
    for j, (row, record, _) in enumerate(readable):
        scored: dict[str, list[dict[str, Any]]] = {}
        for source, captions in (("original", _captions(record)), ("synthetic", synthetic[j])):
            scored[source] = []
            for caption in captions:
                score = scores[position]
                position += 1
                scored[source].append({"caption": caption, "itm_score": round(score, 6), "kept": score >= threshold})
        results.append({"row": row, **scored})
    return results


# ------------------------------------------------------------------------------------------
# records in, records out
# ------------------------------------------------------------------------------------------
def _kind(record: dict[str, Any], row: int, data: Path) -> str:
    if "question" in record:
        return "question"  # passes through unchanged
    caption = record.get("caption")
    ok = isinstance(caption, str) or (isinstance(caption, list) and caption and all(isinstance(c, str) for c in caption))
    if not ok:
        raise ValueError(
            f"{data}, record {row}: `caption` must be a string or a non-empty list of strings, found "
            f"{caption!r} (keys: {sorted(record)})."
        )
    return "caption"


def _captions(record: dict[str, Any]) -> list[str]:
    caption = record["caption"]
    return [caption] if isinstance(caption, str) else list(caption)


def _assemble(
    records: list[dict[str, Any]], kinds: list[str], done: dict[int, dict[str, Any]], root: Path, data: Path, out: Path
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The cleaned records and the counts of the summary."""
    # image paths stay valid from the new file's folder: unchanged beside the input, else absolute
    same_folder = out.parent.resolve() == data.parent.resolve()
    counts = dict.fromkeys(
        ("original_kept", "original_removed", "synthetic_added", "synthetic_rejected", "images_without_caption"), 0
    )
    skipped, cleaned = [], []
    for row, (record, kind) in enumerate(zip(records, kinds)):
        if kind == "question":
            cleaned.append(record)
            continue
        result = done[row]
        if "skipped" in result:
            skipped.append({"row": row, "image": result["image"], "reason": result["skipped"]})
            continue
        kept, removed = [], []
        for source in SOURCES:
            for item in result[source]:
                (kept if item["kept"] else removed).append({**item, "source": source})
        counts["original_kept"] += sum(k["source"] == "original" for k in kept)
        counts["synthetic_added"] += sum(k["source"] == "synthetic" for k in kept)
        counts["original_removed"] += sum(r["source"] == "original" for r in removed)
        counts["synthetic_rejected"] += sum(r["source"] == "synthetic" for r in removed)
        if not kept:
            counts["images_without_caption"] += 1
            continue
        image = record["image"] if same_folder else str((root / record["image"]).resolve())
        cleaned.append({
            **record,
            "image": image,
            "caption": [k["caption"] for k in kept],
            "itm_scores": [k["itm_score"] for k in kept],
            "caption_source": [k["source"] for k in kept],
            "removed": [{"caption": r["caption"], "itm_score": r["itm_score"], "source": r["source"]} for r in removed],
        })  # fmt: skip
    images = sum(kind == "caption" for kind in kinds)
    summary = {
        "images": images,
        "images_skipped": len(skipped),
        "images_kept": images - len(skipped) - counts["images_without_caption"],
        "images_without_caption": counts["images_without_caption"],
        "records_passed_through": sum(kind == "question" for kind in kinds),
        "captions_in": counts["original_kept"] + counts["original_removed"],
        "kept": counts["original_kept"],
        "removed": counts["original_removed"],
        "added": counts["synthetic_added"],
        "synthetic_generated": counts["synthetic_added"] + counts["synthetic_rejected"],
        "synthetic_rejected": counts["synthetic_rejected"],
        "captions_out": counts["original_kept"] + counts["synthetic_added"],
        "skipped": skipped,
    }
    return cleaned, summary


def format_summary(summary: dict[str, Any]) -> str:
    s = summary
    lines = [
        f"capfilt: {s['images']} images, {s['captions_in']} original captions -> {s['captions_out']} captions "
        f"on {s['images_kept']} images in {s['out']}",
        f"  original captions kept {s['kept']}, removed {s['removed']}; synthetic captions added {s['added']}, "
        f"rejected {s['synthetic_rejected']} of {s['synthetic_generated']}",
        f"  images left without a caption (left out): {s['images_without_caption']}; "
        f"unreadable images skipped: {s['images_skipped']}",
    ]
    lines += [f"    {item['image']} (record {item['row']}): {item['reason']}" for item in s["skipped"][:10]]
    if len(s["skipped"]) > 10:
        lines.append(f"    ... ({len(s['skipped']) - 10} more in the summary file)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------
def load_progress(out: str | Path) -> dict[int, dict[str, Any]]:
    """Every image's decisions of the run that wrote `out`, by input record index: {"original":
    [{caption, itm_score, kept}], "synthetic": [...]}, or {"skipped": reason, "image": path}."""
    path = Path(out).with_name(Path(out).name + ".progress.jsonl")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `qformer capfilt ... --out {out}` first.")
    done = {}
    for line in path.read_text().splitlines():
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "row" in item:
            done[int(item["row"])] = item
    return done


def _read_progress(path: Path, settings: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The images an earlier run finished, by row; checks that it ran with the same settings. A
    line cut short by an interruption is ignored (its batch is redone)."""
    if not path.is_file():
        return {}
    lines = path.read_text().splitlines()
    done: dict[int, dict[str, Any]] = {}
    header = None
    for line in lines:
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "settings" in item:
            header = item["settings"]
        else:
            done[int(item["row"])] = item
    if header != settings:
        changed = sorted(k for k in settings if (header or {}).get(k) != settings[k])
        raise ValueError(
            f"{path} holds the progress of a capfilt run with other settings ({', '.join(changed) or 'none saved'}): "
            "rerun with the same settings to continue it, or delete it (or choose another --out) to start over."
        )
    return done


def _append(path: Path, items: Sequence[dict[str, Any]]) -> None:
    with path.open("a") as f:
        f.write("".join(json.dumps(item) + "\n" for item in items))
        f.flush()
        os.fsync(f.fileno())


def _write_records(path: Path, records: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".jsonl":
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:  # a JSON list, one record per line (as ShapesWorld writes its splits)
        tmp.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")
    os.replace(tmp, path)


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]

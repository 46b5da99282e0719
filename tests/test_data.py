"""Pairs loading (every source format), samples and bad samples, the batch sampler, streaming."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from bridges.vision import eval_transform
from qformer.data import (
    GlobalBatchSampler,
    ImageTextDataset,
    SkippedSample,
    SkipReport,
    clean_caption,
    collate,
    load_pairs,
    pairs_source,
    source_label,
    stream_pairs,
)

SIZE = 16
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def save_png(path: Path, mode: str = "RGB", seed: int = 0, size: tuple[int, int] = (20, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16)).save(path)
    else:
        channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        array = rng.integers(0, 255, (*size[::-1], channels), dtype=np.uint8)
        Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode).save(path)
    return path


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def as_rows(pairs):
    return [(r["image"], r["caption"], r["image_id"], r["row"]) for r in pairs]


# ---- captions ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("A Dog.", "a dog"),
        ('  The "big" (red) ball!!  ', "the big red ball"),
        ("one*two#three:four;five~six", "one two three four five six"),
        ("a\tcat\n\non  the   mat", "a cat on the mat"),
        ("Don't touch the dog's bowl", "don't touch the dog's bowl"),
        ("Don\u2019t stop", "don't stop"),
        ("", ""),
        (".!...", ""),
    ],
)
def test_clean_caption(raw, clean):
    assert clean_caption(raw) == clean


def test_clean_caption_max_words():
    words = " ".join(f"w{i}" for i in range(60))
    assert clean_caption(words).split() == [f"w{i}" for i in range(50)]
    assert clean_caption("a b c d", max_words=2) == "a b"


# ---- source formats -----------------------------------------------------------------------------


RECORDS = [
    {"image": "img/a.png", "caption": "a red square"},
    {"image": "img/b.png", "caption": "a blue circle"},
    {"image": "img/a.png", "caption": "a square, red"},
]


def expected(root: Path):
    a, b = str(root / "img/a.png"), str(root / "img/b.png")
    return [(a, "a red square", 0, 0), (b, "a blue circle", 1, 1), (a, "a square, red", 0, 2)]


def test_json_list(tmp_path):
    pairs = load_pairs(write_json(tmp_path / "ann.json", RECORDS))
    assert as_rows(pairs) == expected(tmp_path)
    assert pairs.column_names == ["image", "caption", "image_id", "group_id", "row", "question"]
    assert pairs["group_id"] == pairs["image_id"]  # no `group` field: each image is its own group
    assert pairs_source(pairs)["source"] == str(tmp_path / "ann.json")


@pytest.mark.parametrize("key", ["annotations", "data", "images"])
def test_json_dict_with_records(tmp_path, key):
    pairs = load_pairs(write_json(tmp_path / "ann.json", {"info": {}, key: RECORDS}))
    assert as_rows(pairs) == expected(tmp_path)


def test_jsonl_with_alternative_keys(tmp_path):
    records = [{"image_path": r["image"], "text": r["caption"]} for r in RECORDS]
    path = tmp_path / "ann.jsonl"
    path.write_text(json.dumps(records[0]) + "\n\n" + "".join(json.dumps(r) + "\n" for r in records[1:]))
    assert as_rows(load_pairs(path)) == expected(tmp_path)  # the blank line is no record


def test_csv(tmp_path):
    path = tmp_path / "ann.csv"
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, ["filepath", "caption"])
        writer.writeheader()
        writer.writerows({"filepath": r["image"], "caption": r["caption"]} for r in RECORDS)
    assert as_rows(load_pairs(path)) == expected(tmp_path)


def test_image_folder_with_metadata(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "metadata.jsonl", [{"file_name": r["image"], "text": r["caption"]} for r in RECORDS])
    pairs = load_pairs(folder)
    assert as_rows(pairs) == expected(folder)
    assert pairs_source(pairs)["format"] == "imagefolder"
    assert source_label(pairs) == str(folder / "metadata.jsonl")  # the file that rows count in


def test_image_folder_split_subfolder(tmp_path):
    for split, records in (("train", RECORDS[:1]), ("val", RECORDS[1:2])):
        (tmp_path / split).mkdir()
        write_jsonl(tmp_path / split / "metadata.jsonl", records)
    assert load_pairs(tmp_path, split="val")[0]["image"] == str(tmp_path / "val" / "img/b.png")


def test_karpathy_caption_lists_share_image_id(tmp_path):
    records = [
        {"image": "val2014/x.jpg", "caption": ["first x", "second x"], "image_id": "coco_7"},
        {"image": "val2014/y.jpg", "caption": ["first y", "second y", "third y"], "image_id": "coco_3"},
    ]
    pairs = load_pairs(write_json(tmp_path / "coco_karpathy_test.json", records))
    x, y = str(tmp_path / "val2014/x.jpg"), str(tmp_path / "val2014/y.jpg")
    assert as_rows(pairs) == [
        (x, "first x", 0, 0), (x, "second x", 0, 0), (y, "first y", 1, 1), (y, "second y", 1, 1), (y, "third y", 1, 1),
    ]  # fmt: skip


def test_integer_image_id_field_is_used(tmp_path):
    records = [{"image": "a.png", "caption": "x", "image_id": 391895}, {"image": "b.png", "caption": "y", "image_id": "42"}]
    assert load_pairs(write_json(tmp_path / "a.json", records))["image_id"][:] == [391895, 42]


def test_image_id_naming_two_images_is_an_error(tmp_path):
    records = [{"image": "a.png", "caption": "x", "image_id": 1}, {"image": "b.png", "caption": "y", "image_id": 1}]
    with pytest.raises(ValueError, match=r"image_id 1 names two different images.*row 0.*row 1"):
        load_pairs(write_json(tmp_path / "a.json", records))


def test_coco_captions_file(tmp_path):
    data = {
        "images": [{"id": 9, "file_name": "nine.jpg"}, {"id": 4, "file_name": "four.jpg"}],
        "annotations": [{"image_id": 4, "caption": "four"}, {"image_id": 9, "caption": "nine"}, {"image_id": 4, "caption": "4"}],
    }  # fmt: skip
    pairs = load_pairs(write_json(tmp_path / "captions_val2017.json", data), image_root=tmp_path / "val2017")
    four, nine = str(tmp_path / "val2017/four.jpg"), str(tmp_path / "val2017/nine.jpg")
    assert as_rows(pairs) == [(four, "four", 4, 0), (nine, "nine", 9, 1), (four, "4", 4, 2)]


def test_karpathy_raw_split_file(tmp_path):
    data = {
        "images": [
            {"filepath": "val2014", "filename": "a.jpg", "split": "test", "sentences": [{"raw": "A."}, {"raw": "B."}]},
            {"filepath": "train2014", "filename": "b.jpg", "split": "train", "sentences": [{"raw": "C."}]},
            {"filepath": "val2014", "filename": "c.jpg", "split": "restval", "sentences": [{"raw": "D."}]},
        ]
    }
    path = write_json(tmp_path / "dataset_coco.json", data)
    assert [r["caption"] for r in load_pairs(path, split="test")] == ["A.", "B."]
    train = load_pairs(path, split="train+restval")
    assert [(r["image"], r["row"]) for r in train] == [(str(tmp_path / "train2014/b.jpg"), 1), (str(tmp_path / "val2014/c.jpg"), 2)]
    with pytest.raises(ValueError, match=r"no records of split 'val'.*\['restval', 'test', 'train'\]"):
        load_pairs(path, split="val")


def test_split_without_split_field(tmp_path):
    with pytest.raises(ValueError, match="no `split` field; leave split unset"):
        load_pairs(write_json(tmp_path / "a.json", RECORDS), split="train")


def test_relative_paths_and_image_root(tmp_path):
    records = [{"image": "a.png", "caption": "x"}, {"image": str(tmp_path / "abs.png"), "caption": "y"}]
    (tmp_path / "ann").mkdir()
    path = write_json(tmp_path / "ann" / "a.json", records)
    assert load_pairs(path)["image"][:] == [str(tmp_path / "ann" / "a.png"), str(tmp_path / "abs.png")]
    root = tmp_path / "pictures"
    assert load_pairs(path, image_root=root)["image"][:] == [str(root / "a.png"), str(tmp_path / "abs.png")]


# ---- bad sources ----------------------------------------------------------------------------------


def test_record_without_image_names_row_and_keys(tmp_path):
    records = [*RECORDS, {"img": "c.png", "caption": "z"}]
    with pytest.raises(ValueError, match=r"a\.jsonl, row 3: no image path.*found \['caption', 'img'\]"):
        load_pairs(write_jsonl(tmp_path / "a.jsonl", records))


def test_record_without_caption_names_row_and_keys(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("image,label\na.png,cat\nb.png,dog\n")
    with pytest.raises(ValueError, match=r"a\.csv, row 0: no caption.*found \['image', 'label'\]"):
        load_pairs(path)


@pytest.mark.parametrize("name, content", [("a.json", ""), ("a.json", "[]"), ("a.jsonl", "\n"), ("a.csv", ""), ("a.csv", "image,caption\n")])
def test_empty_file(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=rf"{name} is empty"):
        load_pairs(tmp_path / name)


def test_unknown_format_and_missing_source(tmp_path):
    (tmp_path / "a.parquet").write_text("x")
    with pytest.raises(ValueError, match=r"a\.parquet: unknown annotation format '\.parquet'. Use one of \.json"):
        load_pairs(tmp_path / "a.parquet")
    with pytest.raises(ValueError, match="annotation source not found"):
        load_pairs(tmp_path / "nothing.json")
    with pytest.raises(ValueError, match="has no metadata.jsonl"):
        load_pairs(tmp_path)


def test_json_dict_without_records(tmp_path):
    with pytest.raises(ValueError, match=r"found keys \['info', 'licenses'\]"):
        load_pairs(write_json(tmp_path / "a.json", {"info": {}, "licenses": []}))


# ---- samples and bad samples ------------------------------------------------------------------------


def make_set(tmp_path: Path) -> Path:
    """Rows: 0 good, 1 missing image, 2 not an image, 3 empty caption, 4 grayscale, 5 RGBA, 6 16-bit."""
    save_png(tmp_path / "good.png")
    (tmp_path / "notes.png").write_text("not an image")
    save_png(tmp_path / "gray.png", "L", seed=1)
    save_png(tmp_path / "rgba.png", "RGBA", seed=2)
    save_png(tmp_path / "deep.png", "I;16", seed=3)
    records = [
        {"image": "good.png", "caption": "A good one."},
        {"image": "missing.png", "caption": "gone"},
        {"image": "notes.png", "caption": "text file"},
        {"image": "good.png", "caption": " ..!! "},
        {"image": "gray.png", "caption": "gray"},
        {"image": "rgba.png", "caption": "rgba"},
        {"image": "deep.png", "caption": "deep"},
    ]
    return write_json(tmp_path / "set.json", records)


@pytest.mark.parametrize(
    "index, file, row, reason",
    [(1, "missing.png", 1, "image file not found"), (2, "notes.png", 2, "not an image file"), (3, "good.png", 3, "empty caption")],
)
def test_bad_sample_error_names_source_file_and_row(tmp_path, index, file, row, reason):
    source = make_set(tmp_path)
    dataset = ImageTextDataset(load_pairs(source), eval_transform(SIZE, MEAN, STD))
    with pytest.raises(ValueError) as info:
        dataset[index]
    message = str(info.value)
    assert str(source) in message and f"row {row}" in message and str(tmp_path / file) in message
    assert reason in message and "on_bad_sample='skip'" in message


def test_samples_in_every_image_mode(tmp_path):
    dataset = ImageTextDataset(load_pairs(make_set(tmp_path)), eval_transform(SIZE, MEAN, STD))
    for index in (0, 4, 5, 6):
        sample = dataset[index]
        assert sample["pixel_values"].shape == (3, SIZE, SIZE) and sample["pixel_values"].dtype == torch.float32
        assert sample["index"] == index
    assert dataset[0]["caption"] == "a good one"
    assert [dataset[i]["image_id"] for i in (0, 4, 5, 6)] == [0, 3, 4, 5]  # good.png is rows 0 and 3


def test_skip_mode_collate_and_report(tmp_path):
    dataset = ImageTextDataset(load_pairs(make_set(tmp_path)), eval_transform(SIZE, MEAN, STD), on_bad_sample="skip")
    assert dataset[1] == SkippedSample(str(tmp_path / "missing.png"), 1, "image file not found")
    batch = collate([dataset[i] for i in range(4)])
    assert batch["pixel_values"].shape == (1, 3, SIZE, SIZE)
    assert batch["caption"] == ["a good one"] and batch["index"].tolist() == [0] and batch["image_id"].dtype == torch.long
    assert [(s.path, s.row) for s in batch["skipped"]] == [(str(tmp_path / f), r) for f, r in [("missing.png", 1), ("notes.png", 2), ("good.png", 3)]]

    everything_bad = collate([dataset[1], None])
    assert "pixel_values" not in everything_bad and len(everything_bad["index"]) == 0
    assert everything_bad["skipped"][1].reason == "the dataset returned None"

    # The skipped list travels with the batches out of the worker processes.
    report = SkipReport(limit=2)
    loader = DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=ImageTextDataset.collate)
    for batch in loader:
        report.add(batch)
    assert (report.count, report.seen) == (3, 7)
    summary = report.summary()
    assert summary.startswith("skipped 3 of 7 samples (42.86%):")
    assert "missing.png (row 1): image file not found" in summary and "(first 2 listed)" in summary
    assert "empty caption" not in summary  # the third entry is not listed
    other = SkipReport()
    other.add(collate([dataset[0]]))
    report.merge(other)
    assert (report.count, report.seen) == (3, 8)
    assert str(SkipReport()) == "skipped 0 of 0 samples"


def test_clean_false_keeps_raw_caption(tmp_path):
    dataset = ImageTextDataset(load_pairs(make_set(tmp_path)), eval_transform(SIZE, MEAN, STD), clean=False)
    assert dataset[0]["caption"] == "A good one."
    with pytest.raises(ValueError, match="on_bad_sample="):
        ImageTextDataset(load_pairs(make_set(tmp_path)), eval_transform(SIZE, MEAN, STD), on_bad_sample="ignore")


# ---- the sampler ----------------------------------------------------------------------------------


def test_two_processes_equal_one_with_double_batch():
    one = GlobalBatchSampler(50, batch_size=8, rank=0, world_size=1, seed=3)
    two = [GlobalBatchSampler(50, batch_size=4, rank=r, world_size=2, seed=3) for r in range(2)]
    assert one.steps_per_epoch == two[0].steps_per_epoch == 6
    for epoch in range(3):
        for sampler in (one, *two):
            sampler.set_epoch(epoch)
        for whole, first, second in zip(one, *two, strict=True):
            assert whole == first + second
            assert len(first) == len(second) == 4


def test_permutation_per_epoch_and_seed():
    sampler = GlobalBatchSampler(40, batch_size=10, seed=0)
    epoch0 = [i for batch in sampler for i in batch]
    sampler.set_epoch(1)
    epoch1 = [i for batch in sampler for i in batch]
    assert sorted(epoch0) == sorted(epoch1) == list(range(40)) and epoch0 != epoch1
    again = GlobalBatchSampler(40, batch_size=10, seed=0)
    assert [i for batch in again for i in batch] == epoch0
    assert [i for batch in GlobalBatchSampler(40, batch_size=10, seed=1) for i in batch] != epoch0


def test_start_step_resumes_exactly():
    full = GlobalBatchSampler(37, batch_size=3, rank=1, world_size=2, seed=5)
    full.set_epoch(2)
    uninterrupted = list(full)
    resumed = GlobalBatchSampler(37, batch_size=3, rank=1, world_size=2, seed=5, start_step=4)
    resumed.set_epoch(2)
    assert len(resumed) == full.steps_per_epoch - 4
    assert list(resumed) == uninterrupted[4:]
    resumed.set_epoch(3)  # later epochs start from their beginning
    full.set_epoch(3)
    assert list(resumed) == list(full)

    # global steps across epochs: resuming at step k continues the uninterrupted run
    steps = list(full.iter_steps(0, 20))
    assert [(e, s) for e, s, _ in steps[5:8]] == [(0, 5), (1, 6), (1, 7)]
    assert list(full.iter_steps(9, 20)) == steps[9:]
    assert list(full.steps(9, 20)) == [indices for _, _, indices in steps[9:]] and len(full.steps(9, 20)) == 11


def test_drop_last_false_pads_with_the_same_epoch():
    samplers = [GlobalBatchSampler(10, batch_size=2, rank=r, world_size=2, drop_last=False, seed=0) for r in range(2)]
    batches = [list(s) for s in samplers]
    assert samplers[0].steps_per_epoch == 3 and all(len(b) == 2 for rank in batches for b in rank)
    seen = [i for step in zip(*batches) for batch in step for i in batch]
    assert set(seen) == set(range(10)) and seen[10:] == seen[:2]


def test_pairs_share_a_batch_on_every_process():
    # 2 processes x 4 items: every pair (2k, 2k + 1) in one process's batch, side by side, every epoch
    samplers = [GlobalBatchSampler(40, batch_size=4, rank=r, world_size=2, seed=1, pairs=True) for r in range(2)]
    one = GlobalBatchSampler(40, batch_size=8, seed=1, pairs=True)
    orders = []
    for epoch in range(3):
        for sampler in (one, *samplers):
            sampler.set_epoch(epoch)
        order = []
        for whole, first, second in zip(one, *samplers, strict=True):
            assert whole == first + second
            for batch in (first, second):
                assert all(b % 2 == 0 and c == b + 1 for b, c in zip(batch[::2], batch[1::2])), batch
            order += whole
        assert sorted(order) == list(range(40))
        orders.append(order)
    assert orders[0] != orders[1]  # the pairs are shuffled each epoch
    # padding (drop_last=False) wraps around at a pair boundary
    padded = GlobalBatchSampler(10, batch_size=4, drop_last=False, seed=0, pairs=True)
    flat = [i for batch in padded for i in batch]
    assert len(flat) == 12 and flat[10:] == flat[:2] and flat[0] % 2 == 0 and flat[1] == flat[0] + 1


def test_pairs_need_even_counts():
    with pytest.raises(ValueError, match="batch_size=3: pairs=True"):
        GlobalBatchSampler(40, batch_size=3, pairs=True)
    with pytest.raises(ValueError, match="num_items=41: pairs=True"):
        GlobalBatchSampler(41, batch_size=4, pairs=True)


def test_sampler_errors():
    with pytest.raises(ValueError, match="no full global batch of 8"):
        GlobalBatchSampler(5, batch_size=4, world_size=2)
    with pytest.raises(ValueError, match=r"batch_size=0.*\n.*rank=2"):
        GlobalBatchSampler(5, batch_size=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="start_step=9"):
        GlobalBatchSampler(10, batch_size=2, start_step=9)


# ---- streaming ------------------------------------------------------------------------------------


def test_stream_split_by_node_is_disjoint_and_covering(tmp_path):
    records = [{"image": f"{i % 5}.png", "caption": f"caption {i}"} for i in range(23)]
    path = write_jsonl(tmp_path / "big.jsonl", records)
    parts = [list(stream_pairs(path, rank=r, world_size=3)) for r in range(3)]
    rows = [[row["row"] for row in part] for part in parts]
    assert all(rows) and sorted(r for part in rows for r in part) == list(range(23))
    assert not set(rows[0]) & set(rows[1]) and not set(rows[1]) & set(rows[2]) and not set(rows[0]) & set(rows[2])

    whole = list(stream_pairs(path))
    assert [r["image"] for r in whole] == load_pairs(path)["image"][:]
    ids = {r["image"]: r["image_id"] for r in whole}
    assert all(ids[r["image"]] == r["image_id"] for part in parts for r in part)  # the same in every process
    assert len(set(ids.values())) == 5


def test_question_records_beside_captions_in_json_and_csv(tmp_path):
    """A {image, question, answer(s)} record is a row whose caption is its most frequent answer; in
    a CSV holding both kinds, caption rows leave the question cell empty."""
    records = [
        {"image": "a.png", "caption": "a red circle"},
        {"image": "a.png", "question": "what colour?", "answers": [{"answer": "blue"}, {"answer": "red"}, {"answer": "red"}]},
    ]  # fmt: skip
    pairs = load_pairs(write_json(tmp_path / "a.json", records))
    assert pairs["caption"] == ["a red circle", "red"] and pairs["question"] == ["", "what colour?"]
    path = tmp_path / "b.csv"
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, ["image", "caption", "question", "answer"])
        writer.writeheader()
        writer.writerows([{"image": "a.png", "caption": "a red circle", "question": "", "answer": ""},
                          {"image": "a.png", "caption": "", "question": "what colour?", "answer": "red"}])  # fmt: skip
    pairs = load_pairs(path)
    assert pairs["caption"] == ["a red circle", "red"] and pairs["question"] == ["", "what colour?"]
    with pytest.raises(ValueError, match=r"row 0: a record with a `question` needs its answer"):
        load_pairs(write_json(tmp_path / "c.json", [{"image": "a.png", "question": "what?"}]))


def test_records_of_one_group_share_a_group_id_in_every_reader(tmp_path):
    """`group` marks records that describe the same content (one scene in two images): they share
    a group id, stable across load_pairs, stream_pairs and the samples; without it, the image id."""
    records = [
        {"image": "a.png", "caption": "a red square", "group": "red square"},
        {"image": "b.png", "caption": "a square, red", "group": "red square"},
        {"image": "c.png", "caption": "a blue circle", "group": "blue circle"},
        {"image": "d.png", "caption": "a green star"},
    ]
    for i, name in enumerate("abcd"):
        Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(tmp_path / f"{name}.png")
    path = write_json(tmp_path / "g.json", records)
    pairs = load_pairs(path)
    groups = pairs["group_id"]
    assert groups[0] == groups[1] != groups[2] and pairs["image_id"] == [0, 1, 2, 3]
    assert groups[3] == 3 and len(set(groups)) == 3
    streamed = list(stream_pairs(path))  # (its image ids are hashes of the paths)
    assert [r["group_id"] for r in streamed[:3]] == groups[:3] and streamed[3]["group_id"] == streamed[3]["image_id"]
    batch = collate([ImageTextDataset(pairs, lambda im: torch.zeros(3, 4, 4))[i] for i in range(4)])
    assert batch["group_id"].tolist() == groups and batch["image_id"].tolist() == [0, 1, 2, 3]


def test_stream_csv_and_bad_record(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("image,caption,image_id\na.png,x,7\nb.png,y,\n,z,\n")
    stream = iter(stream_pairs(path))
    assert next(stream)["image_id"] == 7
    assert next(stream)["image"] == str(tmp_path / "b.png")
    with pytest.raises(ValueError, match=r"a\.csv, row 2: no image path"):
        next(stream)

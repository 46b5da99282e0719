"""Image-text pairs: annotation files -> a `datasets.Dataset` of rows, the torch dataset that turns
rows into training samples, and a deterministic, resumable batch sampler for one or many processes.

A pairs dataset (what `load_pairs` returns) has one row per (image, caption) pair:

    image     absolute path of the image file (str)
    caption   the caption as the source wrote it (str; cleaning happens when a sample is built)
    image_id  int; the rows of one image share it (ITC soft targets, retrieval, the feature cache)
    group_id  int; rows that describe the same content share it: the record's optional `group`
              field (say, a scene or a near-duplicate cluster), else the image_id. Stage 1 treats
              the rows of a group as positives of each other: ITC targets, never ITM negatives
    row       the record's 0-based index in the source file, so that errors can point at it
    question  "" for a caption; for a question-answer record ({"image", "question", "answer"},
              VQAv2's list of answers accepted) the question, and `caption` holds the answer

The description of the source (file, format, image root, split) rides on `pairs.info.description`
as JSON: `datasets` keeps it through `select`, `filter`, `shuffle` and `train_test_split`, so an
error raised in a DataLoader worker far from the loading code can still say which file is wrong.

Bad samples. A missing or unreadable image, or a caption that is empty once cleaned, either raises
(`on_bad_sample="error"`, the default: the message names the source, the row and the image file)
or is skipped (`"skip"`). A skipped sample comes back from `__getitem__` as a `SkippedSample`
(path, row, reason) instead of a dict; `collate` drops it from the batch and lists it under
`batch["skipped"]`. The record travels with the batch because DataLoader workers are separate
processes: a list kept on the dataset object would only fill up in each worker's own copy.
`SkipReport` adds the batches' lists up for the summary at the end of training.

Legend: b batch, S image side, B per-process batch size, W number of processes (world size).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import datasets
import torch
from datasets.distributed import split_dataset_by_node
from PIL import Image
from torch import Tensor
from torch.utils.data import Sampler

from bridges.vision import load_image

BadSamplePolicy = Literal["error", "skip"]
BAD_SAMPLE_POLICIES: tuple[str, ...] = ("error", "skip")

# Keys accepted for the image path and the caption(s), in order of preference. "filename" with
# "filepath" is Karpathy's raw split file (dataset_coco.json), where filepath is the folder.
IMAGE_KEYS: tuple[str, ...] = ("image", "image_path", "file_name", "filename", "filepath")
CAPTION_KEYS: tuple[str, ...] = ("caption", "text", "captions", "sentences")
# A question-answer record (VQAv2 style) has a `question` and one of these; its answer is the
# text the model learns to generate after the question (stage 2), the question its prompt.
ANSWER_KEYS: tuple[str, ...] = ("answer", "answers", "multiple_choice_answer")
RECORD_LIST_KEYS: tuple[str, ...] = ("annotations", "data", "images")  # where a JSON dict keeps its records
FILE_FORMATS: dict[str, str] = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv"}
METADATA_NAMES: tuple[str, ...] = ("metadata.jsonl", "metadata.csv")  # the `imagefolder` convention

PAIRS_FEATURES = datasets.Features(
    {
        "image": datasets.Value("string"),
        "caption": datasets.Value("string"),
        "image_id": datasets.Value("int64"),
        "group_id": datasets.Value("int64"),
        "row": datasets.Value("int64"),
        "question": datasets.Value("string"),  # "" for a caption; else the caption is its answer
    }
)


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------

# BLIP's cleaning removes these characters; we replace them by spaces (as the original does), so
# "dog.cat" stays two words. Apostrophes are kept: "don't" and "dog's" are words of the caption.
_STRIPPED_CHARACTERS = re.compile(r"[.!\"()*#:;~]")
_CURLY_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'"})


def clean_caption(text: str, max_words: int = 50) -> str:
    """BLIP/BLIP-2 caption cleaning: lowercase, `.!"()*#:;~` -> spaces, whitespace collapsed, at
    most `max_words` words. Curly apostrophes become straight ones (so the tokenizer sees one
    spelling of "don't")."""
    text = _STRIPPED_CHARACTERS.sub(" ", text.lower().translate(_CURLY_APOSTROPHES))
    return " ".join(text.split()[:max_words])  # split() also collapses tabs and newlines


# --------------------------------------------------------------------------------------------
# Reading annotation files
# --------------------------------------------------------------------------------------------


def _file_format(path: Path) -> str:
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"{path}: unknown annotation format {path.suffix!r}. Use one of "
            f"{', '.join(FILE_FORMATS)} (records with an image path and a caption), or a folder "
            "with metadata.jsonl (the datasets `imagefolder` convention)."
        )
    return fmt


def _json_records(path: Path) -> list[tuple[int, Any]]:
    """(row, record) pairs of a .json file: a list of records, a dict holding that list, or a
    COCO captions file (`images` with id/file_name + `annotations` with image_id/caption)."""
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise ValueError(f"{path} is empty: expected a JSON list of records with an image path and a caption.")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); JSON Lines files need the .jsonl suffix.") from None
    if isinstance(data, dict):
        data = _records_of_dict(data, path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records (or a dict with one), found {type(data).__name__}.")
    return list(enumerate(data))


def _records_of_dict(data: dict, path: Path) -> list:
    annotations, images = data.get("annotations"), data.get("images")
    if (
        isinstance(annotations, list)
        and isinstance(images, list)
        and annotations
        and isinstance(annotations[0], dict)
        and not any(key in annotations[0] for key in IMAGE_KEYS)
    ):
        # COCO's own captions file: the annotations name their image by id only.
        files = {image.get("id"): image.get("file_name") for image in images if isinstance(image, dict)}
        records = []
        for row, annotation in enumerate(annotations):
            file = files.get(annotation.get("image_id")) if isinstance(annotation, dict) else None
            if file is None:
                raise ValueError(
                    f"{path}, annotations[{row}]: image_id {annotation.get('image_id')!r} has no entry "
                    "with that id and a file_name in `images`."
                )
            records.append({**annotation, "image": file})
        return records
    for key in RECORD_LIST_KEYS:
        if isinstance(data.get(key), list):
            return data[key]
    raise ValueError(
        f"{path}: a JSON dict must hold its records as a list under one of {list(RECORD_LIST_KEYS)}; "
        f"found keys {sorted(data)}."
    )


def _jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    """Lazily, line by line (streaming reads files bigger than memory). Blank lines are not
    records; `row` counts records."""
    row = 0
    with path.open(encoding="utf-8-sig") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {line_number}: not valid JSON ({error}).") from None
            yield row, record
            row += 1


def _csv_records(path: Path, delimiter: str) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8-sig", newline="") as file:
        reader = csv.DictReader(file, delimiter=delimiter)
        if reader.fieldnames is None:
            return  # empty file: the caller reports it
        yield from enumerate(reader)


def _read_records(path: Path, fmt: str) -> Iterator[tuple[int, Any]]:
    if fmt == "json":
        return iter(_json_records(path))
    if fmt == "jsonl":
        return _jsonl_records(path)
    return _csv_records(path, "\t" if fmt == "tsv" else ",")


class _Source(NamedTuple):
    file: Path  # the annotation file (for a folder: its metadata file)
    fmt: str
    root: Path  # what relative image paths resolve against
    description: dict[str, Any]  # stored on the pairs dataset, quoted by errors


def _resolve_source(source: str | Path, image_root: str | Path | None, split: str | None) -> tuple[_Source, bool]:
    """The annotation file of `source` and whether records still need filtering by `split`."""
    path = Path(source).expanduser().absolute()
    filter_split = split is not None
    if path.is_dir():
        folder = path
        if split is not None and any((path / split / name).is_file() for name in METADATA_NAMES):
            folder, filter_split = path / split, False  # imagefolder layout: one subfolder per split
        found = [folder / name for name in METADATA_NAMES if (folder / name).is_file()]
        if not found:
            raise ValueError(
                f"{folder} has no metadata.jsonl: an image folder needs a metadata.jsonl with "
                '`file_name` and `caption` (or `text`) on each line, e.g. {"file_name": "a.jpg", '
                '"caption": "a dog"} (the datasets `imagefolder` convention).'
            )
        file, fmt = found[0], "imagefolder"
        read_fmt = _file_format(file)
    elif path.is_file():
        file, fmt = path, _file_format(path)
        read_fmt = fmt
    else:
        raise ValueError(f"annotation source not found: {path} (expected a .json/.jsonl/.csv file or a folder).")
    root = Path(image_root).expanduser().absolute() if image_root is not None else file.parent
    description = {"source": str(path), "file": str(file), "format": fmt, "image_root": str(root), "split": split}
    return _Source(file, read_fmt, root, description), filter_split


def _split_filter(split: str) -> set[str]:
    # "train+restval", as datasets writes split unions (Karpathy's COCO trains on both)
    return {part.strip() for part in split.split("+") if part.strip()}


def _parse_record(record: Any, row: int, source: _Source) -> tuple[str, list[str], str]:
    """(absolute image path, captions, question) of one record; errors name the row and the keys
    found. A question-answer record gives its most frequent answer as the one caption and its
    question; a caption record gives question ""."""
    where = f"{source.file}, row {row}"
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a record (an object with an image path and a caption), found {record!r}.")

    if record.get("filename") and record.get("filepath"):
        image = os.path.join(str(record["filepath"]), str(record["filename"]))
    else:
        image = next((record[key] for key in IMAGE_KEYS if record.get(key)), None)
    if image is None:
        raise ValueError(
            f"{where}: no image path; expected one of the keys {list(IMAGE_KEYS)}, found {sorted(map(str, record))}. "
            "Rename the key (or CSV column) holding the image path to `image`."
        )
    if not isinstance(image, str):
        raise ValueError(f"{where}: the image path must be a string, found {image!r}.")
    if "://" in image:
        raise ValueError(f"{where}: {image} is a URL; download the images first and point `image` at the files.")

    image = os.path.normpath(os.path.join(source.root, os.path.expanduser(image)))
    if record.get("question") not in (None, ""):  # a CSV mixing both leaves it empty on caption rows
        return image, [_answer(record, where)], _question(record, where)

    key = next((key for key in CAPTION_KEYS if key in record), None)
    if key is None:
        raise ValueError(
            f"{where}: no caption; expected one of the keys {list(CAPTION_KEYS)}, found {sorted(map(str, record))}. "
            "Rename the key (or CSV column) holding the caption to `caption`."
        )
    value = record[key]
    values = value if isinstance(value, list) else [value]
    captions = []
    for caption in values:
        if isinstance(caption, Mapping):  # Karpathy's "sentences": [{"raw": ..., "tokens": ...}]
            caption = caption.get("raw", caption.get("caption"))
        if caption is None:
            caption = ""  # an empty caption is a bad *sample*, handled by on_bad_sample at load time
        if not isinstance(caption, str):
            raise ValueError(f"{where}: `{key}` must be a string or a list of strings, found {value!r}.")
        captions.append(caption)
    if not captions:
        raise ValueError(f"{where}: `{key}` is an empty list; give each record at least one caption.")
    return image, captions, ""


def _question(record: Mapping, where: str) -> str:
    question = record["question"]
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: `question` must be a non-empty string, found {question!r}.")
    return question.strip()


def _answer(record: Mapping, where: str) -> str:
    """The answer of a question record: a string, or the most frequent of a list (VQAv2's ten
    annotators' answers, as strings or {"answer": ...} objects; ties go to the first)."""
    key = next((key for key in ANSWER_KEYS if key in record), None)
    if key is None:
        raise ValueError(
            f"{where}: a record with a `question` needs its answer under one of {list(ANSWER_KEYS)}, "
            f"found {sorted(map(str, record))}."
        )
    value = record[key]
    values = value if isinstance(value, list) else [value]
    answers = [v.get("answer") if isinstance(v, Mapping) else v for v in values]
    if not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{where}: `{key}` must be a string or a list of strings / {{\"answer\": ...}}, found {value!r}.")
    return max(answers, key=answers.count)  # max keeps the first of equals


def _id_field(record: Mapping) -> Any:
    value = record.get("image_id")
    return None if value == "" else value  # an empty CSV cell is no id


def _group_field(record: Mapping) -> Any:
    value = record.get("group")
    return None if value in ("", None) else value


def _group_id(group: Any, image_id: int) -> int:
    """A stable id of a record's `group` field, or its image_id when it has none. A group id is a
    63-bit hash, so it never collides with the small image ids by accident."""
    return image_id if group is None else _stable_id(f"group:{group}")


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    return None


def _stable_id(key: str) -> int:
    """A 63-bit id from a string, the same in every process and every run (unlike `hash`)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big") >> 1


def load_pairs(
    source: str | Path,
    *,
    image_root: str | Path | None = None,
    split: str | None = None,
) -> datasets.Dataset:
    """Image-caption pairs from an annotation file or an image folder, as a `datasets.Dataset`
    with columns image (absolute path), caption (raw), image_id (int) and row (record index).

    `source`: a .json file (a list of records; a dict with the list under "annotations", "data" or
    "images"; or COCO's captions file), .jsonl, .csv/.tsv (with a header row), or a folder with
    metadata.jsonl / metadata.csv (`file_name` + `caption`/`text`). A record's caption may be a
    list (COCO-Karpathy style): it gives one row per caption, all with the record's image_id.
    Relative image paths resolve against `image_root` if given, else the annotation file's folder.

    `split`: keep only records whose `split` field is in it ("train", "train+restval"); for a
    folder, the subfolder `split/` with its own metadata.jsonl if there is one.

    image_id: the records' `image_id` field when every record has one (integers, or strings that
    are then numbered by first appearance), else numbered by first appearance of the image path.
    group_id: a stable id of the records' `group` field where they have one, else the image_id.
    """
    src, filter_split = _resolve_source(source, image_root, split)
    wanted = _split_filter(split) if filter_split and split is not None else None

    images: list[str] = []
    captions: list[str] = []
    rows: list[int] = []
    questions: list[str] = []
    id_fields: list[Any] = []  # per output row: the record's image_id field (None when absent)
    groups: list[Any] = []  # per output row: the record's group field (None when absent)
    splits_seen: set[str] = set()
    num_records = 0
    for row, record in _read_records(src.file, src.fmt):
        num_records += 1
        if wanted is not None:
            record_split = record.get("split") if isinstance(record, Mapping) else None
            if record_split is not None:
                splits_seen.add(str(record_split))
            if record_split not in wanted:
                continue
        image, texts, question = _parse_record(record, row, src)
        id_field, group = _id_field(record), _group_field(record)
        for text in texts:
            images.append(image)
            captions.append(text)
            rows.append(row)
            id_fields.append(id_field)
            groups.append(group)
            questions.append(question)

    if num_records == 0:
        raise ValueError(f"{src.file} is empty: it has no records (expected an image path and a caption per record).")
    if wanted is not None and not images:
        if not splits_seen:
            raise ValueError(f"split={split!r} was given but the records of {src.file} have no `split` field; leave split unset.")
        raise ValueError(f"{src.file} has no records of split {split!r}; its splits are {sorted(splits_seen)}.")

    image_ids = _assign_image_ids(images, rows, id_fields, src.file)
    description = {**src.description, "num_records": num_records}
    info = datasets.DatasetInfo(description=json.dumps(description), features=PAIRS_FEATURES)
    columns = {"image": images, "caption": captions, "image_id": image_ids, "group_id": list(map(_group_id, groups, image_ids)),
               "row": rows, "question": questions}  # fmt: skip
    return datasets.Dataset.from_dict(columns, info=info)


def _assign_image_ids(images: list[str], rows: list[int], id_fields: list[Any], file: Path) -> list[int]:
    ids: list[int]
    if all(value is not None for value in id_fields):
        as_ints = [_as_int(value) for value in id_fields]
        if all(value is not None for value in as_ints):
            ids = as_ints  # type: ignore[assignment]  # (no None left)
        else:
            ids = _number_by_first_appearance([str(value) for value in id_fields])
    else:
        ids = _number_by_first_appearance(images)
    # One id must mean one image: the feature cache stores one entry per id, and ITC treats pairs
    # with the same id as positives.
    owner: dict[int, tuple[str, int]] = {}
    for image_id, image, row in zip(ids, images, rows):
        first = owner.setdefault(image_id, (image, row))
        if first[0] != image:
            raise ValueError(
                f"{file}: image_id {image_id} names two different images: {first[0]} (row {first[1]}) and "
                f"{image} (row {row}). Fix the annotation, or drop the image_id field to number images by path."
            )
    return ids


def _number_by_first_appearance(keys: list[str]) -> list[int]:
    numbers: dict[str, int] = {}
    return [numbers.setdefault(key, len(numbers)) for key in keys]


def stream_pairs(
    source: str | Path,
    *,
    image_root: str | Path | None = None,
    split: str | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> datasets.IterableDataset:
    """The rows of `load_pairs`, read lazily (JSONL and CSV line by line, so sets larger than memory
    work; a .json file is parsed whole) and split between processes: process `rank` of
    `world_size` gets every world_size-th row (`datasets.distributed.split_dataset_by_node`).

    Differences from `load_pairs`, because no process sees the whole file before it starts:
    image_id is the record's integer `image_id` field when it has one, else a stable 63-bit hash of
    the field's string or of the image path (equal for equal images, in every process); records
    are checked as they are read, so a bad record raises when the stream reaches it.
    """
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"rank={rank}, world_size={world_size}: need world_size >= 1 and 0 <= rank < world_size.")
    src, filter_split = _resolve_source(source, image_root, split)
    wanted = sorted(_split_filter(split)) if filter_split and split is not None else None
    stream = datasets.IterableDataset.from_generator(
        _stream_rows,
        features=PAIRS_FEATURES,
        # in a list, the file is the stream's one shard (datasets shards over gen_kwargs lists)
        gen_kwargs={"sources": [src], "wanted": wanted},
    )
    stream.info.description = json.dumps(src.description)
    if world_size == 1:
        return stream
    return split_dataset_by_node(stream, rank=rank, world_size=world_size)


def _stream_rows(sources: list[_Source], wanted: list[str] | None) -> Iterator[dict[str, Any]]:
    for src in sources:
        num_records = 0
        for row, record in _read_records(src.file, src.fmt):
            num_records += 1
            if wanted is not None and (not isinstance(record, Mapping) or record.get("split") not in wanted):
                continue
            image, texts, question = _parse_record(record, row, src)
            id_field = _id_field(record)
            image_id = _as_int(id_field)
            if image_id is None:
                image_id = _stable_id(str(id_field) if id_field is not None else image)
            group_id = _group_id(_group_field(record), image_id)
            for text in texts:
                yield {"image": image, "caption": text, "image_id": image_id, "group_id": group_id, "row": row,
                       "question": question}  # fmt: skip
        if num_records == 0:
            raise ValueError(f"{src.file} is empty: it has no records (expected an image path and a caption per record).")


def pairs_source(pairs: Any) -> dict[str, Any]:
    """The source description that `load_pairs` stored on a pairs dataset ({} if none)."""
    try:
        return json.loads(pairs.info.description)
    except (AttributeError, TypeError, ValueError):
        return {}


def source_label(pairs: Any) -> str:
    """A short name of where the pairs come from, for messages: "/data/coco.json (split=train)"."""
    description = pairs_source(pairs)
    label = description.get("file", description.get("source", "pairs dataset"))  # rows count in `file`
    if description.get("split"):
        label += f" (split={description['split']})"
    return label


# --------------------------------------------------------------------------------------------
# Samples, bad samples and batches
# --------------------------------------------------------------------------------------------


class SkippedSample(NamedTuple):
    """A sample left out under on_bad_sample="skip": what `__getitem__` returns in its place."""

    path: str
    row: int
    reason: str


def check_policy(on_bad_sample: str) -> None:
    if on_bad_sample not in BAD_SAMPLE_POLICIES:
        raise ValueError(f"on_bad_sample={on_bad_sample!r}: expected one of {BAD_SAMPLE_POLICIES}.")


def bad_sample(
    policy: BadSamplePolicy, *, source: str, row: int, path: str, reason: str, what: str = "image"
) -> SkippedSample:
    """Raise (policy "error") or return the skip record (policy "skip") for one bad sample."""
    if policy == "error":
        raise ValueError(
            f"{source}, row {row}, {what} {path}: {reason}. Fix or remove that record, or set "
            "on_bad_sample='skip' to skip bad samples (they are counted and listed)."
        )
    return SkippedSample(path, row, reason)


def usable_caption(raw: str, *, clean: bool, max_words: int) -> str | None:
    """The caption a sample carries (cleaned when `clean`), or None when nothing is left of it."""
    caption = clean_caption(raw, max_words) if clean else raw
    return caption if caption.strip() else None


class ImageTextDataset(torch.utils.data.Dataset):
    """Pairs -> samples {pixel_values (3, S, S), caption (cleaned), image_id, group_id, index, question}.

    `transform` maps a PIL image to a tensor: `bridge.train_transform()` for training,
    `bridge.eval_transform()` for evaluation. Images are decoded with `load_image` and the
    transforms convert any mode (grayscale, RGBA, palette, 16-bit) to RGB.
    A bad sample raises or comes back as a `SkippedSample` (see the module docstring).
    """

    def __init__(
        self,
        pairs: datasets.Dataset,
        transform: Callable[[Image.Image], Tensor],
        *,
        clean: bool = True,
        max_words: int = 50,
        on_bad_sample: BadSamplePolicy = "error",
    ) -> None:
        check_policy(on_bad_sample)
        self.pairs = pairs
        self.transform = transform
        self.clean = clean
        self.max_words = max_words
        self.on_bad_sample = on_bad_sample
        self.source = source_label(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedSample:
        record = self.pairs[int(index)]
        path, row = record["image"], int(record["row"])
        caption = usable_caption(record["caption"], clean=self.clean, max_words=self.max_words)
        if caption is None:  # checked first: it costs nothing, the image costs a decode
            return self._bad(row, path, f"empty caption (raw: {record['caption']!r})")
        if not os.path.isfile(path):
            return self._bad(row, path, "image file not found")
        try:
            image = load_image(path)
        except ValueError as error:
            return self._bad(row, path, f"not an image file that PIL can read ({error.__cause__ or error})")
        return {
            "pixel_values": self.transform(image),  # (3, S, S)
            "caption": caption,
            "image_id": int(record["image_id"]),
            "group_id": group_id(record),
            "index": int(index),
            "question": record.get("question") or "",
        }

    def _bad(self, row: int, path: str, reason: str) -> SkippedSample:
        return bad_sample(self.on_bad_sample, source=self.source, row=row, path=path, reason=reason)

    @staticmethod
    def collate(batch: Sequence[Mapping[str, Any] | SkippedSample | None]) -> dict[str, Any]:
        return collate(batch)


def group_id(record: Mapping[str, Any]) -> int:
    """A pairs row's group id; its image_id for pairs built without the column."""
    value = record.get("group_id")
    return int(record["image_id"] if value is None else value)


def collate(batch: Sequence[Mapping[str, Any] | SkippedSample | None]) -> dict[str, Any]:
    """DataLoader `collate_fn` for `ImageTextDataset` and `CachedPairsDataset` samples.

    Tensors are stacked (pixel_values (b, 3, S, S) or image_tokens (b, n, d)), ints become a long
    tensor (image_id (b,), group_id (b,), index (b,)), strings a list (caption). Skipped samples are dropped and
    listed under "skipped" (a list of SkippedSample), so b may be smaller than the batch size; when
    every sample was skipped the batch holds only empty caption/image_id/index and "skipped".
    A bare None (a dataset that skips without saying why) is listed with an unknown reason.
    """
    samples = [item for item in batch if isinstance(item, Mapping)]
    skipped = [
        item if isinstance(item, SkippedSample) else SkippedSample("?", -1, "the dataset returned None")
        for item in batch
        if not isinstance(item, Mapping)
    ]
    out: dict[str, Any] = {}
    if not samples:
        empty = torch.empty(0, dtype=torch.long)
        out.update(caption=[], image_id=empty, group_id=empty.clone(), index=empty.clone())
    for key in samples[0] if samples else ():
        values = [sample[key] for sample in samples]
        if isinstance(values[0], Tensor):
            out[key] = torch.stack(values)
        elif isinstance(values[0], int) and not isinstance(values[0], bool):
            out[key] = torch.tensor(values, dtype=torch.long)
        else:
            out[key] = values
    out["skipped"] = skipped
    return out


class SkipReport:
    """Adds up the skipped samples of the batches a training loop sees, for one summary at the end:

        report = SkipReport()
        for batch in loader:
            report.add(batch)
            ...
        print(report.summary())   # skipped 3 of 1000 samples (0.30%): ... (first 10 listed)

    With several processes, gather each one's `(seen, entries)` and `merge` them on the main one.
    """

    def __init__(self, limit: int = 10) -> None:
        self.limit = limit  # how many entries summary() lists
        self.seen = 0  # samples loaded, skipped ones included
        self.entries: list[SkippedSample] = []

    @property
    def count(self) -> int:
        return len(self.entries)

    def add(self, batch: Mapping[str, Any]) -> None:
        skipped = list(batch.get("skipped", ()))
        self.seen += len(batch["index"]) + len(skipped)
        self.entries.extend(SkippedSample(*entry) for entry in skipped)

    def merge(self, other: SkipReport) -> None:
        self.seen += other.seen
        self.entries.extend(other.entries)

    def summary(self) -> str:
        share = f" ({100 * self.count / self.seen:.2f}%)" if self.seen else ""
        head = f"skipped {self.count} of {self.seen} samples{share}"
        if not self.entries:
            return head
        lines = [f"  {entry.path} (row {entry.row}): {entry.reason}" for entry in self.entries[: self.limit]]
        more = f"\n  ... (first {self.limit} listed)" if self.count > self.limit else ""
        return f"{head}:\n" + "\n".join(lines) + more

    def __str__(self) -> str:
        return self.summary()


# --------------------------------------------------------------------------------------------
# The batch sampler
# --------------------------------------------------------------------------------------------


def paired_permutation(num_items: int, generator: torch.Generator) -> Tensor:
    """A random order of the pairs (2k, 2k + 1) of `num_items` (even) items, each pair kept side
    by side at an even offset: a batch of even size starting at an even offset holds both or
    neither of a pair."""
    first = 2 * torch.randperm(num_items // 2, generator=generator)
    return torch.stack([first, first + 1], dim=1).reshape(-1)


class GlobalBatchSampler(Sampler[list[int]]):
    """Deterministic, resumable batches of indices for process `rank` of `world_size`.

    Epoch e shuffles all items with `torch.Generator().manual_seed(seed + e)`. The global batch of
    step s is perm[s*B*W : (s+1)*B*W] and process `rank` takes its chunk [rank*B : (rank+1)*B].
    The permutation does not depend on W, so one process with batch 2B sees exactly the
    concatenation of what two processes with batch B see, and a run can resume on a different
    number of processes as long as B*W stays the same.

    drop_last=True drops the last partial global batch; False fills it up with the first items of
    the same epoch's permutation (seen twice that epoch), so every process gets a full batch and
    all take the same number of steps (collectives never wait on a process that has finished).

    pairs=True: items 2k and 2k + 1 are a pair (hard negatives of each other, e.g. ShapesWorld's
    shape twins) and stay side by side in one process's batch: the epoch shuffles the pairs, not
    the items. It needs an even number of items and an even (per-process) batch_size.

    Use as `DataLoader(dataset, batch_sampler=sampler)`. `start_step` makes the *first* pass begin
    at that step of the epoch (exact resume without loading the samples before it); later passes,
    after `set_epoch`, start at 0. For step-based training across epochs use `iter_steps` or
    `steps(start, total)`, which count global steps.
    """

    def __init__(
        self,
        num_items: int,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        drop_last: bool = True,
        start_step: int = 0,
        pairs: bool = False,
    ) -> None:
        problems = []
        if not (isinstance(batch_size, int) and batch_size >= 1):
            problems.append(f"batch_size={batch_size!r}: expected a positive int (per process)")
        if not (isinstance(world_size, int) and world_size >= 1):
            problems.append(f"world_size={world_size!r}: expected a positive int")
        elif not (isinstance(rank, int) and 0 <= rank < world_size):
            problems.append(f"rank={rank!r}: expected 0 <= rank < world_size={world_size}")
        if not (isinstance(num_items, int) and num_items >= 1):
            problems.append(f"num_items={num_items!r}: the dataset is empty")
        if pairs and isinstance(batch_size, int) and batch_size % 2:
            problems.append(f"batch_size={batch_size}: pairs=True keeps pairs in one batch, so it must be even")
        if pairs and isinstance(num_items, int) and num_items % 2:
            problems.append(f"num_items={num_items}: pairs=True needs items in pairs (2k, 2k + 1), so an even number")
        if problems:
            raise ValueError("invalid GlobalBatchSampler:\n  - " + "\n  - ".join(problems))
        self.pairs = pairs
        self.num_items = num_items
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.drop_last = drop_last
        self.global_batch_size = batch_size * world_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{num_items} items make no full global batch of {self.global_batch_size} "
                f"(batch_size={batch_size} x world_size={world_size}): lower batch_size or set drop_last=False."
            )
        if not (isinstance(start_step, int) and 0 <= start_step <= self.steps_per_epoch):
            raise ValueError(f"start_step={start_step!r}: expected 0..{self.steps_per_epoch} (steps per epoch).")
        self.epoch = 0
        self._start_step = start_step  # consumed by the next __iter__
        self._cached: tuple[int, Tensor] | None = None  # (epoch, order): one randperm per epoch

    @property
    def steps_per_epoch(self) -> int:
        if self.drop_last:
            return self.num_items // self.global_batch_size
        return -(-self.num_items // self.global_batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> Tensor:
        """All indices of epoch `epoch` in the order the global batches take them:
        (steps_per_epoch * B * W,), padded from its own start when drop_last=False."""
        if self._cached is None or self._cached[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            if self.pairs:
                perm = paired_permutation(self.num_items, generator)
            else:
                perm = torch.randperm(self.num_items, generator=generator)
            needed = self.steps_per_epoch * self.global_batch_size
            if needed > self.num_items:
                perm = perm[torch.arange(needed) % self.num_items]
            self._cached = (epoch, perm[:needed])
        return self._cached[1]

    def batch(self, epoch: int, step: int) -> list[int]:
        """This process's indices at `step` (within the epoch) of `epoch`."""
        start = step * self.global_batch_size + self.rank * self.batch_size
        return self.order(epoch)[start : start + self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        start, self._start_step = self._start_step, 0
        epoch = self.epoch
        for step in range(start, self.steps_per_epoch):
            yield self.batch(epoch, step)

    def __len__(self) -> int:
        return self.steps_per_epoch - self._start_step

    def iter_steps(self, start_step: int = 0, total_steps: int | None = None) -> Iterator[tuple[int, int, list[int]]]:
        """(epoch, global step, indices) for global steps start_step, ..., total_steps - 1
        (endless without total_steps), running on from one epoch into the next. Independent of
        `set_epoch` and `start_step`: resuming at global step k gives exactly what an
        uninterrupted run gave from step k on."""
        step = start_step
        while total_steps is None or step < total_steps:
            epoch, within = divmod(step, self.steps_per_epoch)
            yield epoch, step, self.batch(epoch, within)
            step += 1

    def steps(self, start_step: int, total_steps: int) -> StepBatches:
        """The index lists of global steps start_step..total_steps-1, with a length, for
        `DataLoader(dataset, batch_sampler=sampler.steps(start, total))`: the loop's i-th batch is
        global step start + i, and one worker pool serves every epoch."""
        if not 0 <= start_step <= total_steps:
            raise ValueError(f"start_step={start_step}, total_steps={total_steps}: need 0 <= start_step <= total_steps.")
        return StepBatches(self, start_step, total_steps)


class StepBatches(Iterable[list[int]]):
    """See `GlobalBatchSampler.steps`."""

    def __init__(self, sampler: GlobalBatchSampler, start_step: int, total_steps: int) -> None:
        self.sampler, self.start_step, self.total_steps = sampler, start_step, total_steps

    def __iter__(self) -> Iterator[list[int]]:
        for _, _, indices in self.sampler.iter_steps(self.start_step, self.total_steps):
            yield indices

    def __len__(self) -> int:
        return self.total_steps - self.start_step

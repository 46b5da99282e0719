"""Feature cache: run the frozen vision tower once over a dataset, then train from its tokens.

The tower is frozen and the cache uses its evaluation transform (no augmentation), so the tokens
of an image never change: computing them once saves the tower's forward pass (most of a stage-1
step with a ViT-g) in every epoch. The price is the augmentation: training from the cache sees
every image exactly as evaluation does.

Layout of a cache folder:

    index.json                the bridge spec, token shape, dtype, shards, image_id -> (shard, offset),
                              image_id -> path, the pairs' source, the images left out
    shard-00000.safetensors   tokens (m, n, d) in `dtype` and image_id (m,), images in first-
    shard-00001.safetensors   appearance order, `shard_size` images per shard
    ...

Writing is resumable: each shard is written to a temporary file and renamed, and carries a
fingerprint (bridge spec, image size, dtype, the image ids and paths it should hold) in its
safetensors metadata. A shard whose fingerprint matches is complete and is not recomputed; a
changed bridge, dtype or shard size recomputes exactly the shards it affects.

Legend: m images in a shard, b batch, n image tokens, d tower width.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from bridges.vision import VisionBridge, load_image
from qformer.data import (
    BadSamplePolicy,
    SkippedSample,
    bad_sample,
    check_policy,
    collate,
    group_id,
    pairs_source,
    source_label,
    usable_caption,
)

INDEX_NAME = "index.json"
FORMAT = "qformer-feature-cache"
FORMAT_VERSION = 1
FLOAT16_MAX = 65504.0

DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"dtype={dtype}: the feature cache stores one of {list(DTYPES)}.")


class _Image:
    """One unique image of the pairs: its id, file and the first row that names it."""

    __slots__ = ("image_id", "path", "row")

    def __init__(self, image_id: int, path: str, row: int) -> None:
        self.image_id, self.path, self.row = image_id, path, row


def unique_images(pairs: datasets.Dataset) -> list[_Image]:
    """The pairs' images, one per image_id, in order of first appearance."""
    columns = pairs.select_columns(["image_id", "image", "row"]).to_dict()
    seen: dict[int, _Image] = {}
    for image_id, path, row in zip(columns["image_id"], columns["image"], columns["row"]):
        first = seen.setdefault(int(image_id), _Image(int(image_id), path, int(row)))
        if first.path != path:
            raise ValueError(
                f"{source_label(pairs)}: image_id {image_id} names two different images: {first.path} "
                f"(row {first.row}) and {path} (row {row}); the cache stores one entry per image_id."
            )
    return list(seen.values())


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


class _ImageFiles(torch.utils.data.Dataset):
    """The images of one shard through the eval transform. A bad image is returned as a
    SkippedSample, so that the main process (not a worker) decides whether to raise."""

    def __init__(self, images: list[_Image], transform: Any) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any] | SkippedSample:
        image = self.images[i]
        if not os.path.isfile(image.path):
            return SkippedSample(image.path, image.row, "image file not found")
        try:
            pixels = self.transform(load_image(image.path))  # (3, S, S)
        except ValueError as error:
            return SkippedSample(image.path, image.row, f"not an image file that PIL can read ({error.__cause__ or error})")
        return {"pixel_values": pixels, "image_id": image.image_id}


def _fingerprint(header: dict[str, Any], images: list[_Image]) -> str:
    content = json.dumps({"header": header, "images": [[image.image_id, image.path] for image in images]})
    return hashlib.sha256(content.encode("utf-8")).hexdigest()


def _complete_shard(file: Path, fingerprint: str) -> tuple[list[int], list[dict]] | None:
    """(image ids, skipped entries) of a finished shard with this fingerprint, else None."""
    if not file.is_file():
        return None
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("fingerprint") != fingerprint:
                return None
            ids = handle.get_tensor("image_id").tolist()
        return ids, json.loads(metadata.get("skipped", "[]"))
    except (SafetensorError, OSError, ValueError, KeyError):  # unreadable or foreign: recompute, never trust
        return None


@torch.no_grad()
def _compute_shards(
    bridge: VisionBridge,
    todo: list[tuple[int, list[_Image]]],
    *,
    transform: Any,
    batch_size: int,
    num_workers: int,
    dtype: torch.dtype,
    on_bad_sample: BadSamplePolicy,
    source: str,
    progress: Any,
) -> Iterator[tuple[int, Tensor, list[int], list[dict]]]:
    """(shard, tokens (m, n, d), image ids, skipped entries) of each shard in `todo`, as soon as
    its last batch is through the tower. One DataLoader serves every shard (a worker pool per shard
    would start a thousand pools on a large set); its batches never straddle two shards."""
    if not todo:
        return  # without starting any workers
    images = [image for _, planned in todo for image in planned]
    batches: list[list[int]] = []
    first = 0
    for _, planned in todo:
        for start in range(0, len(planned), batch_size):
            batches.append(list(range(first + start, first + min(start + batch_size, len(planned)))))
        first += len(planned)
    loader = DataLoader(
        _ImageFiles(images, transform), batch_sampler=batches, num_workers=num_workers, collate_fn=collate
    )
    stream = iter(loader)
    n, d = bridge.num_tokens, bridge.width
    for k, planned in todo:
        chunks: list[Tensor] = []
        ids: list[int] = []
        skipped: list[dict] = []
        done = 0
        while done < len(planned):
            batch = next(stream)
            for entry in batch["skipped"]:
                bad_sample(on_bad_sample, source=source, row=entry.row, path=entry.path, reason=entry.reason)
                skipped.append({"path": entry.path, "row": entry.row, "reason": entry.reason})
            if "pixel_values" in batch:
                tokens = bridge(batch["pixel_values"])  # (b, n, d), the bridge's compute dtype
                if dtype == torch.float16 and tokens.abs().max().item() > FLOAT16_MAX:
                    raise ValueError(
                        f"the tower's tokens reach {tokens.abs().max().item():.3g}, beyond float16's range: "
                        "write the cache with dtype=torch.bfloat16 or torch.float32."
                    )
                chunks.append(tokens.to("cpu", dtype))
                ids.extend(batch["image_id"].tolist())
            count = len(batch["image_id"]) + len(batch["skipped"])
            done += count
            progress.update(count)
        yield k, (torch.cat(chunks) if chunks else torch.empty(0, n, d, dtype=dtype)), ids, skipped


def write_feature_cache(
    bridge: VisionBridge,
    pairs: datasets.Dataset,
    out_dir: str | Path,
    *,
    batch_size: int = 32,
    shard_size: int = 1024,
    dtype: torch.dtype = torch.float16,
    num_workers: int = 0,
    on_bad_sample: BadSamplePolicy = "error",
    progress: bool = True,
) -> Path:
    """Tokens of every unique image (by image_id) of `pairs`, computed by `bridge` with its eval
    transform, written to `out_dir` as safetensors shards plus index.json. Shards already written
    by an earlier, interrupted call with the same bridge and images are kept (resume).

    A missing or unreadable image raises, naming the file and its row (`on_bad_sample="error"`),
    or is left out of the cache and listed under "skipped" in index.json (`"skip"`); datasets
    built on the cache then skip that image's pairs. Returns `out_dir`.
    """
    check_policy(on_bad_sample)
    problems = []
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if not (isinstance(value, int) and value >= 1):
            problems.append(f"{name}={value!r}: expected a positive int")
    if not (isinstance(num_workers, int) and num_workers >= 0):
        problems.append(f"num_workers={num_workers!r}: expected an int >= 0")
    if problems:
        raise ValueError("invalid feature cache settings:\n  - " + "\n  - ".join(problems))
    dtype_name = _dtype_name(dtype)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = unique_images(pairs)
    if not images:
        raise ValueError(f"{source_label(pairs)}: the pairs dataset is empty; there is nothing to cache.")
    source = source_label(pairs)
    token_shape = [bridge.num_tokens, bridge.width]
    header = {"bridge": bridge.spec, "image_size": bridge.image_size, "token_shape": token_shape, "dtype": dtype_name}
    plan = [images[start : start + shard_size] for start in range(0, len(images), shard_size)]

    # Finished shards first (cheap: their metadata), so the progress bar starts where it stands.
    fingerprints = [_fingerprint(header, planned) for planned in plan]
    contents: dict[int, tuple[list[int], list[dict]]] = {}  # shard -> (image ids, skipped entries)
    for k in range(len(plan)):
        done = _complete_shard(out / shard_name(k), fingerprints[k])
        if done is not None:
            contents[k] = done
    todo = [(k, planned) for k, planned in enumerate(plan) if k not in contents]
    if todo:
        # An index.json means "complete and consistent with the shards"; shards are about to change.
        (out / INDEX_NAME).unlink(missing_ok=True)
    initial = sum(len(plan[k]) for k in contents)
    bar = tqdm(total=len(images), initial=initial, unit="img", desc=f"caching features in {out}", disable=not progress)
    computed = _compute_shards(
        bridge, todo, transform=bridge.eval_transform(), batch_size=batch_size, num_workers=num_workers,
        dtype=dtype, on_bad_sample=on_bad_sample, source=source, progress=bar,
    )  # fmt: skip
    for k, tokens, ids, shard_skipped in computed:
        file = out / shard_name(k)
        metadata = {"format": FORMAT, "fingerprint": fingerprints[k], "skipped": json.dumps(shard_skipped)}
        tmp = file.with_name(file.name + ".tmp")
        save_file({"tokens": tokens.contiguous(), "image_id": torch.tensor(ids, dtype=torch.long)}, str(tmp), metadata)
        os.replace(tmp, file)  # atomic: a shard file is either complete or absent
        contents[k] = (ids, shard_skipped)
    bar.close()

    shards: list[dict[str, Any]] = []
    where: dict[str, list[int]] = {}
    paths: dict[str, str] = {}
    skipped: list[dict] = []
    path_of = {image.image_id: image.path for image in images}
    for k in range(len(plan)):
        ids, shard_skipped = contents[k]
        shards.append({"file": shard_name(k), "num_images": len(ids)})
        for offset, image_id in enumerate(ids):
            where[str(image_id)] = [k, offset]
            paths[str(image_id)] = path_of[image_id]
        skipped.extend(shard_skipped)

    index = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        **header,
        "num_images": len(where),
        "shard_size": shard_size,
        "shards": shards,
        "source": pairs_source(pairs) or {"source": source},
        "skipped": skipped,
        "images": where,  # str(image_id) -> [shard, offset]
        "paths": paths,  # str(image_id) -> image file, to check that pairs and cache agree
    }
    tmp = out / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index))
    os.replace(tmp, out / INDEX_NAME)  # written last: its presence means the cache is complete
    return out


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


class FeatureCache:
    """Tokens of a cache written by `write_feature_cache`. Shards are opened lazily and memory-mapped
    (`safetensors.safe_open`), so only the requested images are read from disk."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.dir = Path(cache_dir)
        index_file = self.dir / INDEX_NAME
        if not index_file.is_file():
            if any(self.dir.glob("shard-*.safetensors")):
                raise FileNotFoundError(
                    f"feature cache {self.dir} is incomplete (shards but no {INDEX_NAME}): the writer did not "
                    "finish. Run write_feature_cache / `qformer cache-features` again; it resumes."
                )
            raise FileNotFoundError(
                f"no feature cache at {self.dir} ({INDEX_NAME} not found): write it first with "
                "`qformer cache-features CONFIG` (write_feature_cache)."
            )
        self.index = json.loads(index_file.read_text())
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{index_file} is not a qformer feature cache index (format {self.index.get('format')!r}).")
        self._where = {int(key): (shard, offset) for key, (shard, offset) in self.index["images"].items()}
        self._paths = {int(key): path for key, path in self.index["paths"].items()}
        self._skipped = {entry["path"]: entry["reason"] for entry in self.index.get("skipped", [])}
        self._handles: dict[int, Any] = {}

    # ---- description --------------------------------------------------------------------------

    @property
    def spec(self) -> dict[str, Any]:
        """The vision bridge's spec (`VisionBridge.from_spec` rebuilds the tower)."""
        return self.index["bridge"]

    @property
    def num_images(self) -> int:
        return self.index["num_images"]

    @property
    def token_shape(self) -> tuple[int, int]:
        n, d = self.index["token_shape"]
        return n, d

    @property
    def num_tokens(self) -> int:
        """n, as `VisionBridge.num_tokens`."""
        return self.token_shape[0]

    @property
    def width(self) -> int:
        """d, the tower's width, as `VisionBridge.width` (the Q-Former's `vision_width`)."""
        return self.token_shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.index["dtype"]]

    @property
    def image_ids(self) -> list[int]:
        return list(self._where)

    def __len__(self) -> int:
        return self.num_images

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._where

    def path(self, image_id: int) -> str | None:
        """The image file the cached tokens of `image_id` come from."""
        return self._paths.get(image_id)

    def skip_reason(self, path: str) -> str | None:
        """Why the writer left out this image file (on_bad_sample="skip"), or None."""
        return self._skipped.get(path)

    # ---- tokens -------------------------------------------------------------------------------

    def tokens(self, image_ids: Sequence[int] | Tensor) -> Tensor:
        """Tokens (b, n, d) in the cache's dtype, in the order of `image_ids`."""
        ids = [int(i) for i in (image_ids.tolist() if isinstance(image_ids, Tensor) else image_ids)]
        missing = [i for i in ids if i not in self._where]
        if missing:
            listed = ", ".join(map(str, missing[:10])) + (f", ... ({len(missing)} in all)" if len(missing) > 10 else "")
            raise ValueError(
                f"image_id {listed} not in the feature cache {self.dir}. The cache holds the images of "
                f"{self.index['source'].get('source', 'its pairs')}; rebuild it for these pairs, or see "
                f"'skipped' in {INDEX_NAME} for images the writer left out."
            )
        n, d = self.token_shape
        out = torch.empty(len(ids), n, d, dtype=self.dtype)  # (b, n, d)
        for j, image_id in enumerate(ids):
            shard, offset = self._where[image_id]
            out[j] = self._tokens_of(shard)[offset]  # reads one image's bytes from the mapping
        return out

    def _tokens_of(self, shard: int) -> Any:
        if shard not in self._handles:
            file = self.dir / self.index["shards"][shard]["file"]
            if not file.is_file():
                raise FileNotFoundError(
                    f"feature cache {self.dir} is missing {file.name}; run write_feature_cache again to rewrite it."
                )
            handle = safe_open(str(file), framework="pt")
            self._handles[shard] = (handle, handle.get_slice("tokens"))  # the handle keeps the mapping open
        return self._handles[shard][1]

    def __getstate__(self) -> dict[str, Any]:
        # open safetensors handles do not pickle; DataLoader workers started by spawn reopen them
        return {**self.__dict__, "_handles": {}}


class CachedPairsDataset(torch.utils.data.Dataset):
    """Pairs -> samples {image_tokens (n, d), caption (cleaned), image_id, group_id, index, question}, the tokens read
    from a `FeatureCache`; the same conventions as `ImageTextDataset` (use `qformer.data.collate`),
    so a recipe switches between live and cached images by config.

    image_tokens stay in the cache's dtype (float16 by default); the model upcasts them before
    `ln_vision`, which it computes in float32.

    `check_paths`: refuse a cache whose image_id -> file map disagrees with the pairs (a cache
    written from another annotation file would silently give the wrong images). Pass False when
    only the image folder moved. Pairs whose image is not in the cache are bad samples: with
    on_bad_sample="error" they raise here already, not hours into training.
    """

    def __init__(
        self,
        pairs: datasets.Dataset,
        cache: FeatureCache,
        *,
        clean: bool = True,
        max_words: int = 50,
        on_bad_sample: BadSamplePolicy = "error",
        check_paths: bool = True,
    ) -> None:
        check_policy(on_bad_sample)
        self.pairs = pairs
        self.cache = cache
        self.clean = clean
        self.max_words = max_words
        self.on_bad_sample = on_bad_sample
        self.source = source_label(pairs)
        self._check_against_cache(check_paths)

    def _check_against_cache(self, check_paths: bool) -> None:
        images = unique_images(self.pairs)
        if check_paths:
            moved = [image for image in images if image.image_id in self.cache and self.cache.path(image.image_id) != image.path]
            if moved:
                lines = "\n".join(
                    f"  image_id {image.image_id}: {image.path} (row {image.row}) here, "
                    f"{self.cache.path(image.image_id)} in the cache"
                    for image in moved[:5]
                )
                raise ValueError(
                    f"the feature cache {self.cache.dir} was written from other pairs than {self.source} "
                    f"({len(moved)} images differ):\n{lines}\nRebuild the cache for these pairs, or pass "
                    "check_paths=False if only the image folder moved."
                )
        if self.on_bad_sample == "error":
            absent = [image for image in images if image.image_id not in self.cache]
            if absent:
                image = absent[0]
                bad_sample(
                    "error", source=self.source, row=image.row, path=image.path,
                    reason=self._absent_reason(image.image_id, image.path)
                    + f" ({len(absent)} of {len(images)} images are not in {self.cache.dir})",
                )  # fmt: skip

    def _absent_reason(self, image_id: int, path: str) -> str:
        why = self.cache.skip_reason(path)
        if why is not None:
            return f"image_id {image_id} was left out of the feature cache: {why}"
        return f"image_id {image_id} is not in the feature cache"

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedSample:
        record = self.pairs[int(index)]
        path, row, image_id = record["image"], int(record["row"]), int(record["image_id"])
        caption = usable_caption(record["caption"], clean=self.clean, max_words=self.max_words)
        if caption is None:
            return bad_sample(self.on_bad_sample, source=self.source, row=row, path=path,
                              reason=f"empty caption (raw: {record['caption']!r})")  # fmt: skip
        if image_id not in self.cache:
            return bad_sample(self.on_bad_sample, source=self.source, row=row, path=path,
                              reason=self._absent_reason(image_id, path))  # fmt: skip
        return {
            "image_tokens": self.cache.tokens([image_id])[0],  # (n, d)
            "caption": caption,
            "image_id": image_id,
            "group_id": group_id(record),
            "index": int(index),
            "question": record.get("question") or "",
        }

    @staticmethod
    def collate(batch: Sequence[Any]) -> dict[str, Any]:
        return collate(batch)

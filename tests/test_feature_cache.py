"""The feature cache against the live tower (tiny open_clip ViT), sharding, resume, cached datasets."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from bridges.vision import VisionBridge, load_image
from qformer.data import SkippedSample, collate, load_pairs
from qformer.feature_cache import CachedPairsDataset, FeatureCache, write_feature_cache
from tiny_models import save_open_clip_vit


@pytest.fixture(scope="module")
def bridge(tmp_path_factory):
    name, weights = save_open_clip_vit(tmp_path_factory.mktemp("vit"))
    return VisionBridge.from_open_clip(name, weights)


def make_pairs(folder, *, num_images=5, extra_records=()):
    """Two captions per image, interleaved, so unique images and pairs differ; sizes differ so
    that the eval transform's resize and crop do real work."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(num_images):
        Image.fromarray(rng.integers(0, 255, (30 + 3 * i, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    for copy in range(2):
        records += [{"image": f"{i}.png", "caption": f"image {i}, caption {copy}"} for i in range(num_images)]
    records += list(extra_records)
    (folder / "pairs.json").write_text(json.dumps(records))
    return load_pairs(folder / "pairs.json")


def live_tokens(bridge, paths):
    """The tower's tokens (b, n, d) of a batch of images, as the writer batches them (a CPU matmul
    may round differently for another batch size, which fp16 can turn into a one-ulp difference)."""
    transform = bridge.eval_transform()
    return bridge(torch.stack([transform(load_image(path)) for path in paths]))


def test_cached_tokens_equal_the_live_tower(bridge, tmp_path):
    pairs = make_pairs(tmp_path / "data")
    out = write_feature_cache(bridge, pairs, tmp_path / "cache", batch_size=2, shard_size=2, progress=False)
    cache = FeatureCache(out)
    n, d = bridge.num_tokens, bridge.width
    assert (cache.num_images, cache.token_shape, cache.dtype) == (5, (n, d), torch.float16)
    assert (cache.num_tokens, cache.width) == (n, d)
    assert cache.spec == bridge.spec and sorted(cache.image_ids) == [0, 1, 2, 3, 4]

    tokens = cache.tokens([3, 0, 3])
    assert tokens.shape == (3, n, d) and tokens.dtype == torch.float16
    live = torch.cat([live_tokens(bridge, [tmp_path / "data" / f"{i}.png" for i in batch]) for batch in ([0, 1], [2, 3], [4])])
    torch.testing.assert_close(tokens, live[[3, 0, 3]].half(), rtol=0, atol=0)  # the fp16 rounding of the live tokens
    torch.testing.assert_close(cache.tokens(range(5)).float(), live, rtol=0, atol=1e-2 * live.abs().max().item())

    # one entry per unique image, in shards of shard_size, each a (m, n, d) tokens + (m,) ids
    index = json.loads((out / "index.json").read_text())
    assert [s["num_images"] for s in index["shards"]] == [2, 2, 1]
    assert sorted(os.listdir(out)) == ["index.json", "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    assert index["images"]["4"] == [2, 0] and index["paths"]["4"] == str(tmp_path / "data" / "4.png")
    assert index["source"]["source"] == str(tmp_path / "data" / "pairs.json")


def test_resume_skips_complete_shards(bridge, tmp_path, monkeypatch):
    pairs = make_pairs(tmp_path / "data")
    out = write_feature_cache(bridge, pairs, tmp_path / "cache", batch_size=8, shard_size=2, progress=False)
    before = FeatureCache(out).tokens([0, 1, 2, 3, 4])
    stamps = {name: os.stat(out / name).st_mtime_ns for name in os.listdir(out)}
    # an interrupted run: the last shard and the index never got written, another shard is damaged
    (out / "shard-00002.safetensors").unlink()
    (out / "index.json").unlink()
    (out / "shard-00001.safetensors").write_bytes(b"half a shard")
    with pytest.raises(FileNotFoundError, match="incomplete.*it resumes"):
        FeatureCache(out)

    calls = []
    forward = bridge.forward
    monkeypatch.setattr(bridge, "forward", lambda pixels: calls.append(len(pixels)) or forward(pixels))
    write_feature_cache(bridge, pairs, out, batch_size=8, shard_size=2, progress=False)
    assert calls == [2, 1]  # only the images of the damaged and the missing shard went through the tower
    assert os.stat(out / "shard-00000.safetensors").st_mtime_ns == stamps["shard-00000.safetensors"]
    torch.testing.assert_close(FeatureCache(out).tokens([0, 1, 2, 3, 4]), before, rtol=0, atol=0)

    calls.clear()  # another dtype changes every shard's fingerprint: all are recomputed
    write_feature_cache(bridge, pairs, out, batch_size=8, shard_size=2, dtype=torch.float32, progress=False)
    assert calls == [2, 2, 1] and FeatureCache(out).dtype == torch.float32


def test_cached_pairs_dataset(bridge, tmp_path):
    pairs = make_pairs(tmp_path / "data")
    cache = FeatureCache(write_feature_cache(bridge, pairs, tmp_path / "cache", shard_size=3, progress=False))
    dataset = CachedPairsDataset(pairs, cache)
    assert len(dataset) == 10
    item = dataset[7]  # image 2, second caption
    assert item["caption"] == "image 2, caption 1" and item["image_id"] == 2 and item["index"] == 7
    live = live_tokens(bridge, [tmp_path / "data" / f"{i}.png" for i in range(3)])  # the first shard's batch
    torch.testing.assert_close(item["image_tokens"], live[2].half(), rtol=0, atol=0)
    batch = collate([dataset[i] for i in (0, 5, 9)])
    assert batch["image_tokens"].shape == (3, bridge.num_tokens, bridge.width)
    assert batch["image_id"].tolist() == [0, 0, 4] and batch["skipped"] == []


def test_bad_images_error_or_skip(bridge, tmp_path):
    extra = [{"image": "missing.png", "caption": "gone"}]
    pairs = make_pairs(tmp_path / "data", num_images=3, extra_records=extra)
    with pytest.raises(ValueError, match=r"pairs\.json, row 6, image .*missing\.png: image file not found"):
        write_feature_cache(bridge, pairs, tmp_path / "strict", progress=False)

    out = write_feature_cache(bridge, pairs, tmp_path / "lenient", on_bad_sample="skip", num_workers=2, batch_size=2, progress=False)
    cache = FeatureCache(out)
    assert cache.num_images == 3 and 3 not in cache
    assert json.loads((out / "index.json").read_text())["skipped"][0]["row"] == 6

    with pytest.raises(ValueError, match=r"row 6, image .*missing\.png: image_id 3 was left out of the feature cache: image file not found"):
        CachedPairsDataset(pairs, cache)  # raises when built, not hours into training
    dataset = CachedPairsDataset(pairs, cache, on_bad_sample="skip")
    assert dataset[6] == SkippedSample(str(tmp_path / "data" / "missing.png"), 6, "image_id 3 was left out of the feature cache: image file not found")
    assert len(collate([dataset[i] for i in range(7)])["image_id"]) == 6


def test_unknown_image_id_and_missing_cache(bridge, tmp_path):
    pairs = make_pairs(tmp_path / "data", num_images=2)
    cache = FeatureCache(write_feature_cache(bridge, pairs, tmp_path / "cache", progress=False))
    with pytest.raises(ValueError, match=r"image_id 17 not in the feature cache"):
        cache.tokens([0, 17])
    with pytest.raises(FileNotFoundError, match="no feature cache at .*cache-features"):
        FeatureCache(tmp_path / "nowhere")


def test_cache_from_other_pairs_is_refused(bridge, tmp_path):
    cache = FeatureCache(write_feature_cache(bridge, make_pairs(tmp_path / "a", num_images=2), tmp_path / "cache", progress=False))
    other = make_pairs(tmp_path / "b", num_images=2)  # same ids, other files
    with pytest.raises(ValueError, match=r"(?s)written from other pairs.*image_id 0: .*b/0\.png \(row 0\) here, .*a/0\.png in the cache"):
        CachedPairsDataset(other, cache)
    assert len(CachedPairsDataset(other, cache, check_paths=False)) == 4

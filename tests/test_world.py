"""ShapesWorld: determinism, captions that read back to their scene, the held-out split, noise,
question answers and pixels."""

import json
import random
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qformer.world import shapes as sw
from qformer.world.shapes import (
    COLOUR_RGB,
    COLOURS,
    DEFAULT_HOLDOUT,
    GRID,
    POSITIONS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    all_correct,
    attributes_correct,
    caption,
    generate_world,
    iter_lm_texts,
    load_split,
    parse_caption,
    relation_holds,
    sample_scene,
    templates,
)


@pytest.fixture(scope="module")
def simple_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("simple")
    world = generate_world(
        out, level="simple", n_train=2000, n_test=60, n_compositional=60, seed=1, noise_fraction=0.1
    )
    return out, world


@pytest.fixture(scope="module")
def full_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    world = generate_world(
        out, level="full", n_train=400, n_test=60, n_compositional=60, seed=2, noise_fraction=0.25
    )
    return out, world


def _scene(record) -> Scene:
    return Scene.from_json(record["scene"])


def _mutations(scene: Scene):
    """Scenes that differ from `scene` in exactly one attribute of one object."""
    free = next(p for p in POSITIONS if p not in {o.position for o in scene.objects})
    for i, obj in enumerate(scene.objects):
        others = [o for j, o in enumerate(scene.objects) if j != i]
        yield "shape", Scene((*others, replace(obj, shape=next(s for s in SHAPES if s != obj.shape))))
        yield "colour", Scene((*others, replace(obj, colour=next(c for c in COLOURS if c != obj.colour))))
        yield "size", Scene((*others, replace(obj, size=next(s for s in SIZES if s != obj.size))))
        yield "position", Scene((*others, replace(obj, position=free)))


# ----------------------------------------------------------------------------------------------


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path):
    kwargs = dict(level="full", n_train=30, n_test=8, n_compositional=8, noise_fraction=0.2)
    a = generate_world(tmp_path / "a", seed=5, **kwargs)
    b = generate_world(tmp_path / "b", seed=5, **kwargs)
    c = generate_world(tmp_path / "c", seed=6, **kwargs)
    assert a == b
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 30 + 8 + 8 + 4  # images, three splits and world.json
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (tmp_path / "a" / "train.json").read_text() != (tmp_path / "c" / "train.json").read_text()
    assert a["seed"] != c["seed"]
    same_images = sum(
        (tmp_path / "a" / f).read_bytes() == (tmp_path / "c" / f).read_bytes() for f in files if f.suffix == ".png"
    )
    assert same_images == 0


def test_scene_key_is_canonical():
    a, b = Obj("circle", "red", "small", "top left"), Obj("star", "blue", "large", "centre")
    assert Scene((a, b)) == Scene((b, a))
    assert Scene((a, b)).key() == Scene([b, a]).key()
    assert Scene((a,)).key() != Scene((Obj("circle", "red", "large", "top left"),)).key()
    assert Scene.from_json(Scene((a, b)).to_json()) == Scene((a, b))


@pytest.mark.parametrize("level", ["simple", "full"])
def test_every_template_reads_back_to_its_scene(level):
    rng = random.Random(0)
    for trial in range(60):
        scene = sample_scene(level, rng)
        for t in range(len(templates(level))):
            text = caption(scene, rng, level=level, template=t)
            assert all_correct(text, scene), (text, scene.key(), attributes_correct(text, scene))
            for attribute, other in _mutations(scene):
                result = attributes_correct(text, other)
                assert not all_correct(text, other), (text, other.key())
                assert not result[attribute], (attribute, text, other.key())


def test_full_relation_templates_state_true_relations():
    rng = random.Random(1)
    n_relations = 0
    relation_templates = range(len(sw.FULL_LIST_TEMPLATES), len(sw.FULL_TEMPLATES))
    for _ in range(200):
        scene = sample_scene("full", rng)
        for t in relation_templates:
            parsed = parse_caption(caption(scene, rng, level="full", template=t))
            assert len(parsed.relations) == (len(scene.objects) > 1)
            for s, rel, o in parsed.relations:
                assert relation_holds(rel, parsed.objects[s].position, parsed.objects[o].position)
                n_relations += 1
    assert n_relations > 200


def test_parser_reads_synonyms_and_catches_mistakes():
    scene = Scene((Obj("circle", "red", "large", "centre"), Obj("star", "blue", "small", "right")))
    assert all_correct("a big red circle in the middle and a little blue star on the right", scene)
    assert all_correct("on the right there is a small blue star, and in the center a large red circle", scene)
    assert all_correct("a large red circle in the centre is to the left of a small blue star on the right", scene)
    wrong_relation = attributes_correct(
        "a large red circle in the centre is right of a small blue star on the right", scene
    )
    assert not wrong_relation["relation"] and wrong_relation["position"] and wrong_relation["colour"]
    missing = attributes_correct("a large red circle in the centre", scene)
    assert not missing["count"] and missing["shape"] and missing["position"]
    nothing = attributes_correct("a picture of nothing", scene)
    assert not nothing["count"] and not nothing["shape"] and not nothing["position"]
    no_position = attributes_correct("a large red circle and a small blue star", scene)
    assert no_position["count"] and no_position["shape"] and not no_position["position"]
    swapped = attributes_correct("a large blue circle in the centre and a small red star on the right", scene)
    assert swapped["shape"] and swapped["size"] and swapped["position"] and not swapped["colour"]


def test_simple_world_varies_over_every_value(simple_world):
    out, world = simple_world
    train = load_split(out, "train")
    assert len(train) == 2000 and world["level"] == "simple"
    objects = [o for r in train for o in r["scene"]]
    assert len(objects) == len(train)
    for attribute, values in (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES), ("position", POSITIONS)):
        assert {o[attribute] for o in objects} == set(values), attribute
    assert len({r["caption"] for r in train}) > 1500  # captions vary even for equal scenes
    assert world["vocabulary"]["shapes"] == list(SHAPES)
    assert json.loads((out / "world.json").read_text()) == world


def test_full_world_objects_positions_relations(full_world):
    out, _ = full_world
    train = load_split(out, "train")
    counts = {len(r["scene"]) for r in train}
    assert counts == {1, 2, 3}
    n_relations = 0
    for r in train:
        positions = [o["position"] for o in r["scene"]]
        assert len(set(positions)) == len(positions)
        assert r["scene_key"] == _scene(r).key()
        if not r["noisy"]:
            assert all_correct(r["caption"], _scene(r)), r
            n_relations += len(parse_caption(r["caption"]).relations)
    assert n_relations > 30
    for r in load_split(out, "test"):
        assert isinstance(r["caption"], list) and len(r["caption"]) == 5 and len(set(r["caption"])) == 5
        assert all(all_correct(c, _scene(r)) for c in r["caption"]), r


@pytest.mark.parametrize("which", ["simple_world", "full_world"])
def test_compositional_split_holds_out_pairs(which, request):
    out, world = request.getfixturevalue(which)
    assert {tuple(p) for p in world["holdout"]} == DEFAULT_HOLDOUT
    held = [f"{c} {s}" for c, s in DEFAULT_HOLDOUT]
    for split in ("train", "test"):
        for r in load_split(out, split):
            assert not {(o["colour"], o["shape"]) for o in r["scene"]} & DEFAULT_HOLDOUT
            texts = [r["caption"]] if isinstance(r["caption"], str) else r["caption"]
            for text in texts + [q["question"] for q in r["qa"]]:
                stated = {(m.colour, m.shape) for m in parse_caption(text).objects}
                assert not stated & DEFAULT_HOLDOUT, text
                assert not any(h in text for h in held), text
    comp = load_split(out, "compositional_test")
    assert len(comp) == 60
    for r in comp:
        assert {(o["colour"], o["shape"]) for o in r["scene"]} & DEFAULT_HOLDOUT
        assert all(all_correct(c, _scene(r)) for c in r["caption"])


def test_custom_holdout(tmp_path):
    holdout = {("red", "circle")}
    world = generate_world(tmp_path, n_train=300, n_test=0, n_compositional=20, holdout=holdout)
    assert world["holdout"] == [["red", "circle"]]
    assert all(
        r["scene"][0]["colour"] != "red" or r["scene"][0]["shape"] != "circle"
        for r in load_split(tmp_path, "train")
    )
    assert all(
        r["scene"][0]["colour"] == "red" and r["scene"][0]["shape"] == "circle"
        for r in load_split(tmp_path, "compositional_test")
    )


@pytest.mark.parametrize("which,fraction", [("simple_world", 0.1), ("full_world", 0.25)])
def test_noisy_captions_describe_another_scene(which, fraction, request):
    out, world = request.getfixturevalue(which)
    train = load_split(out, "train")
    noisy = [r for r in train if r["noisy"]]
    assert len(noisy) == round(fraction * len(train)) == world["n_noisy"]
    for r in noisy:
        assert not all_correct(r["caption"], _scene(r)), r
        stated = parse_caption(r["caption"]).objects
        assert stated and all(None not in (m.size, m.colour, m.shape, m.position) for m in stated)
    for split in ("test", "compositional_test"):
        assert not any(r["noisy"] for r in load_split(out, split))


@pytest.mark.parametrize("level", ["simple", "full"])
def test_twins_differ_in_exactly_one_shape(tmp_path, level):
    world = generate_world(tmp_path, level=level, n_train=60, n_test=4, n_compositional=0, seed=3, twins=True)
    assert world["twins"] is True
    train = load_split(tmp_path, "train")
    for first, second in zip(train[0::2], train[1::2]):
        a, b = _scene(first), _scene(second)
        assert [(o.colour, o.size, o.position) for o in a.objects] == [(o.colour, o.size, o.position) for o in b.objects]
        assert sum(x.shape != y.shape for x, y in zip(a.objects, b.objects)) == 1, (a.key(), b.key())
        assert not {(o.colour, o.shape) for o in b.objects} & DEFAULT_HOLDOUT
        assert all_correct(first["caption"], a) and all_correct(second["caption"], b)
        assert (tmp_path / first["image"]).read_bytes() != (tmp_path / second["image"]).read_bytes()
    # the pairs are independent draws, and the test split is the one a world without twins has
    assert len({r["scene_key"] for r in train[0::2]}) > 25
    plain = generate_world(tmp_path / "plain", level=level, n_train=2, n_test=4, n_compositional=0, seed=3)
    assert load_split(tmp_path, "test") == load_split(tmp_path / "plain", "test") and plain["twins"] is False


def test_shape_twin_refuses_a_scene_with_no_allowed_change():
    scene = Scene((Obj("circle", "red", "small", "centre"),))
    every_other = frozenset(("red", s) for s in SHAPES if s != "circle")
    with pytest.raises(ValueError, match="held-out"):
        sw.shape_twin(scene, random.Random(0), holdout=every_other)
    assert sw.shape_twin(scene, random.Random(0), holdout=every_other - {("red", "star")}).objects[0].shape == "star"


def test_generate_world_reports_every_bad_setting(tmp_path):
    with pytest.raises(ValueError) as info:
        generate_world(tmp_path, level="hard", n_train=-1, noise_fraction=1.5, holdout={("pink", "star")})
    message = str(info.value)
    for name in ("`level`", "`n_train`", "`noise_fraction`", "`holdout`"):
        assert name in message
    with pytest.raises(ValueError) as info:
        generate_world(tmp_path, n_train=7, twins=True)
    message = str(info.value)
    for name in ("`twins`", "`n_train`", "even"):
        assert name in message


# ----------------------------------------------------------------------------------------------
# questions and answers, checked against the scene by reading the question independently


_SIZE_WORDS = {"small": "small", "little": "small", "large": "large", "big": "large"}


def _stated(question: str) -> dict[str, str]:
    q = question.replace("small or large", "")
    stated = {}
    for p in sorted(POSITIONS, key=len, reverse=True):
        if re.search(rf"\b{p}\b", q):
            stated["position"] = p
            q = re.sub(rf"\b{p}\b", "", q)
            break
    if re.search(r"\b(middle|center)\b", q):
        stated["position"] = "centre"
    for w in re.findall(r"[a-z]+", q):
        if w in _SIZE_WORDS:
            stated["size"] = _SIZE_WORDS[w]
        elif w in COLOURS:
            stated["colour"] = w
        elif w in SHAPES:
            stated["shape"] = w
    return stated


@pytest.mark.parametrize("which", ["simple_world", "full_world"])
def test_answers_are_right_for_the_scene(which, request):
    out, _ = request.getfixturevalue(which)
    types = set()
    for split in ("train", "compositional_test"):
        for r in load_split(out, split):
            scene = r["scene"]
            for qa in r["qa"]:
                kind, answer, stated = qa["type"], qa["answer"], _stated(qa["question"])
                types.add(kind)
                if kind == "count":
                    assert answer == ["one", "two", "three"][len(scene) - 1]
                    continue
                if kind == "exists":
                    present = any(o["colour"] == stated["colour"] and o["shape"] == stated["shape"] for o in scene)
                    assert answer == ("yes" if present else "no"), (qa, scene)
                    continue
                assert kind not in stated, qa  # the question does not give its answer away
                fits = [o for o in scene if all(o[a] == v for a, v in stated.items())]
                assert len(fits) == 1, (qa, scene)
                assert answer == fits[0][kind], (qa, scene)
    assert types == {"count", "colour", "shape", "size", "position", "exists"}


# ----------------------------------------------------------------------------------------------
# pixels


def _nearest_colour(pixel) -> str:
    return min(COLOURS, key=lambda c: sum((int(p) - q) ** 2 for p, q in zip(pixel, COLOUR_RGB[c])))


@pytest.mark.parametrize("which", ["simple_world", "full_world"])
def test_images_show_each_large_object_in_its_colour_at_its_cell(which, request):
    out, world = request.getfixturevalue(which)
    size = world["image_size"]
    checked = 0
    for r in load_split(out, "train")[:300]:
        image = Image.open(out / r["image"])
        assert image.mode == "RGB" and image.size == (size, size)
        pixels = np.asarray(image)
        for o in r["scene"]:
            if o["size"] != "large":
                continue
            row, col = GRID[o["position"]]
            y, x = int((row + 0.5) * size / 3), int((col + 0.5) * size / 3)
            assert _nearest_colour(pixels[y, x]) == o["colour"], (r["image"], o)
            assert np.abs(pixels[y, x].astype(int) - COLOUR_RGB[o["colour"]]).max() <= 16
            checked += 1
        if all(o["position"] != "top left" for o in r["scene"]):
            corner = pixels[1, 1].astype(int)
            assert corner.max() - corner.min() < 50 and corner.min() > 140, corner  # light grey
    assert checked > 50


def test_render_other_sizes():
    scene = Scene((Obj("square", "green", "large", "bottom right"),))
    for size in (32, 96, 224):
        pixels = np.asarray(sw.render(scene, random.Random(0), size))
        assert pixels.shape == (size, size, 3)
        assert _nearest_colour(pixels[int(2.5 * size / 3), int(2.5 * size / 3)]) == "green"


# ----------------------------------------------------------------------------------------------


def test_lm_texts_are_deterministic_and_hold_out_pairs():
    texts = list(iter_lm_texts("full", seed=3, n=400))
    assert texts == list(iter_lm_texts("full", seed=3, n=400))
    assert texts != list(iter_lm_texts("full", seed=4, n=400))
    pattern = re.compile(r"^scene : [a-z ,]+ \. (caption : .+|question : .+\? answer : [a-z ]+)$")
    kinds = set()
    for text in texts:
        assert pattern.match(text), text
        kinds.add(text.split(" . ")[1].split(" :")[0])
        context = text.split(" . ")[0].removeprefix("scene : ")
        for chunk in context.split(" , "):
            words = set(chunk.split())
            assert not any({c, s} <= words for c, s in DEFAULT_HOLDOUT), text
        if " . caption : " in text:
            stated = {(m.colour, m.shape) for m in parse_caption(text.split(" . caption : ")[1]).objects}
            assert not stated & DEFAULT_HOLDOUT
    assert kinds == {"caption", "question"}


def test_exists_weight_raises_the_share_of_exists_questions():
    def exists_share(weight: float) -> float:
        questions = [t for t in iter_lm_texts("simple", seed=0, n=3000, exists_weight=weight) if " . question : " in t]
        return sum(t.split(" . question : ")[1].startswith("is there") for t in questions) / len(questions)

    # a one-object scene has six questions (count, four attributes, exists): 1/6 of them, or 4/9 at weight 4
    assert exists_share(1.0) == pytest.approx(1 / 6, abs=0.03)
    assert exists_share(4.0) == pytest.approx(4 / 9, abs=0.04)


def test_lm_corpus_file(tmp_path: Path):
    path = sw.write_text_corpus(tmp_path / "lm.txt", level="simple", seed=0, n=50)
    lines = path.read_text().splitlines()
    assert lines == list(iter_lm_texts("simple", seed=0, n=50))

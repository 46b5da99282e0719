"""ShapesWorld: a procedural image-text world in which BLIP-2 trains end to end in minutes on a CPU.

A scene is one to three coloured shapes on a 3x3 grid of positions. From a scene we draw a small
RGB image (PIL polygons on a tinted, shaded grey background, with jitter of place, size, rotation
and colour so that no two images of a scene are alike), write captions from varied templates, and ask
question-answer pairs about colour, shape, size, position, count and existence.

Two levels:
  `simple`: exactly one object; a caption names its size, colour, shape and position.
  `full`:   one to three objects at distinct positions; a caption names every object with its
            size, colour, shape and position, and some templates add a relation between two of
            them ("... is to the left of ..."), always true of the positions it names.

Because every caption names every attribute of the scene, `all_correct(caption, scene)` can check
that a generated caption got the whole scene right, and two items "describe the same scene" exactly
when their `Scene.key()` is equal: that is the retrieval hit, since many images fit one caption.

Compositional split: `holdout` (colour, shape) pairs, by default every purple star and every orange
triangle, never appear in `train` or `test`, nor in any training caption, question, noisy caption
or language-model text; `compositional_test` holds only scenes with at least one of them. Purple
things and stars are both common in training, so scores there measure composition, not memory.

Everything is a pure function of the seed: each item draws from its own `random.Random` seeded by
"{seed}/{split}/{index}", so files are identical byte for byte from run to run.

    python -m qformer.world.shapes /tmp/shapes --level simple --n-train 5000
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------------------------
# Vocabulary

# Six shapes that stay distinct at 64x64 even when small (a hexagon or pentagon does not: at 10
# pixels across it reads as a circle).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
# Saturated colours, far from each other and from the grey background.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 45, 45),
    "green": (45, 160, 65),
    "blue": (45, 85, 215),
    "yellow": (235, 205, 40),
    "purple": (135, 60, 185),
    "orange": (240, 135, 35),
}
COLOURS: tuple[str, ...] = tuple(COLOUR_RGB)
SIZES: tuple[str, ...] = ("small", "large")
# Row-major 3x3 grid; `GRID[name]` is (row, col), row 0 at the top.
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "centre", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
GRID: dict[str, tuple[int, int]] = {p: divmod(i, 3) for i, p in enumerate(POSITIONS)}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
LEVELS: tuple[str, ...] = ("simple", "full")
SPLITS: tuple[str, ...] = ("train", "test", "compositional_test")
COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three")

DEFAULT_HOLDOUT: frozenset[tuple[str, str]] = frozenset({("purple", "star"), ("orange", "triangle")})

Level = Literal["simple", "full"]


# ----------------------------------------------------------------------------------------------
# Scenes


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    """One to three objects; positions are distinct. Objects are kept in canonical order (grid
    order of their positions), so two equal scenes compare equal and have the same key."""

    objects: tuple[Obj, ...]

    def __post_init__(self) -> None:
        objects = tuple(sorted(self.objects, key=lambda o: POSITIONS.index(o.position)))
        object.__setattr__(self, "objects", objects)
        assert len({o.position for o in objects}) == len(objects), "positions must be distinct"

    def key(self) -> str:
        """Canonical description: equal keys <=> same objects with the same attributes, i.e. the
        same scene. A retrieval hit is any item with the query's key."""
        return " | ".join(f"{o.size} {o.colour} {o.shape} @ {o.position}" for o in self.objects)

    def to_json(self) -> list[dict[str, str]]:
        return [
            {"shape": o.shape, "colour": o.colour, "size": o.size, "position": o.position} for o in self.objects
        ]

    @classmethod
    def from_json(cls, objects: Iterable[dict[str, str]]) -> Scene:
        return cls(tuple(Obj(**o) for o in objects))


def relation_holds(relation: str, a: str, b: str) -> bool:
    """Whether the object at position `a` is `relation` the object at position `b`."""
    (ra, ca), (rb, cb) = GRID[a], GRID[b]
    return {"left of": ca < cb, "right of": ca > cb, "above": ra < rb, "below": ra > rb}[relation]


def _sample_obj(rng: random.Random, position: str, holdout: frozenset[tuple[str, str]]) -> Obj:
    while True:  # rejection: the held-out pairs are a small fraction of colour x shape
        colour, shape = rng.choice(COLOURS), rng.choice(SHAPES)
        if (colour, shape) not in holdout:
            return Obj(shape, colour, rng.choice(SIZES), position)


def sample_scene(
    level: Level,
    rng: random.Random,
    *,
    holdout: frozenset[tuple[str, str]] = DEFAULT_HOLDOUT,
    compositional: bool = False,
) -> Scene:
    """A random scene. `compositional=False`: no object has a held-out (colour, shape) pair.
    `compositional=True`: one object has a held-out pair; the others are free (held-out or not)."""
    n = 1 if level == "simple" else rng.randint(1, 3)
    positions = rng.sample(POSITIONS, n)
    if not compositional:
        return Scene(tuple(_sample_obj(rng, p, holdout) for p in positions))
    colour, shape = rng.choice(sorted(holdout))
    forced = Obj(shape, colour, rng.choice(SIZES), positions[0])
    return Scene((forced, *(_sample_obj(rng, p, frozenset()) for p in positions[1:])))


# ----------------------------------------------------------------------------------------------
# Rendering

# Unit outlines (radius 1, y down), drawn at radius r around the jittered centre of the cell.
# Each contains a disc of radius >= 0.3 around the origin, so the centre of a large object's cell
# always shows the object's colour (the jitter of a large object is < 0.05 of a cell).
_STAR = [
    ((1.0 if k % 2 == 0 else 0.45) * math.cos(math.pi * (k / 5 - 0.5)),
     (1.0 if k % 2 == 0 else 0.45) * math.sin(math.pi * (k / 5 - 0.5)))
    for k in range(10)
]  # fmt: skip
_W = 0.32  # half-width of a cross's arm
_OUTLINES: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)],
    # pointing up, its bounding box centred on the origin
    "triangle": [(0.0, -0.85), (0.95, 0.8), (-0.95, 0.8)],
    "star": _STAR,
    "cross": [
        (-_W, -0.95),
        (_W, -0.95),
        (_W, -_W),
        (0.95, -_W),
        (0.95, _W),
        (_W, _W),
        (_W, 0.95),
        (-_W, 0.95),
        (-_W, _W),
        (-0.95, _W),
        (-0.95, -_W),
        (-_W, -_W),
    ],  # fmt: skip
    # narrower than tall, so that a slightly rotated square never looks like one
    "diamond": [(0.0, -1.0), (0.68, 0.0), (0.0, 1.0), (-0.68, 0.0)],
}
_RADIUS = {"small": 0.27, "large": 0.42}  # in cells (a third of the image)


def render(scene: Scene, rng: random.Random, image_size: int = 64) -> Image.Image:
    """Draw `scene` as an RGB image of `image_size` x `image_size` pixels."""
    # Background: a grey with a per-image tint and a gentle linear shading in a random direction.
    # No per-pixel noise: it would make each PNG twenty times larger (8 KB instead of 0.4 KB at
    # 64x64) and three times slower to write, for variety the jitter below already gives.
    grey = rng.uniform(180, 220)
    tint = np.array([grey + rng.uniform(-10, 10) for _ in range(3)])
    ramp = np.linspace(-0.5, 0.5, image_size)
    shade = rng.uniform(-16, 16) * ramp[None, :] + rng.uniform(-16, 16) * ramp[:, None]  # (y, x)
    background = np.clip(np.rint(tint[None, None, :] + shade[:, :, None]), 0, 255).astype(np.uint8)
    image = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(image)
    cell = image_size / 3
    for obj in scene.objects:
        row, col = GRID[obj.position]
        r = _RADIUS[obj.size] * cell * rng.uniform(0.94, 1.06)
        slack = max(0.04 * cell, 0.5 * cell - 1.06 * r)  # keep the shape (mostly) inside its cell
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
        colour = tuple(max(0, min(255, c + rng.randint(-12, 12))) for c in COLOUR_RGB[obj.colour])
        if obj.shape == "circle":
            rc = 0.9 * r
            draw.ellipse((cx - rc, cy - rc, cx + rc, cy + rc), fill=colour)
            continue
        angle = math.radians(rng.uniform(-12, 12))
        cos, sin = math.cos(angle), math.sin(angle)
        points = [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in _OUTLINES[obj.shape]]
        draw.polygon(points, fill=colour)
    return image


# ----------------------------------------------------------------------------------------------
# Captions

# Words a caption may use for each value; the first is the canonical one. `parse_caption` reads
# all of them, so a model that says "big" for "large" is not penalised.
_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}


def _where(position: str, rng: random.Random) -> str:
    """A prepositional phrase for a position: 'in the top left corner', 'on the left', ..."""
    if position == "centre":
        return rng.choice(("in the centre", "in the middle", "at the centre"))
    if " " in position:  # a corner
        return rng.choice((f"in the {position}", f"at the {position}", f"in the {position} corner"))
    if position in ("top", "bottom"):
        return rng.choice((f"at the {position}", f"along the {position}"))
    return rng.choice((f"on the {position}", f"on the {position} side"))


def _np(obj: Obj, rng: random.Random) -> str:
    return f"a {rng.choice(_SIZE_WORDS[obj.size])} {obj.colour} {obj.shape}"


def _relation_words(relation: str, rng: random.Random) -> str:
    if relation in ("left of", "right of"):
        return rng.choice((f"to the {relation}", relation))
    return relation


# Templates for one object: {o} its noun phrase, {w} its position phrase.
SIMPLE_TEMPLATES: tuple[str, ...] = (
    "{o} {w}",
    "there is {o} {w}",
    "{w} there is {o}",
    "a picture of {o} {w}",
    "{o} is {w}",
    "an image with {o} {w}",
)
# Templates for a whole `full` scene: {list} every object with its position, {count} their number.
FULL_LIST_TEMPLATES: tuple[str, ...] = (
    "{list}",
    "there is {list}",
    "a picture of {list}",
    "{count}: {list}",
)
# Relation templates (two or more objects): {a} relation {b}, then {rest} for a third object.
FULL_RELATION_TEMPLATES: tuple[str, ...] = (
    "{a} is {rel} {b}{rest}",
    "{a}, {rel} {b}{rest}",
)
FULL_TEMPLATES: tuple[str, ...] = FULL_LIST_TEMPLATES + FULL_RELATION_TEMPLATES


def templates(level: Level) -> tuple[str, ...]:
    return SIMPLE_TEMPLATES if level == "simple" else FULL_TEMPLATES


def caption(scene: Scene, rng: random.Random, *, level: Level, template: int | None = None) -> str:
    """One caption of `scene` that names every object's size, colour, shape and position.

    `template` indexes `templates(level)`; None picks one at random. A one-object scene has no
    relation to state, so a relation template falls back to a list template for it."""
    if level == "simple":
        if len(scene.objects) != 1:
            raise ValueError(f"level 'simple' captions one object, the scene has {len(scene.objects)}")
        t = SIMPLE_TEMPLATES[rng.randrange(len(SIMPLE_TEMPLATES)) if template is None else template]
        (obj,) = scene.objects
        return t.format(o=_np(obj, rng), w=_where(obj.position, rng))

    objs = list(scene.objects)
    rng.shuffle(objs)  # mention order carries no meaning
    n_list = len(FULL_LIST_TEMPLATES)
    if template is None:
        template = rng.randrange(n_list if len(objs) == 1 else len(FULL_TEMPLATES))
    elif len(objs) == 1 and template >= n_list:
        template %= n_list
    t = FULL_TEMPLATES[template]
    phrases = [f"{_np(o, rng)} {_where(o.position, rng)}" for o in objs]
    if template < n_list:
        listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        count = "one shape" if len(objs) == 1 else f"{COUNT_WORDS[len(objs)]} shapes"
        return t.format(list=listed, count=count)
    a, b = objs[0], objs[1]
    relation = rng.choice([r for r in RELATIONS if relation_holds(r, a.position, b.position)])
    rest = "".join(f", and {p}" for p in phrases[2:])
    return t.format(a=phrases[0], rel=_relation_words(relation, rng), b=phrases[1], rest=rest)


def reference_captions(scene: Scene, rng: random.Random, *, level: Level, k: int = 5) -> list[str]:
    """`k` distinct captions of `scene`, cycling through the templates in a random order, as the
    references of captioning metrics (CIDEr, BLEU). Fewer than `k` if the scene has fewer."""
    order = list(range(len(templates(level))))
    rng.shuffle(order)
    refs: list[str] = []
    for attempt in range(20 * k):
        text = caption(scene, rng, level=level, template=order[attempt % len(order)])
        if text not in refs:
            refs.append(text)
            if len(refs) == k:
                break
    return refs


# ----------------------------------------------------------------------------------------------
# Reading captions back


@dataclass
class Mention:
    """An object as a caption states it; None where the caption does not say."""

    size: str | None = None
    colour: str | None = None
    shape: str | None = None
    position: str | None = None


@dataclass
class ParsedCaption:
    objects: list[Mention]
    # (subject index, relation, object index) into `objects`; an index is None where the caption
    # states a relation without an object on that side.
    relations: list[tuple[int | None, str, int | None]]


_WORD_VALUE: dict[str, tuple[str, str]] = {
    **{w: ("size", size) for size, words in _SIZE_WORDS.items() for w in words},
    **{c: ("colour", c) for c in COLOURS},
    **{s: ("shape", s) for s in SHAPES},
}
_SINGLE_POSITIONS = {"top": "top", "bottom": "bottom", "left": "left", "right": "right",
                     "centre": "centre", "center": "centre", "middle": "centre"}  # fmt: skip


def parse_caption(text: str) -> ParsedCaption:
    """The objects and relations a caption states, whatever the template.

    Reads left to right. Size and colour words attach to the next shape word, which closes an
    object. A position attaches to the object just closed if that one has none yet (as in "a red
    circle in the top left"), otherwise to the next object ("in the top left there is a red
    circle"). "left of", "right of", "above", "below" relate the object just closed to the next.
    Other words are ignored."""
    words = re.findall(r"[a-z]+", text.lower())
    objects: list[Mention] = []
    relations: list[tuple[int | None, str, int | None]] = []
    pending = Mention()  # attributes stated before the shape word that closes the object
    pending_relation: tuple[int | None, str] | None = None
    i = 0
    while i < len(words):
        w, nxt, after = (words[i : i + 3] + ["", ""])[:3]
        i += 1
        position = None
        # "along the top, right of a ..." is "top" then a relation, not "top right"
        if w in ("top", "bottom") and nxt in ("left", "right") and after != "of":
            position, i = f"{w} {nxt}", i + 1
        elif w in ("left", "right") and nxt == "of":
            pending_relation, i = (len(objects) - 1 if objects else None, f"{w} of"), i + 1
        elif w in ("above", "below"):
            pending_relation = (len(objects) - 1 if objects else None, w)
        elif w in _SINGLE_POSITIONS:
            position = _SINGLE_POSITIONS[w]
        elif w in _WORD_VALUE:
            attribute, value = _WORD_VALUE[w]
            setattr(pending, attribute, value)
            if attribute == "shape":
                objects.append(pending)
                pending = Mention()
                if pending_relation is not None:
                    relations.append((*pending_relation, len(objects) - 1))
                    pending_relation = None
        if position is not None:
            last = objects[-1] if objects else None
            opening_next = pending != Mention() or pending_relation is not None
            if last is not None and last.position is None and not opening_next:
                last.position = position
            else:
                pending.position = position
    if pending_relation is not None:
        relations.append((*pending_relation, None))
    return ParsedCaption(objects, relations)


_ATTRIBUTES = ("shape", "colour", "size", "position")


def attributes_correct(caption: str | ParsedCaption, scene: Scene) -> dict[str, bool]:
    """Which parts of the scene a caption gets right: `count` (as many objects as the scene),
    `shape`, `colour`, `size`, `position` (every stated object, matched one to one to the scene's
    objects in the way that agrees on the most attributes, has the scene object's value; false
    when the caption states no object) and `relation` (every stated relation holds between the
    matched scene objects; true when none is stated)."""
    parsed = parse_caption(caption) if isinstance(caption, str) else caption
    mentions = parsed.objects[:6]  # a babbling caption is wrong anyway; keep matching cheap
    truth = scene.objects
    k = min(len(mentions), len(truth))
    best: dict[int, int] = {}
    best_score = -1
    for chosen in itertools.combinations(range(len(mentions)), k):
        for targets in itertools.permutations(range(len(truth)), k):
            score = sum(
                getattr(mentions[m], a) == getattr(truth[t], a)
                for m, t in zip(chosen, targets)
                for a in _ATTRIBUTES
            )
            if score > best_score:
                best, best_score = dict(zip(chosen, targets)), score
    result = {"count": len(parsed.objects) == len(truth)}
    for a in _ATTRIBUTES:
        result[a] = bool(best) and all(getattr(mentions[m], a) == getattr(truth[t], a) for m, t in best.items())
    result["relation"] = all(
        s in best and o in best and relation_holds(rel, truth[best[s]].position, truth[best[o]].position)
        for s, rel, o in parsed.relations
    )
    return result


def all_correct(caption: str | ParsedCaption, scene: Scene) -> bool:
    """Whether a caption states exactly the scene: every object with every attribute right, no
    object too many or too few, and every relation true."""
    return all(attributes_correct(caption, scene).values())


# ----------------------------------------------------------------------------------------------
# Questions and answers

# Ways to single out one object. A question uses one at random among those that fit exactly one
# object of the scene and do not name the attribute it asks for.
_REFERENCES: tuple[tuple[str, ...], ...] = (
    ("shape",), ("colour",), ("size",), ("colour", "shape"), ("size", "shape"), ("size", "colour"),
    ("size", "colour", "shape"), ("position",),
)  # fmt: skip
_QUESTIONS: dict[str, tuple[str, ...]] = {
    "colour": ("what colour is {np}?", "what is the colour of {np}?"),
    "shape": ("what shape is {np}?", "which shape is {np}?"),
    "size": ("what size is {np}?", "is {np} small or large?"),
    "position": ("where is {np}?", "where in the image is {np}?"),
    "count": ("how many objects are there?", "how many shapes are in the image?", "how many shapes are there?"),
    "exists": ("is there {a} {colour} {shape}?", "is there {a} {colour} {shape} in the image?"),
}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _referring_phrase(obj: Obj, reference: tuple[str, ...], rng: random.Random) -> str:
    words = ["the"]
    if "size" in reference:
        words.append(obj.size)
    if "colour" in reference:
        words.append(obj.colour)
    words.append(obj.shape if "shape" in reference else "object")
    if "position" in reference:
        words.append(_where(obj.position, rng))
    return " ".join(words)


def make_qa(
    scene: Scene, rng: random.Random, *, avoid: frozenset[tuple[str, str]] = DEFAULT_HOLDOUT
) -> list[dict[str, str]]:
    """Questions with one-word (or position-name) answers: the count; for every object its
    colour, shape, size and position, each asked through a phrase that picks out that object alone;
    and one yes/no question on a (colour, shape) pair. A "no" question never names a pair in
    `avoid`, so training questions do not mention held-out pairs."""

    def ask(kind: str, answer: str, **slots: str) -> dict[str, str]:
        return {"question": rng.choice(_QUESTIONS[kind]).format(**slots), "answer": answer, "type": kind}

    def described(obj: Obj, reference: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(getattr(obj, a) for a in reference)

    # how many objects each description fits: a description that fits one object refers to it
    fits = {ref: Counter(described(o, ref) for o in scene.objects) for ref in _REFERENCES}
    qa = [ask("count", COUNT_WORDS[len(scene.objects)])]
    for obj in scene.objects:
        for attribute in _ATTRIBUTES:
            usable = [ref for ref in _REFERENCES if attribute not in ref and fits[ref][described(obj, ref)] == 1]
            if usable:
                np_ = _referring_phrase(obj, rng.choice(usable), rng)
                qa.append(ask(attribute, getattr(obj, attribute), np=np_))
    present = {(o.colour, o.shape) for o in scene.objects}
    if rng.random() < 0.5:
        colour, shape = rng.choice(sorted(present))
        qa.append(ask("exists", "yes", a=_article(colour), colour=colour, shape=shape))
    else:
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present and (c, s) not in avoid]
        colour, shape = rng.choice(absent)
        qa.append(ask("exists", "no", a=_article(colour), colour=colour, shape=shape))
    return qa


# ----------------------------------------------------------------------------------------------
# Writing a world to disk


def _holdout_problems(holdout: frozenset[tuple[str, str]]) -> list[str]:
    p = []
    for pair in sorted(holdout):
        if len(pair) != 2 or pair[0] not in COLOURS or pair[1] not in SHAPES:
            p.append(f"`holdout` pair {pair!r} must be (colour, shape), colour in {COLOURS}, shape in {SHAPES}")
    if len(holdout) >= len(COLOURS) * len(SHAPES):
        p.append("`holdout` holds out every (colour, shape) pair; leave some for training")
    return p


def shape_twin(scene: Scene, rng: random.Random, *, holdout: frozenset[tuple[str, str]] = DEFAULT_HOLDOUT) -> Scene:
    """`scene` with one object's shape changed to another, all else kept: the hard negative a
    contrastive batch needs for the model to learn shape, the attribute hardest to see at 64x64
    (a small object spans 11 pixels). The new (colour, shape) pair is never a held-out one."""
    objects = list(scene.objects)
    for i in rng.sample(range(len(objects)), len(objects)):
        o = objects[i]
        others = [s for s in SHAPES if s != o.shape and (o.colour, s) not in holdout]
        if others:
            objects[i] = Obj(rng.choice(others), o.colour, o.size, o.position)
            return Scene(tuple(objects))
    raise ValueError(f"no object of {scene.key()!r} can change its shape without a held-out pair")


def _make_item(
    split: str, index: int, *, level: Level, seed: int, image_size: int, holdout: frozenset[tuple[str, str]],
    noisy: bool, n_references: int, twins: bool = False,
) -> tuple[dict[str, Any], Image.Image]:  # fmt: skip
    if twins and split == "train":  # items 2k and 2k + 1: one scene and its shape twin, each drawn afresh
        scene = sample_scene(level, random.Random(f"{seed}/{split}/{index - index % 2}/scene"), holdout=holdout)
        if index % 2:
            scene = shape_twin(scene, random.Random(f"{seed}/{split}/{index}/twin"), holdout=holdout)
        rng = random.Random(f"{seed}/{split}/{index}")
    else:
        rng = random.Random(f"{seed}/{split}/{index}")
        scene = sample_scene(level, rng, holdout=holdout, compositional=split == "compositional_test")
    image = render(scene, rng, image_size)
    text: str | list[str]
    if split != "train":
        text = reference_captions(scene, rng, level=level, k=n_references)
    elif noisy:  # a caption of another scene of the training distribution (so no held-out pair)
        other = scene
        while other.key() == scene.key():
            other = sample_scene(level, rng, holdout=holdout)
        text = caption(other, rng, level=level)
    else:
        text = caption(scene, rng, level=level)
    record = {
        "image": f"images/{split}_{index:06d}.png",
        "caption": text,
        "image_id": index,
        "scene": scene.to_json(),
        "scene_key": scene.key(),
        # images of one scene fit each other's captions: stage 1 must not take them as negatives
        # (a mismatched caption fits no other image, so it forms no group)
        "group": None if noisy else scene.key(),
        "qa": make_qa(scene, rng, avoid=holdout),
        "noisy": noisy,
    }
    return record, image


def _write_json_lines(path: Path, records: Sequence[dict[str, Any]]) -> None:
    # A JSON list with one record per line: any JSON reader loads it, and it diffs and greps well.
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")


def generate_world(
    out_dir: str | Path,
    *,
    level: Level = "simple",
    n_train: int = 5000,
    n_test: int = 500,
    n_compositional: int = 500,
    image_size: int = 64,
    seed: int = 0,
    noise_fraction: float = 0.0,
    holdout: Iterable[tuple[str, str]] = DEFAULT_HOLDOUT,
    n_references: int = 5,
    twins: bool = False,
    write_images: bool = True,
    on_image: Callable[[str, dict[str, Any], Image.Image], None] | None = None,
) -> dict[str, Any]:
    """Write a ShapesWorld to `out_dir` and return its description (also in `world.json`).

    Writes `images/{split}_{i:06d}.png` and `{train,test,compositional_test}.json`, each a JSON list
    of records; `train` records carry one caption (a string), the two test splits a list of
    `n_references` reference captions. `noise_fraction` of the training records, exactly
    round(noise_fraction * n_train) of them, get the caption of another scene and `"noisy": true`.
    `twins=True` writes the training split in pairs: items 2k and 2k + 1 show one scene and its
    `shape_twin` (one object's shape changed), for contrastive training that keeps each pair in one
    batch (`backbones.train_world_vit` does when `world.json` says `"twins": true`).
    `on_image(split, record, image)` is called for every item as it is made (split by split, in
    order); with `write_images=False` no PNG is written (`world.json` says `"images_written":
    false`), for a caller that keeps the images it needs in memory (`backbones._build_vit`: the
    ViT's 10,000 to 40,000 training images, which it would otherwise write and read straight back).
    The same arguments give the same files, byte for byte."""
    holdout = frozenset(tuple(pair) for pair in holdout)  # type: ignore[misc]
    problems = _holdout_problems(holdout)
    if level not in LEVELS:
        problems.append(f"`level` must be one of {LEVELS}, got {level!r}")
    for name, value in (("n_train", n_train), ("n_test", n_test), ("n_compositional", n_compositional)):
        if not isinstance(value, int) or value < 0:
            problems.append(f"`{name}` must be a non-negative integer, got {value!r}")
    if n_references < 1:
        problems.append(f"`n_references` must be at least 1, got {n_references!r}")
    if image_size < 24:
        problems.append(f"`image_size` must be at least 24 pixels for the shapes to be legible, got {image_size}")
    if not 0.0 <= noise_fraction < 1.0:
        problems.append(f"`noise_fraction` must be in [0, 1), got {noise_fraction!r}")
    if n_compositional > 0 and not holdout:
        problems.append("`n_compositional` > 0 needs held-out pairs: pass `holdout` or set `n_compositional=0`")
    if twins and isinstance(n_train, int) and n_train % 2:
        problems.append(f"`twins` writes the training split in pairs: `n_train` must be even, got {n_train}")
    if problems:
        raise ValueError("Invalid ShapesWorld settings:\n  - " + "\n  - ".join(problems))

    out = Path(out_dir)
    (out / "images" if write_images else out).mkdir(parents=True, exist_ok=True)
    noisy = set(random.Random(f"{seed}/noise").sample(range(n_train), round(noise_fraction * n_train)))
    sizes = {"train": n_train, "test": n_test, "compositional_test": n_compositional}
    for split, n in sizes.items():
        records = []
        for i in range(n):
            record, image = _make_item(
                split, i, level=level, seed=seed, image_size=image_size, holdout=holdout,
                noisy=split == "train" and i in noisy, n_references=n_references, twins=twins,
            )  # fmt: skip
            if write_images:
                image.save(out / record["image"], format="PNG")
            if on_image is not None:
                on_image(split, record, image)
            records.append(record)
        _write_json_lines(out / f"{split}.json", records)

    world = {
        "name": "ShapesWorld",
        "version": 1,
        "level": level,
        "seed": seed,
        "image_size": image_size,
        "noise_fraction": noise_fraction,
        "n_noisy": len(noisy),
        "holdout": [list(pair) for pair in sorted(holdout)],
        "n_references": n_references,
        "twins": twins,
        "images_written": write_images,
        "splits": {split: {"file": f"{split}.json", "size": n} for split, n in sizes.items()},
        "vocabulary": {
            "shapes": list(SHAPES),
            "colours": list(COLOURS),
            "sizes": list(SIZES),
            "positions": list(POSITIONS),
            "relations": list(RELATIONS),
            "counts": list(COUNT_WORDS[1:]),
            "qa_types": list(_QUESTIONS),
        },
    }
    (out / "world.json").write_text(json.dumps(world, indent=2) + "\n")
    return world


def load_split(out_dir: str | Path, split: str) -> list[dict[str, Any]]:
    """The records of one split as written; `image` is relative to `out_dir`."""
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}")
    return json.loads((Path(out_dir) / f"{split}.json").read_text())


# ----------------------------------------------------------------------------------------------
# Text for pre-training tiny language models


def _scene_words(scene: Scene, rng: random.Random) -> str:
    # Half the time the objects and each object's attribute words come shuffled, so that the model
    # must read which word is a colour and which a shape instead of relying on their slot.
    objects = [[o.size, o.colour, o.shape, o.position] for o in scene.objects]
    if rng.random() < 0.5:
        rng.shuffle(objects)
        for words in objects:
            rng.shuffle(words)
    return " , ".join(" ".join(words) for words in objects)


def iter_lm_texts(
    level: Level = "simple", *, seed: int = 0, n: int = 10000, holdout: Iterable[tuple[str, str]] = DEFAULT_HOLDOUT,
    exists_weight: float = 1.0,
) -> Iterator[str]:
    """`n` conditional-task strings for teaching a tiny language model this world's language and
    to use its context: half "scene : <attribute words> . caption : <caption>", half
    "scene : <attribute words> . question : <question> answer : <answer>". Scenes come from the
    training distribution, so no text names a held-out pair. A question is drawn from the scene's
    question-answer pairs with the "exists" one weighted `exists_weight` times the others."""
    holdout = frozenset(tuple(pair) for pair in holdout)  # type: ignore[misc]
    rng = random.Random(f"{seed}/lm/{level}")
    for _ in range(n):
        scene = sample_scene(level, rng, holdout=holdout)
        context = _scene_words(scene, rng)
        if rng.random() < 0.5:
            yield f"scene : {context} . caption : {caption(scene, rng, level=level)}"
        else:
            qas = make_qa(scene, rng, avoid=holdout)
            if exists_weight == 1.0:
                qa = rng.choice(qas)
            else:
                qa = rng.choices(qas, weights=[exists_weight if q["type"] == "exists" else 1.0 for q in qas])[0]
            yield f"scene : {context} . question : {qa['question']} answer : {qa['answer']}"


def write_text_corpus(
    path: str | Path, *, level: Level = "simple", seed: int = 0, n: int = 10000,
    holdout: Iterable[tuple[str, str]] = DEFAULT_HOLDOUT,
) -> Path:  # fmt: skip
    """`iter_lm_texts` written one text per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(t + "\n" for t in iter_lm_texts(level, seed=seed, n=n, holdout=holdout)))
    return path


# ----------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate a ShapesWorld image-text dataset.")
    parser.add_argument("out_dir")
    parser.add_argument("--level", choices=LEVELS, default="simple")
    parser.add_argument("--n-train", type=int, default=5000)
    parser.add_argument("--n-test", type=int, default=500)
    parser.add_argument("--n-compositional", type=int, default=500)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise-fraction", type=float, default=0.0)
    parser.add_argument("--twins", action="store_true",
                        help="training items in pairs: a scene, then the same scene with one shape changed")  # fmt: skip
    parser.add_argument(
        "--holdout", default=",".join(f"{c} {s}" for c, s in sorted(DEFAULT_HOLDOUT)),
        help="held-out 'colour shape' pairs, comma separated; '' for none",
    )  # fmt: skip
    parser.add_argument("--lm-texts", type=int, default=0, help="also write this many lines to lm_corpus.txt")
    args = parser.parse_args(argv)
    holdout = [tuple(pair.split()) for pair in args.holdout.split(",") if pair.strip()]
    start = time.perf_counter()
    world = generate_world(
        args.out_dir, level=args.level, n_train=args.n_train, n_test=args.n_test,
        n_compositional=args.n_compositional, image_size=args.image_size, seed=args.seed,
        noise_fraction=args.noise_fraction, holdout=holdout, twins=args.twins,  # type: ignore[arg-type]
    )  # fmt: skip
    n_items = sum(s["size"] for s in world["splits"].values())
    print(f"wrote {n_items} items to {args.out_dir} in {time.perf_counter() - start:.1f} s")
    if args.lm_texts:
        path = write_text_corpus(
            Path(args.out_dir) / "lm_corpus.txt",
            level=args.level,
            seed=args.seed,
            n=args.lm_texts,
            holdout=holdout,  # type: ignore[arg-type]
        )
        print(f"wrote {args.lm_texts} texts to {path}")


if __name__ == "__main__":
    main()

"""The miniature world: seeded, procedural 32 px "mini faces".

An *identity* is a combination of seven attributes (head shape, skin colour,
eye colour, eye spacing, mouth, hair style, hair colour): 8,640 identities.
A *scene* is what prompts control: the background colour and the horizontal
position. Captions describe the scene and the coarse class ("face"). With
``describe_attributes`` (the shipped base model's captions), 90% of captions
also name one to three (mostly three) of the seven attributes ("a face with
blue eyes and spiky hair"), as Stable Diffusion has words for appearance;
``description_weights=FULL_DESCRIPTION_WEIGHTS`` (an experiment) names every
visible attribute in most captions. No caption ever describes a held-out
identity's image: the base model has never seen those faces.

Identities are split by their index: every 7th is held out (never drawn for
training the base model or the domain), so the benchmark personalizes faces
the models have never seen.

Rendering is at 4x with PIL, then box-filtered down to 32 px; numpy and PIL
only, about 0.2 ms an image.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

RESOLUTION = 32
SUPERSAMPLE = 4
CLASS_WORD = "face"
HOLDOUT_EVERY = 7

HEAD_SHAPES = ("round", "square", "oval")
SKIN_COLOURS = {
    "pale": (247, 221, 196),
    "tan": (222, 171, 121),
    "brown": (150, 96, 60),
    "dark": (84, 54, 36),
    "mint": (160, 226, 180),
    "lilac": (205, 180, 240),
}
EYE_COLOURS = {"black": (15, 15, 15), "blue": (30, 90, 255), "green": (0, 170, 40), "red": (230, 20, 20)}
EYE_SPACINGS = ("narrow", "wide")
MOUTHS = ("smile", "flat", "open")
HAIR_STYLES = ("bald", "flat", "spiky", "long")
HAIR_COLOURS = {
    "black": (20, 20, 25),
    "brown": (110, 60, 25),
    "blond": (250, 215, 90),
    "ginger": (215, 95, 20),
    "white": (245, 245, 245),
}
BACKGROUNDS = {
    "gray": (128, 128, 128),
    "red": (200, 30, 40),
    "green": (40, 160, 60),
    "blue": (40, 70, 200),
    "yellow": (240, 210, 40),
    "purple": (120, 40, 150),
    "orange": (245, 130, 20),
    "pink": (250, 150, 200),
}
POSITIONS = {"left": -6, "center": 0, "right": 6}
POSITION_WORDS = {"left": "on the left", "center": "in the center", "right": "on the right"}

IDENTITY_CHOICES = {
    "head": HEAD_SHAPES,
    "skin": tuple(SKIN_COLOURS),
    "eyes": tuple(EYE_COLOURS),
    "spacing": EYE_SPACINGS,
    "mouth": MOUTHS,
    "hair": HAIR_STYLES,
    "hair_colour": tuple(HAIR_COLOURS),
}
SCENE_CHOICES = {"background": tuple(BACKGROUNDS), "position": tuple(POSITIONS)}
ALL_CHOICES = {**IDENTITY_CHOICES, **SCENE_CHOICES}
NUM_IDENTITIES = int(np.prod([len(v) for v in IDENTITY_CHOICES.values()]))

PORTRAIT_BACKGROUND = "gray"
"""Reference photos ("portraits") are centred on gray, like aligned face crops."""


@dataclass(frozen=True)
class Identity:
    head: str
    skin: str
    eyes: str
    spacing: str
    mouth: str
    hair: str
    hair_colour: str

    @property
    def index(self) -> int:
        """Mixed-radix number of the attribute choices: 0 .. NUM_IDENTITIES-1."""
        value = 0
        for name, choices in IDENTITY_CHOICES.items():
            value = value * len(choices) + choices.index(getattr(self, name))
        return value

    @classmethod
    def from_index(cls, index: int) -> "Identity":
        values = {}
        for name, choices in reversed(IDENTITY_CHOICES.items()):
            index, digit = divmod(index, len(choices))
            values[name] = choices[digit]
        return cls(**values)

    @property
    def held_out(self) -> bool:
        return self.index % HOLDOUT_EVERY == 0

    def labels(self) -> dict[str, int]:
        return {name: IDENTITY_CHOICES[name].index(getattr(self, name)) for name in IDENTITY_CHOICES}

    def visible(self) -> tuple[str, ...]:
        """The attributes a picture shows: a bald face has no visible hair colour."""
        return tuple(name for name in IDENTITY_CHOICES if not (name == "hair_colour" and self.hair == "bald"))


@dataclass(frozen=True)
class Scene:
    background: str = PORTRAIT_BACKGROUND
    position: str = "center"

    def labels(self) -> dict[str, int]:
        return {name: SCENE_CHOICES[name].index(getattr(self, name)) for name in SCENE_CHOICES}


def random_identity(rng: random.Random, held_out: bool = False) -> Identity:
    """A uniformly drawn identity from the training split (or the held-out split)."""
    while True:
        identity = Identity.from_index(rng.randrange(NUM_IDENTITIES))
        if identity.held_out == held_out:
            return identity


def random_scene(rng: random.Random) -> Scene:
    return Scene(rng.choice(SCENE_CHOICES["background"]), rng.choice(SCENE_CHOICES["position"]))


ATTRIBUTE_PHRASES = {
    "head": lambda value: f"{value} head",
    "skin": lambda value: f"{value} skin",
    "eyes": lambda value: f"{value} eyes",
    "spacing": lambda value: f"{value}-set eyes",
    "mouth": lambda value: {"smile": "a smile", "flat": "a flat mouth", "open": "an open mouth"}[value],
    "hair": lambda value: "no hair" if value == "bald" else f"{value} hair",
    "hair_colour": lambda value: f"{value} hair",
}
DESCRIBED_COUNT_WEIGHTS = (1, 1, 2, 6)
"""How often a caption names 0, 1, 2 or 3 attributes in the base model's first training round: mostly three,
so that each attribute's words are in about a third of the captions (rarer words, in a sixth, never bound)."""
FULL_DESCRIPTION_WEIGHTS = (1, 0, 0, 2, 0, 0, 0, 7)
"""The base model's second training round (``build --refine-full-descriptions``): 70% of captions name every
visible attribute, 20% three, 10% none, so that each attribute's words are in about 80% of the captions
(docs/minifaces.md). From scratch (``--full-descriptions``) these captions lose two background words."""


def describe(identity: Identity, rng: random.Random, weights: tuple[int, ...] = DESCRIBED_COUNT_WEIGHTS) -> str:
    """Randomly chosen visible attributes as words, "blue eyes and spiky hair", or "" (none); ``weights[n]``
    is how often n are asked for (all that are visible when there are fewer)."""
    count = rng.choices(range(len(weights)), weights)[0]
    visible = identity.visible()
    names = rng.sample(visible, min(count, len(visible)))
    return " and ".join(ATTRIBUTE_PHRASES[name](getattr(identity, name)) for name in names)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, rng: random.Random, description: str = "") -> str:
    """A caption naming the class, (usually) the scene and, when given, a description of the face."""
    background, position = scene.background, scene.position
    where = POSITION_WORDS[position]
    subject = f"{CLASS_WORD} with {description}" if description else CLASS_WORD
    choices = [
        f"a {subject} on {article(background)} {background} background",
        f"a {subject} on {article(background)} {background} background, {where}",
        f"a photo of a {subject} {where}, {background} background",
        f"a {subject} {where}",
        f"a photo of a {subject}",
    ]
    weights = [4, 4, 2, 1, 1]
    return rng.choices(choices, weights)[0]


def render(identity: Identity, scene: Scene = Scene(), jitter: int = 0) -> Image.Image:
    """Draw ``identity`` in ``scene`` at RESOLUTION px. ``jitter`` (a seed, 0 for none) shifts by up to 1 px."""
    s = SUPERSAMPLE
    size = RESOLUTION * s
    image = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    dx = dy = 0
    if jitter:
        rng = random.Random(jitter)
        dx, dy = rng.randint(-s, s), rng.randint(-s, s)
    cx = size // 2 + POSITIONS[scene.position] * s + dx
    cy = size // 2 + 2 * s + dy
    rx, ry = {"round": (9, 9), "square": (9, 9), "oval": (7, 10)}[identity.head]
    rx, ry = rx * s, ry * s
    skin, hair = SKIN_COLOURS[identity.skin], HAIR_COLOURS[identity.hair_colour]
    box = (cx - rx, cy - ry, cx + rx, cy + ry)

    if identity.hair == "long":
        draw.rectangle((cx - rx - 2 * s, cy - ry + 2 * s, cx + rx + 2 * s, cy + ry - 1 * s), fill=hair)
    if identity.head == "square":
        draw.rounded_rectangle(box, radius=2 * s, fill=skin)
    else:
        draw.ellipse(box, fill=skin)
    top = cy - ry
    if identity.hair in ("flat", "long"):
        draw.chord((cx - rx, top - 1 * s, cx + rx, cy + ry // 2), 180, 360, fill=hair)
    elif identity.hair == "spiky":
        for i in range(-2, 3):
            x = cx + i * rx // 2.5
            draw.polygon([(x - 2 * s, top + 3 * s), (x + 2 * s, top + 3 * s), (x, top - 3 * s)], fill=hair)

    eye_dx = {"narrow": 3, "wide": 5}[identity.spacing] * s
    eye_y = cy - 1 * s
    radius = 1.6 * s
    for x in (cx - eye_dx, cx + eye_dx):
        draw.ellipse((x - radius, eye_y - radius, x + radius, eye_y + radius), fill=EYE_COLOURS[identity.eyes])
    mouth_y, half = cy + 4 * s, 3 * s
    ink = (60, 20, 20)
    if identity.mouth == "smile":
        draw.arc((cx - half, mouth_y - 3 * s, cx + half, mouth_y + 1 * s), 20, 160, fill=ink, width=s)
    elif identity.mouth == "flat":
        draw.line((cx - half, mouth_y, cx + half, mouth_y), fill=ink, width=s)
    else:
        draw.ellipse((cx - 1.5 * s, mouth_y - 1.5 * s, cx + 1.5 * s, mouth_y + 1.5 * s), fill=ink)
    return image.resize((RESOLUTION, RESOLUTION), Image.Resampling.BOX)


def portrait(identity: Identity) -> Image.Image:
    """The reference photo of an identity: centred, gray background, no jitter."""
    return render(identity, Scene(PORTRAIT_BACKGROUND, "center"))


@dataclass
class Sample:
    image: Image.Image
    caption: str
    identity: Identity
    scene: Scene


def samples(
    seed: int,
    held_out: bool = False,
    describe_attributes: bool = False,
    description_weights: tuple[int, ...] = DESCRIBED_COUNT_WEIGHTS,
) -> Iterator[Sample]:
    """An endless, seeded stream of captioned images of random identities in random scenes."""
    rng = random.Random(seed)
    words = random.Random(f"describe:{seed}")  # its own stream: the images are the same either way
    while True:
        identity = random_identity(rng, held_out)
        scene = random_scene(rng)
        image = render(identity, scene, jitter=rng.randrange(1, 2**31))
        description = describe(identity, words, description_weights) if describe_attributes else ""
        yield Sample(image, caption(scene, rng, description), identity, scene)


def image_array(images: list[Image.Image]) -> np.ndarray:
    """(N, 3, H, W) float32 in [-1, 1], the VAE's input range."""
    batch = np.stack([np.asarray(image, dtype=np.float32) for image in images])
    return (batch.transpose(0, 3, 1, 2) / 127.5) - 1.0


def all_labels(identity: Identity, scene: Scene) -> dict[str, int]:
    return {**identity.labels(), **scene.labels()}


LABEL_NAMES = tuple(ALL_CHOICES)
IDENTITY_LABELS = tuple(IDENTITY_CHOICES)
assert tuple(f.name for f in fields(Identity)) == IDENTITY_LABELS

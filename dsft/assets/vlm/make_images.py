"""The tiny VLM's image-caption data: deterministic synthetic scenes plus four real photographs.

    python dsft/assets/vlm/make_images.py                      # images/ and the two JSONL files
    python dsft/assets/vlm/make_images.py --skimage-wheel W    # first re-extract photos/ from
                                                               # a scikit-image wheel

A synthetic scene is 64 x 64 pixels: ``count`` (1-3) shapes of one ``shape`` (circle, square,
triangle) and one ``colour`` (red, green, blue, yellow), placed in one half of the picture
(``position``: left, right, top, bottom), with seeded jitter of size, place and background
tint. Its caption is templated: "two blue squares on the left." (144 combinations).

Held out: the (colour, shape) pairs in ``HELD_OUT`` never appear in training, with any count or
position (36 combinations); ``vlm_eval.jsonl`` holds two renderings of each, so accuracy on it
measures composition (a colour and a shape each seen, never together), with chance 1 / 144 when
a caption is chosen among all 144.

Photographs (``photos/``, 64 x 64, centre-cropped and downscaled with Lanczos): four images of
scikit-image's ``skimage/data`` (CC0 or public domain, NOTICE.md), captions written for dsft;
each is in ``vlm_train.jsonl`` three times, with different prompts.

Everything is drawn from ``random.Random(SEED)`` with PIL, so the PNG files are identical on
every run. Image paths in the JSONL files are relative to the JSONL file.
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import random
import zipfile
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "data"
SEED = 1234
SIZE = 64
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (215, 45, 40), "green": (40, 160, 70), "blue": (45, 85, 215),
           "yellow": (230, 195, 35)}
POSITIONS = ("left", "right", "top", "bottom")
COUNTS = {1: "one", 2: "two", 3: "three"}
HELD_OUT = (("blue", "triangle"), ("yellow", "circle"), ("red", "square"))
TRAIN_RENDERINGS, EVAL_RENDERINGS = 4, 2
PROMPTS = ("<image>\nDescribe the image.", "<image>\nWhat do you see?",
           "What is in this picture?\n<image>")
PHOTOS = {  # file in skimage/data -> (file in photos/, caption)
    "chelsea.png": ("cat.png", "a tabby cat looking at the camera."),
    "coffee.png": ("coffee.png", "a cup of coffee on a saucer."),
    "astronaut.png": ("astronaut.png", "an astronaut in an orange suit."),
    "rocket.jpg": ("rocket.png", "a rocket on its launch pad at night."),
}


def caption(count: int, colour: str, shape: str, position: str) -> str:
    return f"{COUNTS[count]} {colour} {shape}{'s' if count > 1 else ''} on the {position}."


def all_combinations() -> list[tuple[int, str, str, str]]:
    """(count, colour, shape, position) of every synthetic scene kind."""
    return list(itertools.product(COUNTS, COLOURS, SHAPES, POSITIONS))


def draw_scene(rng: random.Random, count: int, colour: str, shape: str,
               position: str) -> Image.Image:
    tint = rng.randint(225, 250)
    image = Image.new("RGB", (SIZE, SIZE), (tint, tint, rng.randint(225, 250)))
    draw = ImageDraw.Draw(image)
    half = SIZE // 2
    # the half the shapes go in, and the axis along which several of them line up
    x0, y0 = {"left": (0, 0), "right": (half, 0), "top": (0, 0), "bottom": (0, half)}[position]
    along_y = position in ("left", "right")
    slot = SIZE // count
    for index in range(count):
        side = rng.randint(9, 13)
        free = slot - side - 2
        lead = index * slot + 1 + rng.randint(0, max(free, 0))
        cross = rng.randint(2, half - side - 2)
        x, y = (x0 + cross, y0 + lead) if along_y else (x0 + lead, y0 + cross)
        box = (x, y, x + side, y + side)
        fill = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in COLOURS[colour])
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x + side / 2, y), (x, y + side), (x + side, y + side)], fill=fill)
    return image


def record(image: str, prompt: str, answer: str) -> dict:
    return {"image": image, "messages": [{"role": "user", "content": prompt},
                                         {"role": "assistant", "content": answer}]}


def extract_photos(wheel: Path) -> None:
    """photos/*.png from a scikit-image wheel: centre square, 64 x 64, RGB."""
    (HERE / "photos").mkdir(exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        for source, (target, _) in PHOTOS.items():
            with Image.open(io.BytesIO(archive.read(f"skimage/data/{source}"))) as photo:
                photo = photo.convert("RGB")
                side = min(photo.size)
                left, top = (photo.width - side) // 2, (photo.height - side) // 2
                photo = photo.crop((left, top, left + side, top + side))
                photo.resize((SIZE, SIZE), Image.Resampling.LANCZOS).save(HERE / "photos" / target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skimage-wheel", type=Path,
                        help="re-extract photos/ from this scikit-image wheel first")
    args = parser.parse_args()
    if args.skimage_wheel:
        extract_photos(args.skimage_wheel)
    rng = random.Random(SEED)
    (HERE / "images").mkdir(exist_ok=True)
    train, evaluation = [], []
    for count, colour, shape, position in all_combinations():
        held_out = (colour, shape) in HELD_OUT
        for rendering in range(EVAL_RENDERINGS if held_out else TRAIN_RENDERINGS):
            name = f"{count}_{colour}_{shape}_{position}_{rendering}.png"
            draw_scene(rng, count, colour, shape, position).save(HERE / "images" / name)
            rows = evaluation if held_out else train
            rows.append(record(f"../vlm/images/{name}", rng.choice(PROMPTS),
                               caption(count, colour, shape, position)))
    for _, (name, text) in PHOTOS.items():
        for prompt in PROMPTS:
            train.append(record(f"../vlm/photos/{name}", prompt, text))
    rng.shuffle(train)
    for name, rows in (("vlm_train.jsonl", train), ("vlm_eval.jsonl", evaluation)):
        (DATA / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"{len(train)} train records, {len(evaluation)} held-out eval records")


if __name__ == "__main__":
    main()

"""Writes the sample images of jobs/classify-images.yaml: simple pictures drawn with PIL, four per class, in one
folder per class (the layout of datasets' imagefolder builder), and metadata.jsonl giving each an `id`.

Generated, not photographed: no licence applies. Seeded, so a rerun writes the same pictures.
    python data/images/make_images.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SIZE = (160, 120)
PER_CLASS = 4


def background(generator: random.Random) -> Image.Image:
    colour = tuple(generator.randint(150, 255) for _ in range(3))
    return Image.new("RGB", SIZE, colour)


def ink(generator: random.Random) -> tuple[int, int, int]:
    return tuple(generator.randint(0, 110) for _ in range(3))


def circles(generator: random.Random) -> Image.Image:
    image = background(generator)
    draw = ImageDraw.Draw(image)
    for _ in range(generator.randint(1, 4)):
        x, y, r = generator.randint(20, 140), generator.randint(20, 100), generator.randint(8, 30)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=ink(generator))
    return image


def squares(generator: random.Random) -> Image.Image:
    image = background(generator)
    draw = ImageDraw.Draw(image)
    for _ in range(generator.randint(1, 4)):
        x, y, side = generator.randint(5, 120), generator.randint(5, 80), generator.randint(12, 40)
        draw.rectangle((x, y, x + side, y + side), fill=ink(generator))
    return image


def stripes(generator: random.Random) -> Image.Image:
    image = background(generator)
    draw = ImageDraw.Draw(image)
    width, gap = generator.randint(4, 10), generator.randint(8, 20)
    for x in range(-SIZE[1], SIZE[0], width + gap):
        draw.line((x, SIZE[1], x + SIZE[1], 0), fill=ink(generator), width=width)
    return image


CLASSES = {"circles": circles, "squares": squares, "stripes": stripes}


def main() -> None:
    generator = random.Random(20261203)
    metadata = []
    for label, draw in CLASSES.items():
        (HERE / label).mkdir(exist_ok=True)
        for number in range(PER_CLASS):
            name = f"{label}/{label}-{number}.png"
            draw(generator).save(HERE / name, optimize=True)
            metadata.append({"file_name": name, "id": f"{label}-{number}"})
    (HERE / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in metadata))


if __name__ == "__main__":
    main()

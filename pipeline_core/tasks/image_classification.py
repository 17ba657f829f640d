"""image-classification: one label and its score per image, decoded and resized in the DataLoader workers.

A row's image is a `datasets` Image value (a struct of bytes and path, as Parquet files and the imagefolder builder
hold it), raw bytes, or a path string. Each is opened with PIL, turned upright (EXIF) and converted to RGB as the
transformers pipeline does, then the model's image processor runs on the slice's images at once. An image that
cannot be read, or a null, fails its own row only. PIL is imported here lazily: a text job never loads it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import pyarrow as pa
import torch

from pipeline_core.data.files import one_line
from pipeline_core.tasks.classification import best_labels, class_labels

# A slice is prepared, held and handed from a worker to the model's process whole: 256 images of 224x224 are 154 MB
# of float32 pixels, where the text tasks' 4096 rows are a few MB of token ids.
IMAGE_SLICE_ROWS = 256
# Images are decoded and resized this many at a time: a decoded 12-megapixel photo takes 36 MB until it is resized.
DECODE_ROWS = 16


@dataclass
class EncodedImages:
    """A slice's images after the image processor: the good rows' pixels stacked in row order, and why rows failed."""

    errors: list[str | None]
    pixels: torch.Tensor  # (good rows, channels, height, width)
    positions: list[int | None]  # row -> its index in `pixels`; None for a failed row

    def length(self, row: int) -> int:
        """Every image is resized to one size, so each costs the same: one in the batch budget."""
        return 1


class ImageEncoder:
    def __init__(self, image_processor, column: str, dtype: torch.dtype):
        self.processor = image_processor
        self.column = column
        self.dtype = dtype  # the model's: the pipeline casts pixel_values to it too

    def __call__(self, table: pa.Table) -> EncodedImages:
        values = table.column(self.column).to_pylist()
        errors: list[str | None] = [None] * len(values)
        stacks, good = [], []  # the pixels of each chunk, and the rows they hold in order
        for start in range(0, len(values), DECODE_ROWS):
            images = {}
            for row in range(start, min(start + DECODE_ROWS, len(values))):
                image, errors[row] = open_image(values[row], self.column)
                if image is not None:
                    images[row] = image
            shape = tuple(stacks[0].shape[1:]) if stacks else None
            pixels, failed = self._pixels(list(images.values()), shape)
            rows = list(images)
            for position, error in failed.items():
                errors[rows[position]] = error
            if pixels.numel():
                stacks.append(pixels)
                good += [row for row in rows if errors[row] is None]
        positions: list[int | None] = [None] * len(values)
        for index, row in enumerate(good):
            positions[row] = index
        pixels = torch.cat(stacks) if len(stacks) > 1 else stacks[0] if stacks else torch.empty(0)
        return EncodedImages(errors, pixels, positions)

    def collate(self, encoded: EncodedImages, rows: list[int]) -> dict[str, torch.Tensor]:
        """The batch's pixel_values: a view of the slice's stack where its rows lie together (no copy), as they do
        when every image costs the same and batches are cut in row order."""
        positions = [encoded.positions[row] for row in rows]
        first = positions[0]
        if positions == list(range(first, first + len(positions))):
            return {"pixel_values": encoded.pixels[first:first + len(positions)]}
        return {"pixel_values": encoded.pixels[positions]}

    def _pixels(self, images: list, shape: tuple | None) -> tuple[torch.Tensor, dict[int, str]]:
        """The images' pixel_values stacked, and {position: why} for those the processor could not take, or that
        came out at another size than `shape` (the slice's first image's, once there is one). One call for all:
        the processor's per-call overhead is paid once per chunk. Should it fail, the images go one at a time, so
        that one odd image (or a processor whose output size follows each image) fails alone."""
        if not images:
            return torch.empty(0), {}
        try:
            stacked = self._process(images)
        except Exception:  # noqa: BLE001 - found again, one image at a time
            stacked = None
        if stacked is not None and shape in (None, tuple(stacked.shape[1:])):
            return stacked, {}
        outputs, failed = {}, {}
        if stacked is not None:
            outputs = dict(enumerate(stacked))
        else:
            for position, image in enumerate(images):
                try:
                    outputs[position] = self._process([image])[0]
                except Exception as error:  # noqa: BLE001 - recorded on the row
                    reason = f"{type(error).__name__}: {one_line(str(error))}"
                    failed[position] = f"the image processor failed: {reason}"[:1000]
        for position, pixels in list(outputs.items()):
            shape = shape or tuple(pixels.shape)  # the first image's, where this is the slice's first chunk
            if tuple(pixels.shape) != shape:
                failed[position] = (f"the image processor made a {size(pixels.shape)} image where the slice's first "
                                    f"is {size(shape)}; batchrun needs an image processor with a fixed output size")
                del outputs[position]
        return (torch.stack(list(outputs.values())) if outputs else torch.empty(0)), failed

    def _process(self, images: list) -> torch.Tensor:
        return self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.dtype)


class ImageClassificationTask:
    columns = {"label": pa.string(), "score": pa.float32()}
    slice_rows = IMAGE_SLICE_ROWS

    def __init__(self, encoder: ImageEncoder, model_config):
        self.encode, self.collate = encoder, encoder.collate  # decoding and resizing, run in the workers
        self.labels, self.sigmoid = class_labels(model_config)

    def forward(self, model, inputs: dict):
        return model(**inputs).logits

    def decode(self, logits, inputs: dict, encoded: EncodedImages, rows: list[int]) -> dict[str, list]:
        return best_labels(logits, self.labels, self.sigmoid)


def open_image(value, column: str):
    """(the RGB image, None), or (None, why the row has none). `value`: a struct {bytes, path} (a datasets Image),
    bytes, or a path string. Messages name no memory address, so a rerun writes the same ones."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(value, dict):  # datasets' Image: the bytes when it holds them, else the file
        value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
    if value is None:
        return None, f"image column {column!r} is null"
    if isinstance(value, str):
        source, what = value, f"image file {value!r}"
    elif isinstance(value, bytes):
        source, what = io.BytesIO(value), f"image column {column!r}"
    else:
        return None, f"image column {column!r} holds {type(value).__name__}, not an image, its bytes or a path"
    try:
        image = Image.open(source)
        image.load()  # Image.open reads the header only: a truncated file fails here
        ImageOps.exif_transpose(image, in_place=True)  # in place: a 640x480 copy costs as much as the resize
        if image.mode != "RGB":
            image = image.convert("RGB")
    except FileNotFoundError:
        return None, f"{what} does not exist"
    except UnidentifiedImageError:
        return None, f"{what} holds no image PIL can read"
    except Exception as error:  # noqa: BLE001 - truncated data, a decompression bomb, ...: recorded on the row
        return None, f"{what} cannot be decoded: {type(error).__name__}: {one_line(str(error))}"[:1000]
    return image, None


def size(shape) -> str:
    """'HxW' of a (channels, height, width) shape."""
    return f"{shape[-2]}x{shape[-1]}" if shape else "none"

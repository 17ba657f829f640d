"""image-classification: one label and its score per image, decoded and resized in the DataLoader workers.

A row's image is a `datasets` Image value (a struct of bytes and path, as Parquet files and the imagefolder builder
hold it), raw bytes, or a path string. Each is opened with PIL, turned upright (EXIF) and converted to RGB as the
transformers pipeline does, then the model's image processor runs on the slice's images at once. An image that
cannot be read, or a null, fails its own row only. PIL is imported here lazily: a text job never loads it.
"""

from __future__ import annotations

import io
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from pipeline_core.data.files import one_line
from pipeline_core.data.values import column_values, kind_of
from pipeline_core.tasks.classification import best_labels, class_labels

# A slice is prepared, held and handed from a worker to the model's process whole: 256 images of 224x224 are 154 MB
# of float32 pixels, where the text tasks' 4096 rows are a few MB of token ids.
IMAGE_SLICE_ROWS = 256
# Images are decoded and resized this many at a time: a decoded 12-megapixel photo takes 36 MB until it is resized.
DECODE_ROWS = 16

log = logging.getLogger("batchrun")


@dataclass
class EncodedImages:
    """A slice's images after the image processor: the good rows' pixels stacked in row order, and why rows failed."""

    errors: list[str | None]
    pixels: torch.Tensor  # (good rows, channels, height, width)
    positions: list[int | None]  # row -> its index in `pixels`; None for a failed row
    truncated_rows = 0  # images are resized, never truncated

    def length(self, row: int) -> int:
        """Every image is resized to one size, so each costs the same: one in the batch budget."""
        return 1


class ImageEncoder:
    """Decodes a slice's images and runs the image processor on them, DECODE_ROWS at a time, in as many threads as
    torch may use in this process: one in a DataLoader worker, the cores in the model's process when it prepares
    its own rows. Decoding and PIL's resize release the GIL, so the threads share the cores for real."""

    def __init__(self, image_processor, column: str, dtype: torch.dtype):
        self.processor = image_processor
        self.column = column
        self.dtype = dtype  # the model's: the pipeline casts pixel_values to it too
        self.direct = DirectProcessing.of(image_processor)
        self.checked = self.direct is None  # the direct steps are checked against the processor once per process

    def __call__(self, table: pa.Table) -> EncodedImages:
        values = column_values(table, self.column)  # paths in a JSON column of mixed types: decoded, as for text
        chunks = [range(start, min(start + DECODE_ROWS, len(values))) for start in range(0, len(values), DECODE_ROWS)]
        stack = _Stack(len(values), self.dtype)
        if self.direct is not None and self.checked:
            stack.allocate(self.direct.shape)  # known before any image: every chunk may go to the threads
        while chunks and (stack.pixels is None or not self.checked):  # one by one until the first image is seen
            self._chunk(values, chunks.pop(0), stack)
        threads = min(torch.get_num_threads(), len(chunks))
        if threads > 1:
            with ThreadPoolExecutor(threads, thread_name_prefix="batchrun-images") as pool:
                list(pool.map(lambda rows: self._chunk(values, rows, stack), chunks))
        else:
            for rows in chunks:
                self._chunk(values, rows, stack)
        return stack.encoded()

    def collate(self, encoded: EncodedImages, rows: list[int]) -> dict[str, torch.Tensor]:
        """The batch's pixel_values: a view of the slice's stack where its rows lie together (no copy), as they do
        when every image costs the same and batches are cut in row order."""
        positions = [encoded.positions[row] for row in rows]
        first = positions[0]
        if positions == list(range(first, first + len(positions))):
            return {"pixel_values": encoded.pixels[first:first + len(positions)]}
        return {"pixel_values": encoded.pixels[positions]}

    def _chunk(self, values: list, rows: range, stack: _Stack) -> None:
        images = {}
        for row in rows:
            image, error = open_image(values[row], self.column)
            if error is not None:
                stack.errors[row] = error
                continue
            if not self.checked:
                self._check(image)
            if self.direct is None:
                images[row] = image
                continue
            try:  # resized at once, while the decoded image is still in the CPU's cache
                images[row] = self.direct.resize(image)
            except Exception as error:  # noqa: BLE001 - recorded on the row, as the processor's failures are
                stack.errors[row] = processor_failed(error)
        if self.direct is not None:
            stack.put_direct(images, self.direct)
        elif images:
            self._process(images, stack)

    def _process(self, images: dict, stack: _Stack) -> None:
        """Every image of the chunk in one processor call, so that its per-call overhead is paid once per chunk.
        Should that call fail, the images go one at a time, so that one odd image (or a processor whose output
        size follows each image) fails alone."""
        try:
            stacked = self.processor(images=list(images.values()), return_tensors="pt")["pixel_values"]
        except Exception:  # noqa: BLE001 - found again, one image at a time
            stacked = None
        if stacked is not None:
            stack.put(list(images), stacked)
            return
        for row, image in images.items():
            try:
                stack.put([row], self.processor(images=[image], return_tensors="pt")["pixel_values"])
            except Exception as error:  # noqa: BLE001 - recorded on the row
                stack.errors[row] = processor_failed(error)

    def _check(self, image) -> None:
        """Keep the direct steps only if they give the processor's own pixels, bit for bit, on the first image."""
        self.checked = True
        try:
            processed = self.processor(images=[image], return_tensors="pt")["pixel_values"][0]
            mine = torch.empty(self.direct.shape)
            self.direct.pixels(self.direct.resize(image), mine)
            same = torch.equal(mine, processed)
        except Exception:  # noqa: BLE001 - the processor's own call decides what the rows get
            same = False
        if not same:
            log.info("the image processor runs as it is: batchrun's direct steps for %s did not give its pixels",
                     type(self.processor).__name__)
            self.direct = None


class _Stack:
    """A slice's pixels, a place for every row, filled by the chunks (in threads) as they finish; and why rows
    failed. Every image must come out at the size of the slice's first: one of another size fails its row."""

    def __init__(self, rows: int, dtype: torch.dtype):
        self.errors: list[str | None] = [None] * rows
        self.pixels: torch.Tensor | None = None
        self.dtype = dtype

    def allocate(self, shape: tuple) -> None:
        self.pixels = torch.empty((len(self.errors), *shape), dtype=self.dtype)

    def put(self, rows: list[int], pixels: torch.Tensor) -> None:
        if self.pixels is None:  # the first chunk is done alone: no other thread allocates meanwhile
            self.allocate(tuple(pixels.shape[1:]))
        shape = tuple(self.pixels.shape[1:])
        if tuple(pixels.shape[1:]) != shape:
            for row in rows:
                self.errors[row] = (f"the image processor made a {size(pixels.shape)} image where the slice's first "
                                    f"is {size(shape)}; batchrun needs an image processor with a fixed output size")
            return
        for row, image in zip(rows, pixels, strict=True):
            self.pixels[row] = image  # copy_ casts to the model's dtype, as the pipeline's .to(dtype) does

    def put_direct(self, images: dict, direct: DirectProcessing) -> None:
        if self.pixels is None:
            self.allocate(direct.shape)
        for row, image in images.items():
            direct.pixels(image, self.pixels[row])

    def encoded(self) -> EncodedImages:
        """The good rows' pixels in row order: the stack as it is when no row failed, else its good rows copied.
        Every row has its pixels put or its error set."""
        good = [row for row, error in enumerate(self.errors) if error is None]
        positions: list[int | None] = [None] * len(self.errors)
        for index, row in enumerate(good):
            positions[row] = index
        if not good:
            pixels = torch.empty(0)
        elif len(good) == len(self.errors):
            pixels = self.pixels
        else:
            pixels = self.pixels[good]
        return EncodedImages(self.errors, pixels, positions)


class DirectProcessing:
    """A PIL-backend image processor's steps done the short way, for the common processors that resize to a fixed
    size and may centre-crop, rescale and normalize (ViT's and DeiT's; Swin checkpoints use ViT's). The processor
    turns each image into numpy, back into a PIL image to resize it and into numpy again, then rescales and
    normalizes it in float64 and float32 arrays. Here PIL's same resize runs on the decoded image, and rescaling and
    normalizing become a table of 256 values a channel, computed with the processor's own arithmetic: the pixels
    are the same bit for bit at a fraction of the cost. Only a processor that overrides none of those steps
    qualifies, and ImageEncoder checks the pixels against the processor's before using it."""

    STEPS = ("preprocess", "_preprocess_image_like_inputs", "_prepare_image_like_inputs", "process_image",
             "_preprocess", "resize", "center_crop", "rescale", "normalize")

    def __init__(self, processor):
        height, width = processor.size.height, processor.size.width
        self.size = (width, height)  # PIL's order
        self.resample = int(processor.resample)
        self.crop = None
        if processor.do_center_crop:
            crop = processor.crop_size
            top, left = (height - crop.height) // 2, (width - crop.width) // 2  # the processor's own arithmetic
            self.crop = (slice(top, top + crop.height), slice(left, left + crop.width))
            height, width = crop.height, crop.width
        self.shape = (3, height, width)
        self.table = self._table(processor).numpy()  # (channels, 256) float32: a uint8 value's processed value

    @staticmethod
    def _table(processor) -> torch.Tensor:
        """What the processor makes of each of the 256 values of a channel: rescale in float64 then float32,
        normalize in float32, as its numpy code does."""
        values = torch.arange(256, dtype=torch.float64).expand(3, 256)
        if processor.do_rescale:
            values = values * processor.rescale_factor
        values = values.to(torch.float32)
        if processor.do_normalize:
            mean, std = (torch.tensor(value, dtype=torch.float32).reshape(-1, 1).expand(3, 1)
                         for value in (processor.image_mean, processor.image_std))
            values = (values - mean) / std
        return values.contiguous()

    @classmethod
    def of(cls, processor) -> DirectProcessing | None:
        """The direct steps for this processor, or None where they are not known to be its steps."""
        try:
            from transformers.image_processing_backends import PilBackend
        except ImportError:  # another transformers: its processor runs as it is
            return None
        kind = type(processor)
        if not isinstance(processor, PilBackend) or any(
                getattr(kind, step, None) is not getattr(PilBackend, step, None) for step in cls.STEPS):
            return None
        try:
            return cls(processor) if cls._fixed_size(processor) else None
        except (AttributeError, TypeError, ValueError):  # settings not shaped as transformers 5 shapes them
            return None

    @staticmethod
    def _fixed_size(processor) -> bool:
        """Whether the processor resizes every image to one size with a PIL filter, crops within it, and pads not."""
        size, crop = processor.size, processor.crop_size
        if (not processor.do_resize or size is None or not (size.height and size.width)
                or size.shortest_edge or size.longest_edge or size.max_height or size.max_width
                or getattr(processor, "do_pad", None)
                or not isinstance(processor.resample, int)):  # PIL's filters are ints; transformers refuses None
            return False
        if processor.do_center_crop and (crop is None or not (crop.height and crop.width)
                                         or crop.height > size.height or crop.width > size.width):
            return False  # a crop larger than the image pads it: the processor's own way
        return not processor.do_normalize or (processor.image_mean is not None and processor.image_std is not None)

    def resize(self, image) -> np.ndarray:
        """An RGB PIL image resized (and cropped) as the processor does it: (height, width, 3) uint8."""
        pixels = np.asarray(image.resize(self.size, self.resample))
        return pixels[self.crop] if self.crop is not None else pixels

    def pixels(self, resized: np.ndarray, out: torch.Tensor) -> None:
        """A resized image's processed pixels, written into `out` (channels, height, width)."""
        target = out if out.dtype == torch.float32 else torch.empty(self.shape)  # numpy has no bfloat16
        array = target.numpy()
        for channel in range(3):  # mode clip: no bounds check, a uint8 is always within the table
            np.take(self.table[channel], resized[..., channel], out=array[channel], mode="clip")
        if target is not out:
            out.copy_(target)  # the model's dtype, rounded as the pipeline's .to(dtype) rounds


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
        return None, f"image column {column!r} holds {kind_of(value)}, not an image, its bytes or a path"
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


def processor_failed(error: Exception) -> str:
    return f"the image processor failed: {type(error).__name__}: {one_line(str(error))}"[:1000]


def size(shape) -> str:
    """'HxW' of an (images, channels, height, width) shape."""
    return f"{shape[-2]}x{shape[-1]}"

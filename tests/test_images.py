"""image-classification end to end: labels and scores against a one-image-at-a-time reference (the image processor
and the model, as the transformers pipeline runs them), every kind of image value (a datasets Image in Parquet, the
imagefolder builder, a path string, raw bytes), odd modes and sizes, bad images as bad rows, the size check before
any row is read, workers, and kill -9 then resume.

Images are generated here with a seeded generator; the tiny ViT (tests/tiny_models.py) reads 32x32.
"""

from __future__ import annotations

import io
import json
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from test_resume import committed, kill_when_committed
from transformers import AutoImageProcessor, AutoModelForImageClassification
from transformers.image_utils import SizeDict, load_image

import jobs
from jobs import start
from pipeline_core.cli import run_cli
from pipeline_core.tasks import image_classification
from pipeline_core.tasks.image_classification import EncodedImages, ImageEncoder, open_image


def picture(seed: int, size: tuple[int, int] = (40, 30), mode: str = "RGB") -> Image.Image:
    """Seeded noise over a gradient, so that different pictures get different logits; every third one is pale
    (the tiny ViT calls pale pictures "cat", dark ones "dog")."""
    generator = np.random.default_rng(seed)
    width, height = size
    gradient = np.linspace(0, 255, width, dtype=np.float32)[None, :, None] * generator.random(3)
    pixels = np.clip(gradient + generator.normal(0, 40, (height, width, 3)), 0, 255)
    if seed % 3 == 0:
        pixels = 255 - pixels / 8
    pixels = pixels.astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    return image if mode == "RGB" else image.convert(mode)


def encoded(image: Image.Image, kind: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return buffer.getvalue()


def reference(model_dir: Path, images: list[bytes]) -> list[tuple[str, float]]:
    """(label, score) of each image alone: loaded as the pipeline loads it (EXIF, RGB), the saved image processor,
    the model, softmax, argmax, id2label."""
    processor = AutoImageProcessor.from_pretrained(model_dir)
    model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    results = []
    for data in images:
        inputs = processor(images=load_image(Image.open(io.BytesIO(data))), return_tensors="pt")
        with torch.no_grad():
            scores = model(**inputs).logits[0].softmax(dim=-1)
        results.append((model.config.id2label[int(scores.argmax())], float(scores.max())))
    return results


def image_parquet(path: Path, images: list[bytes | None]) -> Path:
    """A Parquet file with an `id` column and a datasets Image feature, as datasets writes it."""
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image()})
    values = [None if data is None else {"bytes": data, "path": None} for data in images]
    datasets.Dataset.from_dict({"id": [f"i{n:03d}" for n in range(len(images))], "image": values},
                               features=features).to_parquet(str(path))
    return path


def write_job(directory: Path, model: Path, dataset: dict, rows_per_part: int = 4, **batching) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return jobs.write_manifest(directory / "job.yaml", jobs.manifest(
        model, task="image-classification", dataset=dataset,
        batching={"max_batch_size": 4, "num_workers": 0, **batching},
        output={"path": directory / "out", "rows_per_part": rows_per_part}, errors={"max_error_rate": 1.0}))


def run(job: Path, *args: str) -> int:
    return run_cli(["run", str(job), "--no-progress", *args])


def assert_matches(result: pd.DataFrame, expected: list[tuple[str, float] | None]) -> None:
    """Rows with a reference have its label and score and no error; None marks a row that must have failed."""
    assert len(result) == len(expected)
    for row, want in zip(result.itertuples(), expected, strict=True):
        if want is None:
            assert row.error and pd.isna(row.label) and pd.isna(row.score), row
        else:
            assert pd.isna(row.error), row.error
            assert row.label == want[0]
            assert row.score == pytest.approx(want[1], abs=1e-5)


@pytest.fixture(scope="module")
def pictures() -> list[bytes]:
    """Ten PNGs of sizes from 8x8 to 90x50, so that the processor resizes both up and down."""
    sizes = [(40, 30), (8, 8), (90, 50), (32, 32), (17, 61), (64, 48), (33, 33), (50, 90), (12, 40), (70, 70)]
    return [encoded(picture(seed, size)) for seed, size in enumerate(sizes)]


@pytest.mark.parametrize("streaming", [True, False])
def test_labels_and_scores_equal_a_one_image_at_a_time_reference(tmp_path, tiny_models, pictures, streaming):
    data = image_parquet(tmp_path / "images.parquet", pictures)
    # parts of 8 in batches of 3, 3 and 2: a batch's pixels are found inside its slice
    job = write_job(tmp_path, tiny_models.image_classifier,
                    {"path": "parquet", "data_files": str(data), "keep_columns": ["id"], "streaming": streaming},
                    rows_per_part=8, max_batch_size=3)
    assert run(job) == 0
    result = pd.read_parquet(tmp_path / "out")
    assert list(result.columns) == ["row_id", "id", "label", "score", "error"]
    assert result["row_id"].tolist() == list(range(10)) and result["id"].tolist() == [f"i{n:03d}" for n in range(10)]
    expected = reference(tiny_models.image_classifier, pictures)
    assert {label for label, _ in expected} == {"cat", "dog"}  # both labels occur: argmax is really tested
    assert_matches(result, expected)
    assert sorted(path.name for path in (tmp_path / "out").glob("part-*")) == ["part-000000.parquet",
                                                                               "part-000001.parquet"]


def test_workers_give_the_output_of_the_main_process(tmp_path, tiny_models, pictures):
    data = image_parquet(tmp_path / "images.parquet", pictures + [b"not an image"])
    dataset = {"path": "parquet", "data_files": str(data), "keep_columns": ["id"]}
    main = write_job(tmp_path / "main", tiny_models.image_classifier, dataset, num_workers=0)
    workers = write_job(tmp_path / "workers", tiny_models.image_classifier, dataset, num_workers=2, max_batch_size=3)
    assert run(main) == 0 and run(workers) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "workers" / "out"),
                                  pd.read_parquet(tmp_path / "main" / "out"))


def test_bad_images_and_nulls_fail_their_rows_and_the_others_are_unchanged(tmp_path, tiny_models, pictures):
    jpeg = encoded(picture(7, (64, 48)), "JPEG")
    images = [pictures[0], b"this is not an image", pictures[1], None, jpeg[: len(jpeg) // 2], pictures[2], b""]
    data = image_parquet(tmp_path / "images.parquet", images)
    job = write_job(tmp_path, tiny_models.image_classifier,
                    {"path": "parquet", "data_files": str(data), "keep_columns": ["id"]})
    assert run(job) == 0  # max_error_rate 1.0: the run goes on and finishes
    result = pd.read_parquet(tmp_path / "out")
    good = reference(tiny_models.image_classifier, [pictures[0], pictures[1], pictures[2]])
    assert_matches(result, [good[0], None, good[1], None, None, good[2], None])
    errors = result["error"].tolist()
    assert errors[1] == "image column 'image' holds no image PIL can read"
    assert errors[3] == "image column 'image' is null"
    assert errors[4].startswith("image column 'image' cannot be decoded: OSError: image file is truncated")
    assert errors[6] == "image column 'image' holds no image PIL can read"  # empty bytes


def test_a_bad_row_fails_the_run_under_on_error_fail(tmp_path, tiny_models, pictures, capsys):
    data = image_parquet(tmp_path / "images.parquet", [pictures[0], None])
    job = write_job(tmp_path, tiny_models.image_classifier, {"path": "parquet", "data_files": str(data)})
    assert run(job, "--set", "errors.on_error=fail") == 1
    assert "row 1 failed: image column 'image' is null (errors.on_error: fail)" in capsys.readouterr().err


def test_images_of_every_mode_and_size_are_converted_to_rgb(tmp_path, tiny_models):
    base = picture(11, (45, 35))
    rotated = base.transpose(Image.Transpose.ROTATE_90)  # stored sideways, with the EXIF tag that turns it upright
    exif = Image.Exif()
    exif[0x0112] = 6
    images = [
        encoded(base.convert("L")),
        encoded(base.convert("RGBA")),
        encoded(base.convert("P")),
        encoded(base.convert("LA")),
        encoded(base.convert("CMYK"), "JPEG"),
        encoded(base.convert("I;16")),
        encoded(base, "GIF"),
        encoded(base, "BMP"),
        encoded(base, "WEBP", lossless=True),
        encoded(rotated, "JPEG", exif=exif),
        encoded(picture(12, (300, 7), "RGBA")),
        encoded(picture(13, (1, 1))),
    ]
    data = image_parquet(tmp_path / "images.parquet", images)
    job = write_job(tmp_path, tiny_models.image_classifier, {"path": "parquet", "data_files": str(data)})
    assert run(job) == 0
    assert_matches(pd.read_parquet(tmp_path / "out"), reference(tiny_models.image_classifier, images))


def test_exif_orientation_is_applied():
    base = picture(11, (45, 35))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    image, error = open_image(encoded(base.transpose(Image.Transpose.ROTATE_90), "PNG", exif=exif), "image")
    assert error is None and image.size == (45, 35) and image.mode == "RGB"


def test_an_imagefolder_directory(tmp_path, tiny_models):
    root = tmp_path / "images"
    for label, seeds in (("circles", range(0, 5)), ("squares", range(5, 9))):
        (root / label).mkdir(parents=True)
        for seed in seeds:
            picture(seed, (20 + seed, 30)).save(root / label / f"{seed:02d}.png")
    (root / "squares" / "broken.png").write_bytes(b"\x89PNG not really")
    job = write_job(tmp_path, tiny_models.image_classifier,
                    {"path": "imagefolder", "data_files": str(root / "**")})
    assert run(job) == 0
    result = pd.read_parquet(tmp_path / "out")
    # the rows in datasets' own order, as batchrun read them
    files = datasets.load_dataset("imagefolder", data_files=str(root / "**"), split="train", streaming=True)
    paths = [row["image"]["path"] for row in files.cast_column("image", datasets.Image(decode=False))]
    assert len(paths) == len(result) == 10
    broken = paths.index(str(root / "squares" / "broken.png"))
    expected = reference(tiny_models.image_classifier, [Path(path).read_bytes() for path in paths if "broken" not in
                                                        path])
    expected.insert(broken, None)
    assert_matches(result, expected)
    assert result["error"][broken] == f"image file {str(root / 'squares' / 'broken.png')!r} holds no image PIL can read"


def test_a_column_of_paths(tmp_path, tiny_models, pictures):
    paths = []
    for n, data in enumerate(pictures[:4]):
        paths.append(tmp_path / f"{n}.png")
        paths[-1].write_bytes(data)
    rows = [{"id": "a", "picture": str(paths[0])}, {"id": "b", "picture": str(tmp_path / "gone.png")},
            {"id": "c", "picture": str(paths[1])}, {"id": "d", "picture": None},
            {"id": "e", "picture": str(paths[2])}, {"id": "g", "picture": str(paths[3])}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    job = write_job(tmp_path, tiny_models.image_classifier, {
        "path": "json", "data_files": str(tmp_path / "rows.jsonl"), "image_column": "picture", "keep_columns": ["id"]})
    assert run(job) == 0
    result = pd.read_parquet(tmp_path / "out")
    good = reference(tiny_models.image_classifier, pictures[:4])
    assert_matches(result, [good[0], None, good[1], None, good[2], good[3]])
    assert result["error"][1] == f"image file {str(tmp_path / 'gone.png')!r} does not exist"
    assert result["error"][3] == "image column 'picture' is null"


def test_a_value_that_is_no_image_bytes_or_path_fails_its_row():
    assert open_image(7, "image") == (None, "image column 'image' holds a number, not an image, its bytes or a path")
    assert open_image({"bytes": None, "path": None}, "image") == (None, "image column 'image' is null")


def test_a_struct_is_read_from_its_bytes_when_it_holds_them_else_from_its_path(tmp_path):
    picture(1, (9, 7)).save(tmp_path / "a.png")
    image, error = open_image({"bytes": encoded(picture(2, (5, 4))), "path": str(tmp_path / "a.png")}, "image")
    assert error is None and image.size == (5, 4)
    image, error = open_image({"bytes": None, "path": str(tmp_path / "a.png")}, "image")
    assert error is None and image.size == (9, 7) and image.mode == "RGB"
    data = encoded(picture(3, (64, 48)), "JPEG")[:300]
    with pytest.raises(OSError) as raised:
        Image.open(io.BytesIO(data)).load()
    assert open_image(data, "image") == (None, f"image column 'image' cannot be decoded: OSError: {raised.value}")


def test_a_plain_struct_of_bytes_and_path_and_a_binary_column(tmp_path, tiny_models, pictures):
    path = tmp_path / "on-disk.png"
    path.write_bytes(pictures[3])
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "image": pa.array([{"bytes": pictures[0], "path": "ignored.png"}, {"bytes": None, "path": str(path)},
                           {"bytes": None, "path": None}], struct),
        "raw": pa.array([pictures[1], pictures[2], None], pa.binary()),
    })
    pq.write_table(table, tmp_path / "plain.parquet")
    dataset = {"path": "parquet", "data_files": str(tmp_path / "plain.parquet")}
    job = write_job(tmp_path / "struct", tiny_models.image_classifier, dataset)
    assert run(job) == 0
    result = pd.read_parquet(tmp_path / "struct" / "out")
    assert_matches(result, [*reference(tiny_models.image_classifier, [pictures[0], pictures[3]]), None])
    assert result["error"][2] == "image column 'image' is null"
    raw = write_job(tmp_path / "raw", tiny_models.image_classifier, {**dataset, "image_column": "raw"})
    assert run(raw) == 0
    assert_matches(pd.read_parquet(tmp_path / "raw" / "out"),
                   [*reference(tiny_models.image_classifier, pictures[1:3]), None])


def test_an_image_processor_of_another_size_is_refused_before_any_row_is_read(tmp_path, tiny_models, pictures,
                                                                                monkeypatch, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_models.image_classifier, model)
    settings = json.loads((model / "preprocessor_config.json").read_text())
    settings["size"] = {"height": 48, "width": 40}
    (model / "preprocessor_config.json").write_text(json.dumps(settings))
    opened = []
    monkeypatch.setattr(image_classification, "open_image", lambda *args: opened.append(args))
    data = image_parquet(tmp_path / "images.parquet", pictures)
    job = write_job(tmp_path, model, {"path": "parquet", "data_files": str(data)})
    assert run(job) == 2
    err = capsys.readouterr().err
    assert ("the image processor makes 48x40 images but the model expects 32x32 (config.image_size); use the image "
            "processor saved with this model") in err
    assert "Traceback" not in err
    assert opened == [] and not list((tmp_path / "out").glob("part-*"))


def test_one_image_the_processor_cannot_take_fails_alone():
    class Processor:
        """Stands in for an image processor that refuses images narrower than 4 pixels."""

        def __call__(self, images, return_tensors):
            if any(image.width < 4 for image in images):
                raise ValueError("too narrow")
            return {"pixel_values": torch.stack([torch.full((3, 2, 2), float(image.width)) for image in images])}

    encoder = ImageEncoder(Processor(), "image", torch.float32)
    table = pa.table({"image": [encoded(picture(1, (5, 5))), encoded(picture(2, (2, 5))), None,
                                encoded(picture(3, (6, 5)))]})
    result = encoder(table)
    assert result.errors == [None, "the image processor failed: ValueError: too narrow",
                             "image column 'image' is null", None]
    assert result.positions == [0, None, None, 1]
    assert result.pixels[:, 0, 0, 0].tolist() == [5.0, 6.0]


def test_a_processor_whose_output_size_follows_each_image_fails_the_odd_ones_out():
    class Processor:
        def __call__(self, images, return_tensors):
            return {"pixel_values": torch.stack([torch.zeros(3, image.height, image.width) for image in images])}

    encoder = ImageEncoder(Processor(), "image", torch.float32)
    result = encoder(pa.table({"image": [encoded(picture(n, size)) for n, size in
                                         enumerate([(4, 4), (4, 4), (5, 3), (4, 4)])]}))
    assert result.errors[2] == ("the image processor made a 3x5 image where the slice's first is 4x4; batchrun "
                                "needs an image processor with a fixed output size")
    assert result.positions == [0, 1, None, 2] and result.pixels.shape == (3, 3, 4, 4)


def test_a_batch_of_neighbouring_rows_is_a_view_of_the_slice():
    pixels = torch.arange(5 * 3 * 2 * 2, dtype=torch.float32).reshape(5, 3, 2, 2)
    encoded_images = EncodedImages([None, None, "bad", None, None, None], pixels, [0, 1, None, 2, 3, 4])
    encoder = ImageEncoder(None, "image", torch.float32)
    batch = encoder.collate(encoded_images, [3, 4])
    assert batch["pixel_values"].data_ptr() == pixels[2].data_ptr()  # no copy
    assert torch.equal(batch["pixel_values"], pixels[2:4])
    assert torch.equal(encoder.collate(encoded_images, [0, 5])["pixel_values"], pixels[[0, 4]])


def test_pixels_take_the_models_dtype(tiny_models):
    processor = AutoImageProcessor.from_pretrained(tiny_models.image_classifier)
    result = ImageEncoder(processor, "image", torch.bfloat16)(pa.table({"image": [encoded(picture(1))]}))
    assert result.pixels.dtype == torch.bfloat16 and result.pixels.shape == (1, 3, 32, 32)


def processed(processor, images: list[bytes]) -> torch.Tensor:
    """The processor's own pixels for these images, opened as the pipeline opens them."""
    return processor(images=[load_image(Image.open(io.BytesIO(data))) for data in images],
                     return_tensors="pt")["pixel_values"]


def odd_pictures() -> list[bytes]:
    """JPEGs and PNGs of every mode, sizes up and down, one rotated by EXIF."""
    images = [encoded(picture(seed, size, mode)) for seed, (size, mode) in
              enumerate([((40, 30), "RGB"), ((8, 8), "L"), ((90, 50), "RGBA"), ((17, 61), "P")])]
    images.append(encoded(picture(5, (64, 48), "CMYK"), "JPEG"))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    images.append(encoded(picture(7, (60, 20)), "JPEG", quality=85, exif=exif))
    return images


@pytest.mark.parametrize("settings", [
    {},  # the tiny ViT's: 32x32, bilinear, rescale, normalize with 0.5
    {"resample": 3, "do_center_crop": True, "size": {"height": 40, "width": 36},
     "crop_size": {"height": 31, "width": 32}, "image_mean": [0.485, 0.456, 0.406],
     "image_std": [0.229, 0.224, 0.225]},  # DeiT's steps: bicubic, then an odd centre crop
    {"do_rescale": False},
    {"do_normalize": False},
    {"do_rescale": False, "do_normalize": False, "resample": 0},
])
def test_the_direct_steps_give_the_processors_pixels_bit_for_bit(tiny_models, settings):
    processor = AutoImageProcessor.from_pretrained(tiny_models.image_classifier, **settings)
    encoder = ImageEncoder(processor, "image", torch.float32)
    assert encoder.direct is not None
    images = odd_pictures()
    result = encoder(pa.table({"image": images}))
    assert encoder.direct is not None  # its check passed: the rows went the direct way
    assert torch.equal(result.pixels, processed(processor, images))


def test_the_direct_steps_round_to_the_models_dtype_as_the_pipeline_does(tiny_models):
    processor = AutoImageProcessor.from_pretrained(tiny_models.image_classifier)
    images = odd_pictures()
    result = ImageEncoder(processor, "image", torch.bfloat16)(pa.table({"image": images}))
    assert result.pixels.dtype == torch.bfloat16
    assert torch.equal(result.pixels, processed(processor, images).to(torch.bfloat16))


def test_processors_whose_steps_are_not_known_run_as_they_are(tiny_models):
    from transformers import CLIPImageProcessorPil, ConvNextImageProcessorPil

    of = image_classification.DirectProcessing.of
    assert of(ConvNextImageProcessorPil()) is None  # its own resize (crop_pct)
    assert of(CLIPImageProcessorPil()) is None  # a shortest edge: the size follows the image
    assert of(AutoImageProcessor.from_pretrained(tiny_models.image_classifier, do_resize=False)) is None
    assert of(AutoImageProcessor.from_pretrained(tiny_models.image_classifier, do_pad=True)) is None
    assert of(AutoImageProcessor.from_pretrained(tiny_models.image_classifier, do_center_crop=True,
                                                 crop_size={"height": 40, "width": 40})) is None  # it pads
    assert of(object()) is None
    assert of(AutoImageProcessor.from_pretrained(tiny_models.image_classifier, resample=None)) is None

    class OwnResize(type(AutoImageProcessor.from_pretrained(tiny_models.image_classifier))):
        def resize(self, image, size, resample=None, **kwargs):
            return super().resize(image, size, resample, **kwargs)[:, ::-1]

    assert of(OwnResize(size={"height": 32, "width": 32})) is None  # a step of its own
    both = AutoImageProcessor.from_pretrained(tiny_models.image_classifier)
    both.size = SizeDict(height=32, width=32, shortest_edge=32)  # transformers resizes by the shortest edge then
    assert of(both) is None
    tall = AutoImageProcessor.from_pretrained(tiny_models.image_classifier, do_center_crop=True,
                                              crop_size={"height": 40, "width": 20})  # taller than the image: pads
    assert of(tall) is None
    whole = AutoImageProcessor.from_pretrained(tiny_models.image_classifier, do_center_crop=True,
                                               crop_size={"height": 32, "width": 32})  # the whole image: a crop
    assert of(whole) is not None
    odd = AutoImageProcessor.from_pretrained(tiny_models.image_classifier)
    odd.size = {"height": 32, "width": 32}  # a plain dict, where transformers 5 keeps a SizeDict
    assert of(odd) is None


def test_direct_steps_that_miss_the_processors_pixels_are_dropped_for_the_processor(tiny_models, monkeypatch,
                                                                                    caplog):
    processor = AutoImageProcessor.from_pretrained(tiny_models.image_classifier)
    encoder = ImageEncoder(processor, "image", torch.float32)
    encoder.direct.table[0] += 1e-6  # one channel off by a hair
    images = odd_pictures()
    with caplog.at_level("INFO", logger="batchrun"):
        result = encoder(pa.table({"image": images}))
    assert encoder.direct is None
    assert torch.equal(result.pixels, processed(processor, images))
    assert ("the image processor runs as it is: batchrun's direct steps for ViTImageProcessorPil did not give its "
            "pixels") in caplog.text


@contextmanager
def torch_threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def encoder_of(processor, direct: bool) -> ImageEncoder:
    """An encoder with its direct steps, or made to call the processor as it is."""
    encoder = ImageEncoder(processor, "image", torch.float32)
    if not direct:
        encoder.direct, encoder.checked = None, True
    return encoder


@pytest.fixture
def spied(monkeypatch) -> dict:
    """Which thread prepared each chunk (by its first row), and how often each row was opened."""
    seen: dict = {"threads": {}, "opened": []}
    chunk, opener = ImageEncoder._chunk, image_classification.open_image

    def spy_chunk(self, values, rows, stack):
        seen["threads"][rows[0]] = threading.current_thread().name
        return chunk(self, values, rows, stack)

    def spy_open(value, column):
        seen["opened"].append(value)
        return opener(value, column)

    monkeypatch.setattr(ImageEncoder, "_chunk", spy_chunk)
    monkeypatch.setattr(image_classification, "open_image", spy_open)
    return seen


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
def test_chunks_go_to_as_many_threads_as_torch_may_use_each_image_opened_once(tiny_models, spied, direct, threads):
    encoder = encoder_of(AutoImageProcessor.from_pretrained(tiny_models.image_classifier), direct)
    images = [encoded(picture(seed, (20, 30))) for seed in range(70)]  # chunks at rows 0, 16, 32, 48, 64
    with torch_threads(threads):
        encoder(pa.table({"image": images[:40]}))  # the first slice: the direct steps are checked on its first image
        spied["threads"].clear()
        spied["opened"].clear()
        encoder(pa.table({"image": images}))
    assert sorted(spied["opened"]) == sorted(images)  # each once
    names = spied["threads"]
    assert sorted(names) == [0, 16, 32, 48, 64]
    main = threading.current_thread().name
    if threads == 1:
        assert set(names.values()) == {main}
        return
    # the first chunk alone where the stack's size comes from the processor; every chunk in threads where it is known
    pooled = [row for row, name in names.items() if name.startswith("batchrun-images")]
    assert pooled == ([0, 16, 32, 48, 64] if direct else [16, 32, 48, 64])
    assert len({names[row] for row in pooled}) <= 2


def test_a_slice_of_bad_rows_only(tiny_models):
    processor = AutoImageProcessor.from_pretrained(tiny_models.image_classifier)
    result = ImageEncoder(processor, "image", torch.float32)(pa.table({"image": [None] * 20 + [b"no image"]}))
    assert result.errors == ["image column 'image' is null"] * 20 + ["image column 'image' holds no image PIL can read"]
    assert result.positions == [None] * 21 and result.pixels.numel() == 0


def test_the_processor_is_called_once_a_chunk_and_once_in_all_to_check_the_direct_steps(tiny_models, monkeypatch):
    processor = AutoImageProcessor.from_pretrained(tiny_models.image_classifier)
    calls = []

    class Counting:
        def __call__(self, images, return_tensors):
            calls.append(len(images))
            return processor(images=images, return_tensors=return_tensors)

    images = [encoded(picture(seed, (20, 30))) for seed in range(20)]
    direct = ImageEncoder(processor, "image", torch.float32)
    direct.processor = Counting()
    direct(pa.table({"image": images}))
    direct(pa.table({"image": images}))
    assert calls == [1]  # the check, on the first image; the direct steps for the rest
    calls.clear()
    plain = ImageEncoder(Counting(), "image", torch.float32)
    assert plain.direct is None
    plain(pa.table({"image": images}))
    assert calls == [16, 4]


def test_a_processor_that_takes_images_only_one_at_a_time_gives_their_pixels(tiny_models):
    processor = AutoImageProcessor.from_pretrained(tiny_models.image_classifier)

    class OneAtATime:
        def __call__(self, images, return_tensors):
            if len(images) > 1:
                raise ValueError("one image at a time")
            return processor(images=images, return_tensors=return_tensors)

    images = [encoded(picture(seed, (20 + seed, 30))) for seed in range(5)]
    result = ImageEncoder(OneAtATime(), "image", torch.float32)(pa.table({"image": images}))
    assert result.errors == [None] * 5
    assert torch.equal(result.pixels, processed(processor, images))


def test_an_image_the_direct_steps_cannot_resize_fails_alone(tiny_models, monkeypatch):
    processor = AutoImageProcessor.from_pretrained(tiny_models.image_classifier)
    encoder = ImageEncoder(processor, "image", torch.float32)
    resize = encoder.direct.resize

    def fussy(image):
        if image.size == (13, 13):
            raise ValueError("no 13x13 images")
        return resize(image)

    monkeypatch.setattr(encoder.direct, "resize", fussy)
    images = [encoded(picture(1, (20, 30))), encoded(picture(2, (13, 13))), encoded(picture(3, (30, 20)))]
    result = encoder(pa.table({"image": images}))
    assert result.errors == [None, "the image processor failed: ValueError: no 13x13 images", None]
    assert torch.equal(result.pixels, processed(processor, [images[0], images[2]]))


def test_direct_steps_that_raise_when_checked_are_dropped(tiny_models, monkeypatch):
    processor = AutoImageProcessor.from_pretrained(tiny_models.image_classifier)
    encoder = ImageEncoder(processor, "image", torch.float32)
    monkeypatch.setattr(encoder.direct, "pixels", lambda *args, **kwargs: 1 / 0)
    images = [encoded(picture(seed, (20, 30))) for seed in range(3)]
    result = encoder(pa.table({"image": images}))
    assert encoder.direct is None and torch.equal(result.pixels, processed(processor, images))


def test_a_processor_without_direct_steps_is_not_checked(caplog):
    class Processor:
        def __call__(self, images, return_tensors):
            return {"pixel_values": torch.zeros(len(images), 3, 2, 2)}

    with caplog.at_level("INFO", logger="batchrun"):
        result = ImageEncoder(Processor(), "image", torch.float32)(pa.table({"image": [encoded(picture(1))]}))
    assert result.pixels.shape == (1, 3, 2, 2) and "direct steps" not in caplog.text


@pytest.mark.parametrize("direct", [True, False])
def test_threads_give_the_pixels_and_errors_of_one_thread(tiny_models, direct):
    processor = AutoImageProcessor.from_pretrained(tiny_models.image_classifier)
    images = [encoded(picture(seed, (20 + seed, 30))) for seed in range(70)]  # 5 chunks of 16
    images[3], images[40], images[41] = None, b"not an image", encoded(picture(1))[:60]  # in three chunks
    table = pa.table({"image": images})
    results = {}
    for count in (1, 3):
        with torch_threads(count):
            results[count] = encoder_of(processor, direct)(table)
    one, three = results[1], results[3]
    assert three.errors == one.errors and three.positions == one.positions
    assert [n for n, error in enumerate(one.errors) if error] == [3, 40, 41]
    assert torch.equal(three.pixels, one.pixels) and len(one.pixels) == 67
    good = [data for data in images if data is not None and data != b"not an image" and len(data) > 60]
    assert torch.equal(one.pixels, processed(processor, good))


def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_models):
    # 36 JPEGs of 800x600 in 12 parts of 3: decoding them takes long enough to kill the run between parts
    images = [encoded(picture(seed, (800, 600)), "JPEG", quality=90) for seed in range(36)]
    data = image_parquet(tmp_path / "images.parquet", images)
    dataset = {"path": "parquet", "data_files": str(data), "keep_columns": ["id"]}

    def job(name: str) -> Path:
        return write_job(tmp_path / name, tiny_models.image_classifier, dataset, rows_per_part=3, num_workers=1,
                         max_batch_size=3)

    reference_job = job("reference")
    assert run(reference_job) == 0
    killed = job("killed")
    out = killed.parent / "out"
    stamps: dict = {}
    for attempt, kill_at in enumerate((1, 6)):
        process = kill_when_committed(killed, kill_at, tmp_path / f"attempt-{attempt}.log")
        now = committed(out)
        assert process.returncode == -signal.SIGKILL, (tmp_path / f"attempt-{attempt}.log").read_text()
        assert kill_at <= len(now) < 12 and not (out / "_SUCCESS").exists()
        assert {name: now[name] for name in stamps} == stamps  # no attempt rewrote a part committed before it
        stamps = now
    process = start(killed)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    final = committed(out)
    assert len(final) == 12 and {name: final[name] for name in stamps} == stamps
    pd.testing.assert_frame_equal(pd.read_parquet(out), pd.read_parquet(reference_job.parent / "out"))


def test_a_missing_image_column_exits_2_naming_the_key(tmp_path, tiny_models, pictures, capsys):
    data = image_parquet(tmp_path / "images.parquet", pictures[:2])
    job = write_job(tmp_path, tiny_models.image_classifier,
                    {"path": "parquet", "data_files": str(data), "image_column": "picture"})
    assert run(job) == 2
    assert ("has no column 'picture'; its columns are id, image (check dataset.image_column and "
            "dataset.keep_columns)") in capsys.readouterr().err


def test_an_image_changed_in_a_directory_dataset_stops_the_resume(tmp_path, tiny_models, capsys):
    root = tmp_path / "photos"
    (root / "a").mkdir(parents=True)
    for seed in range(3):
        picture(seed).save(root / "a" / f"{seed}.png")
    job = write_job(tmp_path, tiny_models.image_classifier, {"path": str(root)})
    assert run(job) == 0
    assert len(pd.read_parquet(tmp_path / "out")) == 3
    picture(9, (50, 50)).save(root / "a" / "1.png")  # another picture under the same name
    assert run(job) == 2
    assert "input files changed: " in capsys.readouterr().err


def test_without_pillow_an_image_job_exits_2_naming_the_extra(tmp_path, tiny_models, monkeypatch, capsys):
    from pipeline_core.initializer import components

    find_spec = components.importlib.util.find_spec
    monkeypatch.setattr(components.importlib.util, "find_spec",
                        lambda name, *args: None if name == "PIL" else find_spec(name, *args))
    job = write_job(tmp_path, tiny_models.image_classifier, {"path": "json", "data_files": "x.jsonl"})
    assert run_cli(["plan", str(job)]) == 2
    assert 'image-classification reads images with Pillow, which is not installed: pip install "batchrun[images]"' in (
        capsys.readouterr().err)


def test_max_tokens_counts_each_image_as_one(tmp_path, tiny_models, pictures, monkeypatch):
    forward = image_classification.ImageClassificationTask.forward
    seen = []

    def counting(task, model, inputs):
        seen.append(len(inputs["pixel_values"]))
        return forward(task, model, inputs)

    monkeypatch.setattr(image_classification.ImageClassificationTask, "forward", counting)
    data = image_parquet(tmp_path / "images.parquet", pictures[:8])
    job = write_job(tmp_path, tiny_models.image_classifier, {"path": "parquet", "data_files": str(data)},
                    rows_per_part=8, max_batch_size=64, max_tokens=3)
    assert run(job) == 0
    assert seen == [3, 3, 2]


def test_out_of_memory_halves_the_images_per_batch_and_a_failing_image_fails_alone(tmp_path, tiny_models, pictures,
                                                                                   monkeypatch, caplog):
    forward = image_classification.ImageClassificationTask.forward
    seen = []

    def small_device(task, model, inputs):
        pixels = inputs["pixel_values"]
        seen.append(len(pixels))
        if len(pixels) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
        if (pixels[:, 0, 0, 0] == poison).any():
            raise RuntimeError("this image breaks the model")
        return forward(task, model, inputs)

    processor = AutoImageProcessor.from_pretrained(tiny_models.image_classifier)
    poison = processor(images=load_image(Image.open(io.BytesIO(pictures[5]))), return_tensors="pt")[
        "pixel_values"][0, 0, 0, 0].item()
    monkeypatch.setattr(image_classification.ImageClassificationTask, "forward", small_device)
    data = image_parquet(tmp_path / "images.parquet", pictures)
    job = write_job(tmp_path, tiny_models.image_classifier, {"path": "parquet", "data_files": str(data)},
                    rows_per_part=8)
    assert run(job) == 0
    expected = reference(tiny_models.image_classifier, pictures)
    expected[5] = None
    result = pd.read_parquet(tmp_path / "out")
    assert_matches(result, expected)
    assert result["error"][5] == "forward pass failed: RuntimeError: this image breaks the model"
    assert seen[0] == 4 and max(seen[1:]) <= 2  # after the first OOM, batches of at most half as many images
    assert "batching.max_tokens is now 2 for this run" in caplog.text

"""CLIP's pictures as tensors: the crop geometry of the PIL path they replaced, and open_clip's preprocessing."""

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.clip_input import ClipTransform, image_tensor, square_crop
from pipeline.core.imaging import PAD_COLOR
from pipeline.core.stages.embed import Embedder
from tests.bench.bench_prep import pil_square_crop
from tests.conftest import noise_image

CPU = torch.device("cpu")
WIDTH, HEIGHT = 48, 40
INSIDE = {
    "touching-top-left": (0, 0, 12, 7),
    "touching-bottom-right": (30, 25, 48, 40),
    "whole-image": (0, 0, 48, 40),
    "last-pixel": (47, 39, 48, 40),
    "one-pixel": (10, 10, 11, 11),
    "under-a-pixel": (10.2, 10.1, 10.4, 10.3),  # rounds to nothing: widened to one pixel
    "rounded-corners": (9.5, 10.5, 20.49, 30.51),  # Python's rounding: 10, 10, 20, 31
    "tall": (4, 2, 9, 30),
}
OUTSIDE = {
    "over-top-left": (-5, -3, 10, 8),
    "over-bottom-right": (40, 30, 60, 45),
    "wider-than-the-image": (-2, 5, 50, 12),
    "under-a-pixel-past-the-corner": (47.6, 39.6, 47.9, 39.9),  # widened to the pixel just outside
}


def on_padding(image: Image.Image, margin: int) -> Image.Image:
    """`image` on a PAD_COLOR border `margin` wide: the reference for boxes reaching outside the image."""
    canvas = Image.new("RGB", (image.width + 2 * margin, image.height + 2 * margin), PAD_COLOR)
    canvas.paste(image, (margin, margin))
    return canvas


def as_array(crop: torch.Tensor) -> np.ndarray:
    return crop.permute(1, 2, 0).numpy()


@pytest.mark.parametrize("box", INSIDE.values(), ids=INSIDE.keys())
def test_a_tensor_crop_inside_the_image_is_the_pil_crop(box):
    image = noise_image(4, WIDTH, HEIGHT)
    crop = square_crop(image_tensor(image, CPU), box)
    assert crop.dtype == torch.uint8
    assert (as_array(crop) == np.asarray(pil_square_crop(image, box))).all()


@pytest.mark.parametrize("box", OUTSIDE.values(), ids=OUTSIDE.keys())
def test_the_part_of_a_box_outside_the_image_is_padding(box):
    # Pillow's crop filled it with black; the tensor crop pads it like the rest of the square.
    image = noise_image(5, WIDTH, HEIGHT)
    margin = 32
    shifted = tuple(v + margin for v in box)
    crop = as_array(square_crop(image_tensor(image, CPU), box))
    assert (crop == np.asarray(pil_square_crop(on_padding(image, margin), shifted))).all()


def test_a_box_over_the_left_edge_is_padded_where_the_image_ends():
    pixels = np.asarray(noise_image(6, WIDTH, HEIGHT))
    crop = as_array(square_crop(torch.from_numpy(pixels.copy()).permute(2, 0, 1), (-4, 0, 4, 8)))
    assert crop.shape == (8, 8, 3)
    assert (crop[:, :4] == PAD_COLOR).all() and (crop[:, 4:] == pixels[0:8, 0:4]).all()


@pytest.fixture(scope="module")
def reference(tiny_detector):
    """open_clip's own eval transform (the PIL path the embedder used) for the tiny CLIP."""
    import open_clip

    embedder = tiny_detector.embedder
    _, _, preprocess = open_clip.create_model_and_transforms(
        f"local-dir:{embedder.located.path}", force_quick_gelu=True
    )
    embedder.load()
    return preprocess


def smooth_image(seed: int, width: int, height: int) -> Image.Image:
    """Noise blown up from an eighth of the size: edges and gradients, like a photo more than noise is."""
    return noise_image(seed, max(1, width // 8), max(1, height // 8)).resize((width, height), Image.BICUBIC)


SIZES = [(96, 72), (50, 120), (64, 64), (300, 200), (1000, 700), (33, 20), (7, 5)]


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
@pytest.mark.parametrize("make", [noise_image, smooth_image], ids=["noise", "smooth"])
def test_tensor_preprocessing_matches_open_clips(tiny_detector, reference, size, make):
    # Within one 8-bit level anywhere (rounding of the filter's sums), and equal almost everywhere.
    embedder = tiny_detector.embedder
    image = make(7, *size)
    expected = reference(image)
    got = embedder.transform([image_tensor(image, CPU)])[0]
    assert got.shape == expected.shape and got.dtype == torch.float32
    difference = (got - expected).abs()
    one_level = 1 / 255 / min(embedder.transform.std)
    assert float(difference.max()) <= one_level + 1e-5
    assert float((difference > 1e-4).float().mean()) < 0.01
    with torch.inference_mode():
        both = embedder.model.encode_image(torch.stack([got, expected]))
    assert float(torch.nn.functional.cosine_similarity(both[:1], both[1:])) >= 0.999


def test_embedded_crops_match_the_pil_path(tiny_detector, reference):
    embedder = tiny_detector.embedder
    image = smooth_image(8, 300, 200)
    boxes = [(10, 20, 110, 60), (250, 150, 300, 200), (0, 0, 300, 200)]
    rows = embedder.embed_images([image], [boxes])
    pictures = [image] + [pil_square_crop(image, box) for box in boxes]
    with torch.inference_mode():
        expected = embedder.model.encode_image(torch.stack([reference(p) for p in pictures]))
    assert rows.shape == (1 + len(boxes), embedder.dim)
    assert (torch.nn.functional.cosine_similarity(rows, expected) >= 0.999).all()


def test_rows_come_whole_image_first_then_its_crops_in_order(tiny_detector):
    embedder = tiny_detector.embedder
    images = [smooth_image(seed, 90 + 6 * seed, 70) for seed in range(3)]
    boxes = [[(5, 5, 40, 30)], [], [(0, 10, 20, 60), (50, 0, 100, 70)]]
    rows = embedder.embed_images(images, boxes)
    assert rows.shape == (6, embedder.dim)
    wholes = embedder.embed_images(images)
    assert torch.allclose(rows[[0, 2, 3]], wholes, atol=1e-5)
    assert torch.allclose(rows[5], embedder.embed_images([images[2]], [[boxes[2][1]]])[1], atol=1e-5)


class _SmallGpuEmbedder(Embedder):
    """The real embedder on a device that (as a GPU would) runs out of memory on runs of more than 2 pictures."""

    calls: list[int]

    def _encode_pictures(self, pictures):
        self.calls.append(len(pictures))
        if len(pictures) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super()._encode_pictures(pictures)


def test_crops_are_batched_by_batch_size_and_halved_out_of_memory(tiny_detector):
    images = [smooth_image(seed, 80, 60) for seed in range(3)]
    boxes = [[(0, 0, 30, 30), (10, 10, 70, 50)]] * 3  # 9 pictures in all
    reference_rows = tiny_detector.embedder.embed_images(images, boxes)
    small = _SmallGpuEmbedder(tiny_detector.embedder.located, CPU)
    small.calls = []
    small.params["batch_size"] = 4
    assert torch.allclose(small.embed_images(images, boxes), reference_rows, atol=1e-5)
    assert small.calls == [4, 2, 2, 2, 2, 1] and small.batch_size == 2  # halved until it fitted, then kept


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_cuts_and_preprocesses_like_the_cpu(tiny_detector):
    transform = tiny_detector.embedder.transform
    image = smooth_image(9, 300, 200)
    box = (10, -5, 120, 60)
    on_cpu = transform([square_crop(image_tensor(image, CPU), box)])
    on_gpu = transform([square_crop(image_tensor(image, torch.device("cuda")), box)]).cpu()
    assert float((on_cpu - on_gpu).abs().max()) <= 1 / 255 / min(transform.std) + 1e-5


def test_a_preprocessing_the_tensor_path_does_not_reproduce_is_refused():
    from types import SimpleNamespace

    config = {"size": (64, 64), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bicubic"}
    assert ClipTransform.of(SimpleNamespace(visual=SimpleNamespace(preprocess_cfg={**config, "resize_mode": "squash"})))
    with pytest.raises(ValueError, match="resize_mode"):
        ClipTransform.of(SimpleNamespace(visual=SimpleNamespace(preprocess_cfg={**config, "resize_mode": "longest"})))

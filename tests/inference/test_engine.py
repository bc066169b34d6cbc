"""The inference engines against transformers' model on the same weights (the independent
reference), and ``labels_from_logits`` against upsample-then-argmax."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

import segformer
from segformer.errors import CheckpointError, SegformerError
from segformer.inference import engine as engine_module
from segformer.inference import labels as labels_module
from segformer.inference.backends.compiled import CompiledEngine
from segformer.inference.backends.pytorch import TorchEngine
from segformer.inference.engine import BACKENDS, create_engine, default_backend
from segformer.inference.labels import labels_from_logits
from segformer.models.fast import FastSegformer
from tests.conftest import CITYSCAPES_B0, CITYSCAPES_SAMPLE, rel, tiny_reference


def reference_labels(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False).argmax(dim=1)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """transformers' model with randomised norms and BatchNorm statistics (so the decoder
    folding has something to fold) and ours loaded from its files: the same weights."""
    reference = tiny_reference(depths=(1, 2, 1, 1))
    folder = tmp_path_factory.mktemp("tiny")
    reference.save_pretrained(folder)
    return reference, segformer.load(folder), folder


def expected_logits(reference, pixels: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return reference(pixel_values=pixels).logits


@pytest.mark.parametrize("backend", ["eager", "fast"])
@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (2, 3, 67, 45), (1, 3, 33, 97)])
def test_torch_backends_match_transformers(pair, backend, shape):
    reference, model, _ = pair
    pixels = torch.randn(*shape)
    engine = create_engine(model, backend=backend)
    logits = engine(pixels)
    expected = expected_logits(reference, pixels)
    assert engine.backend == backend
    assert logits.dtype == torch.float32
    assert logits.shape == expected.shape == (shape[0], 5, -(-shape[2] // 4), -(-shape[3] // 4))
    assert logits.is_contiguous()
    assert rel(logits, expected) <= 1e-5


def test_fast_module_shares_encoder_and_folds_decoder(pair):
    _, model, _ = pair
    fast = FastSegformer(model)
    assert fast.encoder is model.encoder  # no copy of the encoder's weights
    # The fold is the decoder's only state: one matrix per stage, a bias, the classifier.
    widths = [fast.decoder.get_buffer(f"stage{i}_weight").shape for i in range(4)]
    assert widths == [(16, 8), (16, 16), (16, 24), (16, 32)]


def test_bf16_eager_is_close(pair):
    reference, model, _ = pair
    pixels = torch.randn(1, 3, 64, 64)
    logits = create_engine(model, backend="fast", precision="bf16")(pixels)
    assert logits.dtype == torch.float32
    assert rel(logits, expected_logits(reference, pixels)) < 5e-2


@pytest.mark.slow
def test_compiled_backend(pair, tmp_path, monkeypatch):
    """One compilation (tiny model, one input size; compiling takes most of a minute on a
    small CPU): the compiled program computes transformers' function, any batch size runs
    through it, and a second engine loads it from the cache instead of compiling again."""
    monkeypatch.setenv("SEGFORMER_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    reference, model, _ = pair
    engine = create_engine(model, backend="compiled", precision="fp32", dynamic=False)
    assert isinstance(engine, CompiledEngine)
    for batch in (2, 1, 3):
        pixels = torch.randn(batch, 3, 64, 64)
        assert rel(engine(pixels), expected_logits(reference, pixels)) <= 1e-5
    packages = list((tmp_path / "compiled").glob("*.pt2"))
    assert [p.name for p in packages] == [engine.package_path((64, 64)).name]

    again = create_engine(model, backend="compiled", precision="fp32", dynamic=False)
    pixels = torch.randn(1, 3, 64, 64)
    assert torch.equal(again(pixels), engine(pixels))
    assert list((tmp_path / "compiled").glob("*.pt2")) == packages  # loaded, not compiled again


def test_half_precision_program_before_compilation(pair):
    """What the compiled bf16 engine compiles, run as it is: bf16 weights and activations with
    attention as explicit matmuls, float32 in and out; the caller's model stays float32."""
    reference, model, _ = pair
    engine = CompiledEngine(model, "bf16", torch.device("cpu"))
    module = engine._compiled_module()
    pixels = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        logits = module(pixels)
    assert logits.dtype == torch.float32
    assert 0 < rel(logits, expected_logits(reference, pixels)) < 5e-2
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert engine.package_path((64, 64)) != engine.package_path(None)


def test_onnxruntime_backend(pair, tmp_path, monkeypatch):
    """Given a model, the onnxruntime backend exports it into the cache once and runs it."""
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("SEGFORMER_CACHE", str(tmp_path))
    reference, model, _ = pair
    engine = create_engine(model, backend="onnxruntime")
    assert engine.backend == "onnxruntime"
    for shape in [(1, 3, 64, 64), (3, 3, 51, 70)]:
        pixels = torch.randn(*shape)
        assert rel(engine(pixels), expected_logits(reference, pixels)) <= 1e-4
    exported = list((tmp_path / "onnx").glob("*.onnx"))
    assert len(exported) == 1
    again = create_engine(str(exported[0]), backend="auto")  # an .onnx path selects onnxruntime
    assert again.backend == "onnxruntime" and again.model is None
    assert list((tmp_path / "onnx").glob("*.onnx")) == exported


def test_auto_backend_choice(pair, monkeypatch):
    """Without x86 OpenVINO (tests/inference/test_openvino.py covers it): fast for fp32,
    compiled for bf16 on the CPU, fast on CUDA."""
    _, model, _ = pair
    monkeypatch.setattr(engine_module, "_x86", lambda: False)
    cpu = torch.device("cpu")
    assert default_backend("fp32", cpu) == "fast"
    assert default_backend("bf16", cpu) == "compiled"
    assert default_backend("bf16", torch.device("cuda")) == "fast"
    assert default_backend("int8", cpu) == "openvino"
    engine = create_engine(model)
    assert (
        isinstance(engine, TorchEngine) and engine.backend == "fast" and engine.precision == "fp32"
    )
    # Creating a compiled engine compiles nothing yet: that happens on the first call.
    assert create_engine(model, precision="bfloat16").backend == "compiled"
    assert create_engine(model, backend="optimized").backend == "fast"
    assert set(BACKENDS) == {"eager", "fast", "compiled", "onnxruntime", "openvino"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backend": "tensorrt"}, "unknown backend"),
        ({"precision": "int4"}, "unknown precision"),
        ({"precision": "fp16"}, "fp16 is for CUDA"),
        ({"backend": "onnxruntime", "precision": "bf16"}, "fp32 only"),
        ({"backend": "compiled", "precision": "int8"}, "int8 runs with the openvino backend"),
        ({"backend": "openvino", "device": "meta"}, "runs on the CPU"),
        ({"device": "tpu"}, "unknown device"),
    ],
)
def test_bad_engine_options(pair, kwargs, message):
    _, model, _ = pair
    with pytest.raises(SegformerError, match=message):
        create_engine(model, **kwargs)


def test_engine_refuses_what_it_cannot_run(pair, tiny_config, tmp_path):
    _, model, _ = pair
    with pytest.raises(CheckpointError, match="semantic-segmentation"):
        create_engine(segformer.SegformerForImageClassification(tiny_config))
    with pytest.raises(SegformerError, match="onnxruntime backend"):
        create_engine(str(tmp_path / "model.onnx"), backend="fast")
    with pytest.raises(CheckpointError, match="no such ONNX file"):
        create_engine(str(tmp_path / "model.onnx"))
    with pytest.raises(SegformerError, match="batch, channels, height, width"):
        create_engine(model)(torch.randn(3, 32, 32))


# ---------------------------------------------------------------------------------------
# labels_from_logits
# ---------------------------------------------------------------------------------------
def _cases():
    generator = torch.Generator().manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    def smooth(k, h, w, scale=5.0):
        return F.interpolate(
            randn(2, k, 3, 4) * scale, size=(h, w), mode="bilinear", align_corners=False
        )

    yield "random", randn(2, 19, 32, 32), (128, 128)
    yield "smooth", smooth(19, 40, 30), (161, 117)
    yield "many classes", smooth(150, 32, 32), (100, 140)
    yield "ties everywhere", randn(2, 7, 20, 25).round(), (90, 83)
    duplicated = smooth(6, 24, 24)
    duplicated[:, 4] = duplicated[:, 1]  # two classes with identical logits: argmax takes the first
    yield "duplicate class", duplicated, (97, 101)
    constant = torch.zeros(1, 5, 16, 16)
    yield "all equal", constant, (64, 80)
    yield "two classes", smooth(2, 17, 13), (255, 131)
    yield "three classes", smooth(3, 17, 13), (120, 90)
    yield "odd upsampling", smooth(11, 13, 29), (103, 229)
    yield "downsampling", smooth(9, 80, 90), (61, 70)
    yield "same size", smooth(9, 70, 90), (70, 90)
    yield "one row", smooth(8, 1, 40), (3, 160)
    yield "single pixel", randn(1, 8, 1, 1), (90, 90)
    yield "small output", smooth(10, 20, 20), (50, 60)
    yield "one class", randn(1, 1, 8, 8), (40, 40)
    big = smooth(19, 64, 64, scale=40.0)
    yield "large logits", big, (480, 640)
    yield (
        "channels last",
        smooth(12, 20, 30).contiguous(memory_format=torch.channels_last),
        (80, 120),
    )
    yield "float64", smooth(12, 20, 30).double(), (80, 120)


@pytest.mark.parametrize(("name", "logits", "size"), list(_cases()), ids=[c[0] for c in _cases()])
def test_labels_identical_to_upsample_then_argmax(name, logits, size):
    labels = labels_from_logits(logits, size)
    assert labels.dtype == torch.int64
    assert torch.equal(labels, reference_labels(logits, size))


@pytest.mark.parametrize("chunk", [1 << 21, 37])
def test_labels_identical_on_varied_logits(chunk, monkeypatch):
    """Many shapes, class counts, ties and duplicated classes, with the per-pixel work done in
    one piece and in chunks of a few dozen (pixel, class) pairs."""
    monkeypatch.setattr(labels_module, "_VALUES_PER_CHUNK", chunk)
    generator = torch.Generator().manual_seed(chunk)

    def draw(low, high):
        return int(torch.randint(low, high, (1,), generator=generator))

    for case in range(60):
        classes, h, w = draw(2, 40), draw(2, 40), draw(2, 40)
        size = (draw(h, 6 * h + 70), draw(w, 6 * w + 70))
        coarse = torch.randn(1, classes, max(2, h // 4), max(2, w // 4), generator=generator)
        logits = F.interpolate(coarse * 8, size=(h, w), mode="bilinear", align_corners=False)
        if case % 5 == 0:
            logits = logits.round()  # ties
        if case % 7 == 0:
            logits[:, classes // 2] = logits[:, 0]  # a duplicated class: argmax takes the first
        logits = logits.contiguous()
        assert torch.equal(labels_from_logits(logits, size), reference_labels(logits, size)), case


@pytest.mark.parametrize("threads", [1, 2])
def test_labels_identical_with_thread_counts(threads):
    # PyTorch's choice of interpolation kernel depends on the thread count for three channels.
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(threads)
        for classes in (3, 4, 5):
            logits = torch.randn(1, classes, 30, 30, generator=generator)
            assert torch.equal(
                labels_from_logits(logits, (150, 130)), reference_labels(logits, (150, 130))
            )
    finally:
        torch.set_num_threads(saved)


def test_labels_with_non_finite_logits():
    logits = torch.randn(1, 6, 20, 20)
    logits[0, 2, 5, 5] = float("inf")
    logits[0, 3, 9, 9] = float("nan")
    assert torch.equal(labels_from_logits(logits, (120, 90)), reference_labels(logits, (120, 90)))


def test_labels_bad_input():
    with pytest.raises(SegformerError, match="batch, classes"):
        labels_from_logits(torch.randn(5, 8, 8), (16, 16))
    with pytest.raises(SegformerError, match="positive"):
        labels_from_logits(torch.randn(1, 5, 8, 8), (0, 16))


@pytest.mark.shared
def test_real_weights_fast_engine_and_labels():
    """The real Cityscapes B0 on a real street photo: the fast engine within 1e-5 of
    transformers, and full-resolution labels identical to upsample-then-argmax."""
    from segformer.inference.processing import ImageProcessor, read_image

    model = segformer.load(CITYSCAPES_B0)
    reference = transformers.SegformerForSemanticSegmentation.from_pretrained(CITYSCAPES_B0).eval()
    image = read_image(CITYSCAPES_SAMPLE / "stuttgart_demo_1024x512.png")
    pixels = ImageProcessor.from_model(model)(image)["pixel_values"]
    logits = create_engine(model, backend="fast")(pixels)
    expected = expected_logits(reference, pixels)
    assert rel(logits, expected) <= 1e-5
    for size in [(image.height, image.width), (480, 640), (333, 517)]:
        assert torch.equal(labels_from_logits(logits, size), reference_labels(logits, size))
    road, car, sky = 0, 13, 10
    present = set(labels_from_logits(logits, (image.height, image.width)).unique().tolist())
    assert {road, car, sky} <= present

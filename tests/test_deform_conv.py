"""DCNv2 layer: the fast CPU path must reproduce torchvision.ops.deform_conv2d, grads included."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision.ops

import models.deform_conv as dc
from models.deform_conv import DeformableConv2d, _sampling_plan, deform_backend, deform_conv2d, deform_conv2d_fast

TOL = dict(rtol=1e-5, atol=1e-5)


def make_inputs(b, cin, cout, h, w, stride=1, padding=1, dilation=1, k=3, bias=False,
                dtype=torch.float32, seed=0):
    """Random input/weights, offsets up to ~3 px (many samples leave the image), random masks."""
    gen = torch.Generator().manual_seed(seed)
    ho = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    wo = (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    x = torch.randn(b, cin, h, w, generator=gen, dtype=dtype)
    offset = (torch.rand(b, 2 * k * k, ho, wo, generator=gen, dtype=dtype) * 6 - 3)
    mask = torch.rand(b, k * k, ho, wo, generator=gen, dtype=dtype) * 2
    weight = torch.randn(cout, cin, k, k, generator=gen, dtype=dtype) / (cin * k * k) ** 0.5
    b_ = torch.randn(cout, generator=gen, dtype=dtype) if bias else None
    tensors = [t.requires_grad_() for t in (x, offset, mask, weight, b_) if t is not None]
    return tensors, (stride, padding, dilation)


def run(fn, tensors, conv, grad_out):
    x, offset, mask, weight = tensors[:4]
    bias = tensors[4] if len(tensors) > 4 else None
    stride, padding, dilation = conv
    y = fn(x, offset, weight, bias, stride, padding, dilation, mask)
    grads = torch.autograd.grad(y, tensors, grad_out)
    return y, grads


def torchvision_fn(x, offset, weight, bias, stride, padding, dilation, mask):
    return torchvision.ops.deform_conv2d(
        x, offset, weight, bias, (stride, stride), (padding, padding), (dilation, dilation), mask
    )


@pytest.fixture(params=[None, 1, 2], ids=["auto-chunks", "1-tap-chunks", "2-tap-chunks"])
def taps_per_chunk(request, monkeypatch):
    """Large maps go one tap at a time, tiny test maps all at once: exercise both (and uneven)."""
    step = request.param
    if step is not None:
        monkeypatch.setattr(dc, "_tap_chunks", lambda taps, n, width: [
            (t, min(t + step, taps)) for t in range(0, taps, step)])
    return step


@pytest.mark.parametrize(
    "b,cin,cout,h,w,stride,bias",
    [
        (2, 8, 4, 7, 9, 1, False),  # Cout < Cin: channels mixed before sampling
        (2, 4, 8, 9, 7, 1, False),  # Cout > Cin: sampled, then mixed
        (2, 5, 5, 11, 6, 1, True),
        (1, 13, 13, 5, 5, 1, False),  # FeatherFace C=52 quarter width, odd map
        (2, 6, 6, 9, 8, 2, True),  # stride 2
        (2, 12, 3, 10, 7, 2, False),
    ],
)
def test_fast_matches_torchvision_values_and_grads(
    b, cin, cout, h, w, stride, bias, taps_per_chunk
):
    tensors, conv = make_inputs(b, cin, cout, h, w, stride=stride, bias=bias)
    offset = tensors[1].detach()
    # The inputs must include samples falling outside the image (rows here; padding 1).
    ho, wo = offset.shape[2:]
    tap_row = torch.arange(3).repeat_interleave(3).view(1, 9, 1, 1)
    ys = torch.arange(ho).view(1, 1, ho, 1) * stride - 1 + tap_row + offset[:, 0::2]
    assert ((ys <= -1) | (ys >= h)).any() and ((ys > 0) & (ys < h - 1)).any()
    grad_out = torch.randn(b, cout, ho, wo, generator=torch.Generator().manual_seed(1))
    ref, ref_grads = run(torchvision_fn, tensors, conv, grad_out)
    out, grads = run(deform_conv2d_fast, tensors, conv, grad_out)
    torch.testing.assert_close(out, ref, **TOL)
    for name, g, g_ref in zip(("x", "offset", "mask", "weight", "bias"), grads, ref_grads):
        torch.testing.assert_close(g, g_ref, **TOL, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize(
    "b,cin,cout,h,w,stride,bias,channels_last",
    [
        (2, 8, 5, 7, 9, 1, False, False),  # samples Cin channels, then mixes
        (2, 12, 3, 10, 7, 2, True, False),  # 2 Cout <= Cin: mixes first, one bag sums every tap
        (1, 52, 13, 9, 11, 1, True, True),  # FeatherFace's 52 -> 13 SSH layer, channels-last
        (1, 52, 26, 8, 7, 1, False, True),  # and its 52 -> 26 layer (mixes first too)
        (2, 13, 13, 5, 6, 1, False, True),
        (2, 6, 6, 9, 8, 2, True, True),
    ],
)
def test_inference_path_matches_torchvision(b, cin, cout, h, w, stride, bias, channels_last, monkeypatch):
    """Without autograd the fast path samples with embedding_bag (`_deform_conv2d_inference`)."""
    tensors, conv = make_inputs(b, cin, cout, h, w, stride=stride, bias=bias)
    x, offset, mask, weight = (t.detach() for t in tensors[:4])
    b_ = tensors[4].detach() if bias else None
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref = torchvision_fn(x, offset, weight, b_, *conv, mask)

    def autograd_path(*args):
        raise AssertionError("the autograd path ran without autograd")

    monkeypatch.setattr(dc._DeformConv2dFast, "apply", autograd_path)
    out = deform_conv2d_fast(x, offset, weight, b_, *conv, mask)
    torch.testing.assert_close(out, ref, **TOL)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    with torch.no_grad():  # inputs that require grad, under no_grad: still the inference path
        torch.testing.assert_close(deform_conv2d_fast(x.requires_grad_(), offset, weight, b_, *conv, mask), ref, **TOL)


@pytest.mark.parametrize(
    "b,cin,couts,h,w,stride,bias,channels_last",
    [
        (1, 52, (26, 13), 9, 11, 1, True, True),  # V1 SSH's first pair: both mix first
        (2, 13, (13, 13), 7, 6, 1, False, True),  # its second pair: both sample first, one bag call
        (2, 12, (3, 8), 8, 7, 2, True, False),  # one of each: a plan per layer
        (2, 6, (5, 6, 7), 9, 8, 1, False, False),  # three siblings
    ],
)
def test_siblings_match_each_layer_through_torchvision(b, cin, couts, h, w, stride, bias, channels_last, monkeypatch):
    """`deform_conv2d_siblings` without autograd: one sampling plan for layers reading the same
    input; each output equals torchvision's for that layer alone."""
    layers = [make_inputs(b, cin, cout, h, w, stride=stride, bias=bias, seed=i)[0] for i, cout in enumerate(couts)]
    conv = (stride, 1, 1)
    x = layers[0][0].detach()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    offsets = torch.cat([t[1].detach() for t in layers], 1)
    offsets[:, :4, :2, :2] = 1e6  # samples far outside: zeros, as torchvision
    masks = torch.cat([t[2].detach() for t in layers], 1)
    weights = [t[3].detach() for t in layers]
    biases = [t[4].detach() if bias else None for t in layers]
    taps = 9
    refs = [torchvision_fn(x, offsets[:, 2 * taps * g:2 * taps * (g + 1)], weights[g], biases[g], *conv,
                           masks[:, taps * g:taps * (g + 1)]) for g in range(len(couts))]
    plans = []
    real_plan = dc._sampling_plan
    monkeypatch.setattr(dc, "_sampling_plan", lambda *a, **k: plans.append(k["layers"]) or real_plan(*a, **k))
    monkeypatch.setattr(dc._DeformConv2dFast, "apply", lambda *a: pytest.fail("the autograd path ran"))
    outs = dc.deform_conv2d_siblings(x, offsets, masks, weights, biases, *conv)
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, **TOL)
        assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    mixed = len({2 * c <= cin for c in couts}) > 1
    assert plans == ([1] * len(couts) if mixed else [len(couts)])


def test_siblings_with_autograd_run_each_layer():
    tensors = [make_inputs(2, 6, 4, 7, 5, seed=i)[0] for i in range(2)]
    x = tensors[0][0]
    offsets, masks = torch.cat([t[1] for t in tensors], 1), torch.cat([t[2] for t in tensors], 1)
    outs = dc.deform_conv2d_siblings(x, offsets, masks, [t[3] for t in tensors], [None, None], 1, 1)
    sum(o.sum() for o in outs).backward()
    assert x.grad is not None and tensors[1][3].grad is not None
    for g, out in enumerate(outs):
        ref = torchvision_fn(x.detach(), offsets.detach()[:, 18 * g:18 * (g + 1)], tensors[g][3].detach(), None, 1, 1, 1,
                             masks.detach()[:, 9 * g:9 * (g + 1)])
        torch.testing.assert_close(out.detach(), ref, **TOL)


def test_siblings_reject_mismatched_shapes():
    x = torch.randn(1, 4, 6, 6)
    with pytest.raises(ValueError, match="one shape"):
        dc.deform_conv2d_siblings(x, torch.zeros(1, 36, 6, 6), torch.ones(1, 18, 6, 6),
                                  [torch.randn(3, 4, 3, 3), torch.randn(3, 4, 1, 1)], [None, None], 1, 1)
    with pytest.raises(ValueError, match="offset"):
        dc.deform_conv2d_siblings(x, torch.zeros(1, 18, 6, 6), torch.ones(1, 18, 6, 6),
                                  [torch.randn(3, 4, 3, 3)] * 2, [None, None], 1, 1)


@pytest.mark.parametrize("cin,cout", [(8, 3), (3, 8)])
@pytest.mark.parametrize("which", [0, 1, 2, 3, (0, 3), (1, 2)])
def test_partial_grads_match_torchvision(cin, cout, which, taps_per_chunk):
    """Only some inputs need grads (e.g. frozen weights): each skipped branch stays correct."""
    tensors, conv = make_inputs(2, cin, cout, 6, 7)
    wanted = {which} if isinstance(which, int) else set(which)
    for i, t in enumerate(tensors):
        t.requires_grad_(i in wanted)
    grad_out = torch.randn(2, cout, 6, 7, generator=torch.Generator().manual_seed(2))
    inputs = [tensors[i] for i in sorted(wanted)]
    fast = deform_conv2d_fast(tensors[0], tensors[1], tensors[3], None, *conv, tensors[2])
    ref = torchvision_fn(tensors[0], tensors[1], tensors[3], None, *conv, tensors[2])
    grads = torch.autograd.grad(fast, inputs, grad_out)
    for g, g_ref in zip(grads, torch.autograd.grad(ref, inputs, grad_out)):
        torch.testing.assert_close(g, g_ref, **TOL)


@pytest.mark.parametrize("cin,cout", [(4, 2), (2, 4)])
def test_fast_gradcheck_float64(cin, cout, taps_per_chunk):
    tensors, conv = make_inputs(1, cin, cout, 5, 4, bias=True, dtype=torch.float64)
    stride, padding, dilation = conv

    def f(x, offset, mask, weight, bias):
        return deform_conv2d_fast(x, offset, weight, bias, stride, padding, dilation, mask)

    assert torch.autograd.gradcheck(f, tuple(tensors), fast_mode=True)


def test_dilation_rectangular_kernel_and_no_mask():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 8, 9, generator=gen)
    w = torch.randn(5, 3, 2, 3, generator=gen)
    ho, wo = 8 + 4 - 2, 9 + 4 - 4  # padding 2, dilation 2
    offset = torch.randn(2, 12, ho, wo, generator=gen) * 2
    ref = torchvision.ops.deform_conv2d(x, offset, w, None, (1, 1), (2, 2), (2, 2))
    torch.testing.assert_close(deform_conv2d_fast(x, offset, w, None, 1, 2, 2), ref, **TOL)


def test_non_contiguous_inputs():
    tensors, conv = make_inputs(2, 6, 4, 7, 8)
    x, offset, mask, weight = (t.detach() for t in tensors)
    ref = torchvision_fn(x, offset, weight, None, *conv, mask)
    x_cl = x.to(memory_format=torch.channels_last)
    offset_view = torch.cat([offset, offset], 1)[:, ::2]  # strided view, same values
    offset_view.copy_(offset)
    mask_t = mask.transpose(2, 3).contiguous().transpose(2, 3)
    out = deform_conv2d_fast(x_cl, offset_view, weight, None, *conv, mask_t)
    torch.testing.assert_close(out, ref, **TOL)


def test_far_outside_samples_are_zero():
    x = torch.randn(1, 3, 6, 6)
    w = torch.randn(4, 3, 3, 3)
    offset = torch.full((1, 18, 6, 6), 1e6)
    offset[:, 1::2] = -1e9
    out = deform_conv2d_fast(x, offset, w, None, 1, 1, 1, torch.ones(1, 9, 6, 6))
    assert torch.equal(out, torch.zeros_like(out))


def test_nan_offsets_give_nan_not_an_index_error():
    offset = torch.zeros(1, 18, 4, 4)
    offset[0, 0, 1, 2] = float("nan")
    out = deform_conv2d_fast(torch.randn(1, 2, 4, 4), offset, torch.randn(3, 2, 3, 3), None, 1, 1)
    assert out[:, :, 1, 2].isnan().all() and out.isnan().sum() == 3


def test_zero_offsets_unit_mask_equal_plain_conv():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, 9, 7, generator=gen)
    w = torch.randn(5, 6, 3, 3, generator=gen)
    bias = torch.randn(5, generator=gen)
    for stride in (1, 2):
        ref = F.conv2d(x, w, bias, stride=stride, padding=1)
        offset = torch.zeros(2, 18, *ref.shape[2:])
        mask = torch.ones(2, 9, *ref.shape[2:])
        out = deform_conv2d_fast(x, offset, w, bias, stride, 1, 1, mask)
        torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("backend", ["fast", "torchvision"])
def test_module_at_init_equals_regular_conv(backend):
    torch.manual_seed(0)
    layer = DeformableConv2d(8, 4)
    layer.backend = backend
    x = torch.randn(2, 8, 7, 6)
    torch.testing.assert_close(layer(x), layer.regular_conv(x), **TOL)


def test_module_param_count_and_state_dict_keys():
    layer = DeformableConv2d(64, 32)
    assert sum(p.numel() for p in layer.parameters()) == 15552 + 27 + 18432
    c52_quarter = DeformableConv2d(52, 13)
    assert sum(p.numel() for p in c52_quarter.parameters()) == 27 * 9 * 52 + 27 + 9 * 52 * 13
    assert list(layer.state_dict()) == [
        "offset_conv.weight", "offset_conv.bias", "modulator_conv.weight", "modulator_conv.bias",
        "regular_conv.weight",
    ]
    assert layer.offset_conv.weight.shape == (18, 64, 3, 3)
    assert layer.modulator_conv.weight.shape == (9, 64, 3, 3)
    for conv in (layer.offset_conv, layer.modulator_conv):
        assert not conv.weight.any() and not conv.bias.any()
    assert "regular_conv.bias" in DeformableConv2d(4, 4, bias=True).state_dict()


def test_module_fast_and_torchvision_agree_with_learned_offsets():
    torch.manual_seed(0)
    layer = DeformableConv2d(8, 6, bias=True)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.3)
    x = torch.randn(2, 8, 9, 7, requires_grad=True)
    results = {}
    for backend in ("fast", "torchvision"):
        layer.zero_grad()
        x.grad = None
        with deform_backend(backend):
            y = layer(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads = [p.grad.clone() for p in layer.parameters()]
        results[backend] = [y.detach(), x.grad.clone()] + grads
    for a, b in zip(results["fast"], results["torchvision"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert all(g.abs().sum() > 0 for g in results["fast"][2:])


@pytest.fixture
def spies(monkeypatch):
    calls = []
    fast, tv = dc.deform_conv2d_fast, torchvision.ops.deform_conv2d

    def spy_fast(*args, **kwargs):
        calls.append("fast")
        return fast(*args, **kwargs)

    def spy_tv(*args, **kwargs):
        calls.append("torchvision")
        return tv(*args, **kwargs)

    monkeypatch.setattr(dc, "deform_conv2d_fast", spy_fast)
    monkeypatch.setattr(torchvision.ops, "deform_conv2d", spy_tv)
    return calls


def test_backend_selection(spies, monkeypatch):
    layer = DeformableConv2d(4, 4)
    x = torch.randn(1, 4, 5, 5)
    layer(x)
    assert spies[-1] == "fast"  # CPU float32 default
    with deform_backend("torchvision"):
        layer(x)
        assert dc.get_deform_backend() == "torchvision"
    assert spies[-1] == "torchvision"
    assert dc.get_deform_backend() is None
    layer.backend = "torchvision"
    layer(x)
    assert spies[-1] == "torchvision"
    with deform_backend("fast"):  # the context manager wins over the layer's own choice
        layer(x)
    assert spies[-1] == "fast"
    assert DeformableConv2d.backend == "auto"  # instance setting left the class default alone
    layer.backend = "auto"
    with torch.no_grad():
        layer.offset_conv.bias.uniform_(-2, 2)
        ref = layer(x)
        out = layer.to(torch.bfloat16)(x.to(torch.bfloat16))
    # Computed in float32: torchvision has no CPU bfloat16 kernel.
    assert spies[-1] == "fast" and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    with pytest.raises(ValueError, match="unknown deformable-conv backend"):
        with deform_backend("cuda-magic"):
            pass
    with pytest.raises(RuntimeError):
        with deform_backend("fast"):
            raise RuntimeError
    assert dc.get_deform_backend() is None
    # Export and compile tracing always get torchvision's op (mapped to ONNX DeformConv).
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    with deform_backend("fast"):
        deform_conv2d(x, torch.zeros(1, 18, 5, 5), torch.randn(2, 4, 3, 3), padding=1)
    assert spies[-1] == "torchvision"


def test_forced_fast_backend_refuses_integer_tensors():
    """The upcast to float32 is for half/bfloat16 only: integer tensors are an error on every path
    (torchvision has no integer kernel either), not a result truncated back to integers."""
    x, offset, weight = (torch.ones(*shape, dtype=torch.int64) for shape in ((1, 2, 3, 3), (1, 18, 3, 3), (1, 2, 3, 3)))
    with pytest.raises(ValueError, match="floating-point"):
        deform_conv2d(x, offset, weight, padding=1, backend="fast")


def test_ssh_siblings_honour_each_layer_backend(spies):
    """A backend set on one SSH layer applies to that layer, also when it shares its input with a
    sibling (`deform_branches`), and the output is unchanged."""
    from models.context import SSH
    from tests.conftest import randomise

    torch.manual_seed(0)
    ssh = randomise(SSH(16)).eval()
    x = torch.randn(1, 16, 9, 7)
    with torch.no_grad():
        ref = ssh(x)
        ssh.conv5x5_1[0].backend = "torchvision"  # the second layer of the first sibling pair
        spies.clear()
        out = ssh(x)
    assert spies.count("torchvision") == 1
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(1, 4, 5, 5)
    offset = torch.zeros(1, 18, 5, 5)
    with pytest.raises(ValueError, match="groups=1"):
        deform_conv2d_fast(x, offset, torch.randn(4, 2, 3, 3), None, 1, 1)
    with pytest.raises(ValueError, match="one offset group"):
        deform_conv2d_fast(x, torch.zeros(1, 36, 5, 5), torch.randn(4, 4, 3, 3), None, 1, 1)
    with pytest.raises(ValueError, match="mask must have shape"):
        deform_conv2d_fast(x, offset, torch.randn(4, 4, 3, 3), None, 1, 1, 1,
                           torch.ones(1, 9, 4, 5))
    with pytest.raises(ValueError, match="offset must have shape"):
        deform_conv2d_fast(x, offset, torch.randn(4, 4, 3, 3), None, 2, 1)
    with pytest.raises(ValueError, match="one dtype"):
        deform_conv2d_fast(x, offset.double(), torch.randn(4, 4, 3, 3), None, 1, 1)


def test_onnx_dynamo_export_emits_deformconv(tmp_path):
    pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    layer = DeformableConv2d(4, 6).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.3)
    dims = {i: torch.export.Dim(name) for i, name in ((0, "batch"), (2, "height"), (3, "width"))}
    path = tmp_path / "dcn.onnx"
    with deform_backend("fast"):  # export must still pick torchvision's op
        program = torch.onnx.export(
            layer, (torch.randn(1, 4, 12, 16),), dynamo=True, opset_version=19,
            dynamic_shapes=(dims,), input_names=["x"], output_names=["y"],
        )
    program.save(str(path))
    assert "DeformConv" in [node.op_type for node in onnx.load(str(path)).graph.node]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(1, 4, 12, 16), (2, 4, 9, 7)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            ref = layer(x)
        (out,) = session.run(None, {"x": x.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), ref, rtol=1e-4, atol=1e-5)


def test_sampling_rows_widen_to_int64_only_for_huge_maps():
    """Corner rows are int32 (fast float->int conversion) unless row * taps could pass 2**31."""
    offset, mask = torch.full((1, 18, 2, 2), 1e9), torch.ones(1, 9, 2, 2)
    geometry = ((3, 3), (1, 1), (1, 1), (1, 1))
    small = _sampling_plan(offset, mask, (40, 30), *geometry)[0]
    huge = _sampling_plan(offset, mask, (20000, 20000), *geometry)[0]
    assert small.dtype == torch.int32 and huge.dtype == torch.int64
    # Far below-right samples land on the last (zero) border row of the table.
    assert small.max() == 44 * 34 - 1 and huge.max() == 20004 * 20004 - 1  # a 2-pixel zero border


@pytest.mark.parametrize("train", [True, False])
def test_ssh_shared_coordinates_equal_separate_convs(train, monkeypatch):
    """V1's SSH computes the offsets/masks of sibling deformable convs with one conv: same
    outputs and gradients as each layer's own offset and modulator convs."""
    from models.context import SSH, _ThreeBranchContext
    from tests.conftest import randomise

    torch.manual_seed(0)
    ssh = randomise(SSH(16)).train(train)
    x = torch.randn(2, 16, 11, 9, requires_grad=True)
    outs, grads = [], []
    for forward in (SSH.forward, _ThreeBranchContext.forward):
        monkeypatch.setattr(SSH, "forward", forward)
        ssh.zero_grad()
        x.grad = None
        y = ssh(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append(y.detach())
        grads.append([x.grad.clone()] + [p.grad.clone() for p in ssh.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_shared_coordinates_need_one_geometry():
    from models.deform_conv import shared_coordinates

    with pytest.raises(ValueError, match="one geometry"):
        shared_coordinates([DeformableConv2d(4, 4), DeformableConv2d(4, 4, padding=2)], torch.randn(1, 4, 8, 8))


@pytest.mark.parametrize("size", [(11, 9), (64, 72)])  # BN kept / BN folded into the first pair
def test_ssh_sibling_sampling_equals_each_branch_in_inference(size, monkeypatch):
    """Eval mode without autograd: V1's SSH samples each pair of sibling branches with one plan
    (`deform_branches`); same output as running every branch on its own."""
    from models.context import SSH, _ThreeBranchContext
    from models.folding import folds_at_call
    from tests.conftest import randomise

    torch.manual_seed(0)
    ssh = randomise(SSH(52)).eval()
    x = torch.randn(2, 52, *size).contiguous(memory_format=torch.channels_last)
    assert folds_at_call(ssh.conv3x3[1], x) == (size == (64, 72))
    plans = []
    real_plan = dc._sampling_plan
    monkeypatch.setattr(dc, "_sampling_plan", lambda *a, **k: plans.append(k.get("layers", 1)) or real_plan(*a, **k))
    with torch.inference_mode():
        joint = ssh(x)
        assert plans == [2, 2, 1]
        monkeypatch.setattr(SSH, "forward", _ThreeBranchContext.forward)
        separate = ssh(x)
    torch.testing.assert_close(joint, separate, rtol=1e-5, atol=1e-5)

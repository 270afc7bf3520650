"""Modulated deformable convolution (DCNv2) as used in FeatherFace V1's SSH (docs/ARCHITECTURE.md §2.4).

`DeformableConv2d` keeps the official FeatherFace checkpoint keys (`offset_conv`, `modulator_conv`,
`regular_conv`): offsets and mask come from two plain convs, then `deform_conv2d` samples the
input bilinearly at the shifted tap positions and mixes the samples with `regular_conv`'s weight.
Every path computes torchvision's `deform_conv2d` (groups = offset groups = 1):

1. torchvision's op (`torchvision.ops.deform_conv2d`): tensors off the CPU (CUDA),
   `backend="torchvision"`, every export or trace (the ONNX exporter maps it to the standard
   DeformConv node) and compiled training.
2. `_DeformConv2dFast`, pure PyTorch with a hand-written backward: floating-point CPU tensors (any
   device with `backend="fast"`) while autograd records, i.e. training.
3. `_deform_conv2d_inference`, the same sampling without autograd, each bilinear blend one fused
   `F.embedding_bag` call; sibling layers that read one input share one sampling plan
   (`deform_conv2d_siblings`).

`deform_conv2d` / `_uses_fast` choose between path 1 and the fast paths (half and bfloat16 are
computed in float32 there); `deform_conv2d_fast` chooses between 2 and 3. Paths 2 and 3 share the
sampling rules: `_sampling_plan` turns the offsets into four corner rows and blend weights per
(location, tap), rows of `_bordered_table` (the input channels-last, with a zero border so that
samples outside the image read zeros, torchvision's rule). `deform_backend()` forces a backend for
a block of code. tests/test_deform_conv.py checks the values and gradients of paths 2 and 3
against torchvision's. The sections below follow that order: backend selection, public functions,
argument checks, sampling plan, path 3, path 2, the module.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from layers.box_utils import torchvision_ops

IntPair = Union[int, Tuple[int, int]]

BACKENDS = ("auto", "torchvision", "fast")

# Set by `deform_backend()`; when not None it wins over every module's own `backend`.
_forced_backend: Optional[str] = None

# Relative cost of gathering + blending one sampled element versus one multiply-add inside a
# matrix multiply (measured on CPU: ~0.4 ns vs ~0.02 ns); used to pick the cheaper order.
_GATHER_COST = 16
# Elements of gathered corner values per chunk of taps (2 MiB in float32): small enough for L2.
_CHUNK_ELEMENTS = 2**19
# Zero rows/columns on each side of the sampled table: a sample's upper-left corner is clamped into
# [0, H + BORDER] and its neighbours are one further, so a sample outside the image (above, below,
# left or right) finds zeros at both of its rows (columns).
BORDER = 2


# ---------------------------------------------------------------------------------------------
# Argument helpers and backend selection


def _pair(v: IntPair, name: str) -> Tuple[int, int]:
    if isinstance(v, int):
        return v, v
    if len(v) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return int(v[0]), int(v[1])


def _check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown deformable-conv backend {name!r}; choose one of {BACKENDS}")
    return name


def _resolve_backend(backend: str) -> str:
    """The backend a call runs: the one forced by `deform_backend()`, else the caller's."""
    return _check_backend(_forced_backend if _forced_backend is not None else backend)


def get_deform_backend() -> Optional[str]:
    """The backend forced by `deform_backend()`, or None when modules choose for themselves."""
    return _forced_backend


@contextlib.contextmanager
def deform_backend(name: str) -> Iterator[None]:
    """Force every deformable conv in the block onto "auto", "torchvision" or "fast"."""
    global _forced_backend
    previous = _forced_backend
    _forced_backend = _check_backend(name)
    try:
        yield
    finally:
        _forced_backend = previous


def _is_exporting() -> bool:
    # Exporters must see torchvision's registered op: the dynamo ONNX exporter maps it to the
    # standard DeformConv node, while the fast path would be traced into gathers.
    return (
        torch.onnx.is_in_onnx_export()
        or torch.compiler.is_exporting()
        or torch.jit.is_tracing()
        or torch.jit.is_scripting()
    )


def _uses_fast(backend: str, x: Tensor) -> bool:
    """True for the pure-PyTorch paths, False for torchvision's op. Exports and compiled training
    always get torchvision's op; otherwise "fast" and "torchvision" are obeyed and "auto" takes
    the fast paths for floating-point tensors on the CPU (torchvision elsewhere, e.g. CUDA)."""
    if _is_exporting() or backend == "torchvision":
        return False
    if torch.compiler.is_compiling() and torch.is_grad_enabled():
        # Compiled training keeps torchvision's op and its registered backward; compiled
        # inference (FaceDetector(compile=True)) traces the no-grad fast path into plain
        # tensor ops, which inductor fuses.
        return False
    return backend == "fast" or (x.device.type == "cpu" and x.is_floating_point())


# ---------------------------------------------------------------------------------------------
# Public functions: dispatch to torchvision's op (path 1) or the fast paths (2, 3)


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    mask: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """torchvision.ops.deform_conv2d (same arguments, groups = 1) on the path `_uses_fast` picks
    for `backend` ("auto", "torchvision" or "fast"; `deform_backend()` wins over it)."""
    if _uses_fast(_resolve_backend(backend), input):
        if input.dtype in (torch.float32, torch.float64) or not input.is_floating_point():
            # (non-floating tensors reach deform_conv2d_fast's dtype check, a ValueError)
            return deform_conv2d_fast(input, offset, weight, bias, stride, padding, dilation, mask)
        # torchvision has no CPU kernel for half/bfloat16, and sample positions need float32
        # precision anyway (bfloat16 cannot even represent x = 257.5).
        upcast = [None if t is None else t.float() for t in (input, offset, weight, bias, mask)]
        out = deform_conv2d_fast(*upcast[:4], stride, padding, dilation, upcast[4])
        return out.to(input.dtype)
    return torchvision_ops().deform_conv2d(
        input, offset, weight, bias, _pair(stride, "stride"), _pair(padding, "padding"),
        _pair(dilation, "dilation"), mask,
    )


def deform_conv2d_siblings(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Optional[Tensor]],
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    backend: Union[str, Sequence[str]] = "auto",
) -> List[Tensor]:
    """`deform_conv2d` of G sibling layers that read the same input with one geometry: offset
    (B, 2KG, Ho, Wo) and mask (B, KG, Ho, Wo) hold layer g's at channels 2Kg..2K(g+1)-1 and
    Kg..K(g+1)-1 (as `shared_coordinates` returns them); one output per weight. `backend` is one
    for all layers or one per layer.

    Without autograd, when every layer takes the fast path (CPU), the layers share one sampling
    plan and table (`_deform_conv2d_inference`); otherwise (training, CUDA, export, a layer set to
    torchvision) each layer runs on its own through `deform_conv2d`.
    """
    backends = [backend] * len(weights) if isinstance(backend, str) else list(backend)
    taps = weights[0].shape[2] * weights[0].shape[3]
    if (any(w.shape[1:] != weights[0].shape[1:] for w in weights) or len(biases) != len(weights)
            or len(backends) != len(weights)
            or offset.shape[1] != 2 * taps * len(weights) or mask.shape[1] != taps * len(weights)):
        raise ValueError(f"deform_conv2d_siblings needs weights of one shape (Cin, kh, kw), one bias and backend "
                         f"each, {2 * taps} offset and {taps} mask channels per layer; got weights "
                         f"{[tuple(w.shape) for w in weights]}, {len(biases)} biases, {len(backends)} backends, "
                         f"offset {tuple(offset.shape)}, mask {tuple(mask.shape)}")
    params = [input, offset, mask, *weights, *[b for b in biases if b is not None]]
    if (len(weights) > 1 and input.shape[0] > 0 and all(_uses_fast(_resolve_backend(b), input) for b in backends)
            and input.dtype in (torch.float32, torch.float64) and all(t.dtype == input.dtype for t in params)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in params))):
        geometry = _fast_geometry(input, offset[:, :2 * taps], weights[0], biases[0], stride, padding, dilation,
                                  mask[:, :taps])  # the checks of one layer hold for all (same shapes)
        return _deform_conv2d_inference(input, offset, mask, list(weights), list(biases), *geometry)
    layers = zip(offset.split(2 * taps, 1), mask.split(taps, 1), weights, biases, backends)
    return [deform_conv2d(input, layer_offset, weight, bias, stride, padding, dilation, layer_mask, layer_backend)
            for layer_offset, layer_mask, weight, bias, layer_backend in layers]


def deform_conv2d_fast(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """Drop-in for torchvision.ops.deform_conv2d (groups = offset groups = 1), differentiable:
    path 2 (`_DeformConv2dFast`) when autograd records, else path 3 (`_deform_conv2d_inference`).

    input (B, Cin, H, W), offset (B, 2*kh*kw, Ho, Wo) as (dy, dx) per tap in row-major tap
    order, weight (Cout, Cin, kh, kw), mask (B, kh*kw, Ho, Wo) or None; returns (B, Cout, Ho, Wo).
    """
    geometry = _fast_geometry(input, offset, weight, bias, stride, padding, dilation, mask)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geometry
    b, taps, cout = input.shape[0], kh * kw, weight.shape[0]
    ho, wo = offset.shape[2:]
    if b == 0:
        return input.new_zeros(0, cout, ho, wo)
    if mask is None:
        mask = offset.new_ones(b, taps, ho, wo)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, offset, mask, weight, bias)):
        return _DeformConv2dFast.apply(input, offset, mask, weight, bias, *geometry)
    return _deform_conv2d_inference(input, offset, mask, [weight], [bias], *geometry)[0]


# ---------------------------------------------------------------------------------------------
# Argument checks of the fast paths


def _fast_geometry(input: Tensor, offset: Tensor, weight: Tensor, bias: Optional[Tensor], stride: IntPair,
                   padding: IntPair, dilation: IntPair, mask: Optional[Tensor]) -> Tuple[Tuple[int, int], ...]:
    """Check one layer's tensors for the fast path; returns (kernel, stride, padding, dilation)."""
    sh, sw = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    dh, dw = _pair(dilation, "dilation")
    if input.dim() != 4 or offset.dim() != 4 or weight.dim() != 4:
        raise ValueError("deform_conv2d_fast expects 4-D input, offset and weight tensors")
    b, cin, h, w = input.shape
    cout, wcin, kh, kw = weight.shape
    taps = kh * kw
    if wcin != cin:
        raise ValueError(
            f"deform_conv2d_fast supports groups=1 only: input has {cin} channels, "
            f"weight expects {wcin}"
        )
    if offset.shape[1] != 2 * taps:
        raise ValueError(
            f"deform_conv2d_fast supports one offset group only: offset needs {2 * taps} "
            f"channels for a {kh}x{kw} kernel, got {offset.shape[1]}"
        )
    if min(sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError("stride and dilation must be >= 1 and padding >= 0")
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if ho <= 0 or wo <= 0:
        raise ValueError(f"input {h}x{w} is too small for a {kh}x{kw} kernel with this padding")
    if offset.shape[0] != b or tuple(offset.shape[2:]) != (ho, wo):
        raise ValueError(
            f"offset must have shape ({b}, {2 * taps}, {ho}, {wo}), got {tuple(offset.shape)}"
        )
    if mask is not None and tuple(mask.shape) != (b, taps, ho, wo):
        raise ValueError(f"mask must have shape ({b}, {taps}, {ho}, {wo}), got {tuple(mask.shape)}")
    if bias is not None and tuple(bias.shape) != (cout,):
        raise ValueError(f"bias must have shape ({cout},), got {tuple(bias.shape)}")
    others = [t for t in (offset, weight, mask, bias) if t is not None]
    if not input.is_floating_point() or any(t.dtype != input.dtype for t in others):
        raise ValueError(
            "deform_conv2d_fast needs floating-point tensors of one dtype, got "
            f"{[str(t.dtype) for t in (input, *others)]}"
        )
    return (kh, kw), (sh, sw), (ph, pw), (dh, dw)


# ---------------------------------------------------------------------------------------------
# The sampling plan, shared by the two fast paths (2: autograd, 3: no-grad)


def _bordered_table(x: Tensor) -> Tensor:
    """(B*(H+2*BORDER)*(W+2*BORDER), C) channels-last copy of x with a zero border."""
    b, c, h, w = x.shape
    table = x.new_zeros(b, h + 2 * BORDER, w + 2 * BORDER, c)
    table[:, BORDER:-BORDER, BORDER:-BORDER] = x.permute(0, 2, 3, 1)
    return table.view(-1, c)


@functools.lru_cache(maxsize=64)
def _tap_positions(out_hw: Tuple[int, int], kernel: Tuple[int, int], stride: Tuple[int, int],
                   padding: Tuple[int, int], dilation: Tuple[int, int], dtype: torch.dtype,
                   device: torch.device, layers: int = 1) -> Tuple[Tensor, Tensor]:
    """Integer sampling rows (Ho, 1, K) and columns (1, Wo, K) of every tap before its offset
    (K = kh * kw * layers: the taps repeated for each of `layers` sibling layers).

    Cached per geometry (evaluation at one size, a video, every layer of a level share them);
    built outside inference mode so that autograd callers can use them too.
    """
    (ho, wo), (kh, kw) = out_hw, kernel
    with torch.inference_mode(False):
        tap_y = torch.arange(kh, device=device).repeat_interleave(kw) * dilation[0] - padding[0]
        tap_x = torch.arange(kw, device=device).repeat(kh) * dilation[1] - padding[1]
        rows = (torch.arange(ho, device=device) * stride[0]).view(ho, 1, 1) + tap_y.repeat(layers)
        cols = (torch.arange(wo, device=device) * stride[1]).view(1, wo, 1) + tap_x.repeat(layers)
        return rows.to(dtype), cols.to(dtype)


def _sampling_plan(
    offset: Tensor,
    mask: Tensor,
    in_hw: Tuple[int, int],
    kernel: Tuple[int, int],
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
    per_tap_rows: bool = False,
    layers: int = 1,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Corner rows, blend weights and fractional parts for every (output location, tap).

    Returns rows (N, K, 4) int32 (int64 for huge maps) of the zero-bordered channels-last table
    (`_bordered_table`), weights (N, K, 4) = mask x bilinear factors, and the fractional parts
    fy, fx (N, K) of the sample positions; N = B*Ho*Wo, corners ordered (y0,x0), (y0,x1),
    (y1,x0), (y1,x1). `per_tap_rows`: rows of the table's tap-wise projection instead, viewed as
    (R*K, C) with table row r mixed by tap k at r*K + k (the project-first paths). `layers`:
    G sibling layers of one geometry at once (offset (B, 2KG, Ho, Wo), mask (B, KG, Ho, Wo), layer
    g's taps at g*K..(g+1)*K-1), so K above stands for K*G in the shapes.
    On FeatherFace's maps the number of tensor ops, not their size, is the cost: each op here
    is one pass over (B, Ho, Wo, K) values, in place where the input is no longer needed.
    """
    b, _, ho, wo = offset.shape
    h, w = in_hw
    layer_taps = kernel[0] * kernel[1]
    taps, dt, dev = layer_taps * layers, offset.dtype, offset.device
    off = offset.permute(0, 2, 3, 1).reshape(b, ho, wo, taps, 2)  # a view for channels-last offsets
    # Under torch.compile the grid is traced (and constant-folded) instead of read from the cache.
    positions = _tap_positions.__wrapped__ if torch.compiler.is_compiling() else _tap_positions
    grid_y, grid_x = positions((ho, wo), kernel, stride, padding, dilation, dt, dev, layers)
    # Same arithmetic as torchvision: integer grid position (as float) plus the learned offset.
    pos_y, pos_x = off[..., 0] + grid_y, off[..., 1] + grid_x  # (B, Ho, Wo, K)
    low_y, low_x = pos_y.floor(), pos_x.floor()
    fy, fx = pos_y.sub_(low_y), pos_x.sub_(low_x)
    m = mask.permute(0, 2, 3, 1)
    wy1 = fy * m
    wy0, wx0 = m - wy1, 1 - fx  # (1 - fy) * m, 1 - fx
    weights = torch.stack([wy0 * wx0, wy0 * fx, wy1 * wx0, wy1 * fx], -1)
    # Corner coordinates in the table (`_bordered_table`: a BORDER-pixel zero border on every side).
    # The upper-left corner is clamped to [0, H + BORDER] (table rows) and its neighbours are one
    # further, so a sample outside the image lands on zeros only (torchvision's per-corner validity
    # rule without masks) and one straddling an edge keeps its inside corners. Clamping in float
    # before the integer conversion keeps huge offsets from overflowing. NaN offsets give NaN
    # outputs through the weights (caught as a non-finite loss) and a valid row here.
    hp, wp = h + 2 * BORDER, w + 2 * BORDER
    y0 = low_y.add_(BORDER).nan_to_num_(0.0).clamp_(0, h + BORDER)
    x0 = low_x.add_(BORDER).nan_to_num_(0.0).clamp_(0, w + BORDER)
    # int32 rows where they fit, also multiplied by K (the project-first path's rows): x86 CPUs
    # without AVX-512 convert float to int32, not int64, in vector code.
    index_dt = torch.int32 if b * hp * wp * layer_taps < 2**31 else torch.int64
    y0, x0 = y0.to(index_dt), x0.to(index_dt)
    row_size = layer_taps if per_tap_rows else 1  # index units per table row
    if per_tap_rows:  # (y * Wp + x) * K + k, k counted within each layer
        tap = torch.arange(layer_taps, device=dev, dtype=index_dt).repeat(layers)
        x0 = torch.add(tap, x0, alpha=layer_taps)
    top_left = torch.add(x0, y0, alpha=wp * row_size)
    right, down = row_size, wp * row_size
    rows = torch.stack([top_left, top_left + right, top_left + down, top_left + (down + right)], -1)
    if b > 1:
        rows += torch.arange(b, device=dev, dtype=index_dt).view(b, 1, 1, 1, 1) * (hp * wp * row_size)
    n = b * ho * wo
    return rows.reshape(n, taps, 4), weights.reshape(n, taps, 4), fy.reshape(n, taps), fx.reshape(n, taps)


# ---------------------------------------------------------------------------------------------
# Path 3: forward without autograd, bilinear blends as embedding_bag


def _deform_conv2d_inference(
    x: Tensor,
    offset: Tensor,
    mask: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Optional[Tensor]],
    kernel: Tuple[int, int],
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
) -> List[Tensor]:
    """Forward without autograd of G >= 1 sibling layers reading `x` (offset (B, 2KG, Ho, Wo) and
    mask (B, KG, Ho, Wo), layer g's taps at g*K..(g+1)*K-1); one output per weight.

    Every bilinear blend is one `embedding_bag` (weighted sum of gathered table rows, a fused CPU
    kernel) instead of gather + four blend passes. Siblings share one sampling plan and one
    table: on FeatherFace's maps the plan costs its dozen-odd tensor ops, not their size.
    Layers that at least halve the width (2 Cout <= Cin) project first: each tap's weight slice
    mixes the table to Cout channels and one bag of 4K rows per location sums the taps too (for
    FeatherFace's 52 -> 26 SSH conv the whole FaceDetector v1 path is 1.4 % faster than sampling
    first). Otherwise each (location, tap) bag samples Cin channels (one bag call for all the
    siblings) and one matrix multiply per layer mixes them. On the 2-core CPU at 80x80 this is
    1.4-3.7x faster than the autograd path (`_DeformConv2dFast`).
    """
    b, cin, h, w = x.shape
    ho, wo = offset.shape[2:]
    project = {2 * weight.shape[0] <= cin for weight in weights}
    if len(project) > 1:  # siblings that disagree on the order: one plan each
        taps = kernel[0] * kernel[1]
        layers = zip(offset.split(2 * taps, 1), mask.split(taps, 1), weights, biases)
        return [_deform_conv2d_inference(x, layer_offset, layer_mask, [weight], [bias], kernel, stride, padding,
                                         dilation)[0]
                for layer_offset, layer_mask, weight, bias in layers]
    (project,) = project
    rows, plan_weights, _, _ = _sampling_plan(offset, mask, (h, w), kernel, stride, padding, dilation,
                                              per_tap_rows=project, layers=len(weights))
    n, taps = rows.shape[0], kernel[0] * kernel[1]
    table = _bordered_table(x)
    if not project:
        sampled = F.embedding_bag(rows.view(-1, 4), table, per_sample_weights=plan_weights.view(-1, 4),
                                  mode="sum").view(n, len(weights), taps * cin)
    outs = []
    for g, (weight, bias) in enumerate(zip(weights, biases)):
        cout = weight.shape[0]
        w_taps = weight.permute(2, 3, 1, 0).reshape(taps, cin, cout)  # (K, Cin, Cout)
        if project:
            # (R, K*Cout) viewed as (R*K, Cout): table row r mixed by tap k sits at row r*K + k.
            mixed = torch.mm(table, w_taps.transpose(0, 1).reshape(cin, taps * cout)).view(-1, cout)
            own = slice(g * taps, (g + 1) * taps)
            out = F.embedding_bag(rows[:, own].reshape(n, 4 * taps), mixed,
                                  per_sample_weights=plan_weights[:, own].reshape(n, 4 * taps), mode="sum")
            if bias is not None:
                out += bias
        elif bias is not None:
            out = torch.addmm(bias, sampled[:, g], w_taps.reshape(taps * cin, cout))
        else:
            out = torch.mm(sampled[:, g], w_taps.reshape(taps * cin, cout))
        out = out.view(b, ho, wo, cout).permute(0, 3, 1, 2)
        outs.append(out if x.is_contiguous(memory_format=torch.channels_last) else out.contiguous())
    return outs


# ---------------------------------------------------------------------------------------------
# Path 2: autograd (`_DeformConv2dFast`), gathers + matrix multiplies in cache-sized tap chunks


def _project_first(rows: int, n: int, cin: int, cout: int) -> bool:
    """True when mixing channels before sampling (gathering Cout-wide rows) is cheaper."""
    project = rows * cin * cout + 4 * n * cout * _GATHER_COST
    sample = n * cin * cout + 4 * n * cin * _GATHER_COST
    return project < sample


def _tap_chunks(taps: int, n: int, width: int) -> List[Tuple[int, int]]:
    """Split the taps so one chunk's gathered corners (T, 4, N, width) stay cache-sized.

    Large maps go one tap at a time; small maps take all taps in one go, which saves the
    per-op overhead that dominates there.
    """
    step = max(1, min(taps, _CHUNK_ELEMENTS // (4 * n * width)))
    return [(t, min(t + step, taps)) for t in range(0, taps, step)]


def _chunk_rows(idx: Tensor, t0: int, t1: int) -> Tensor:
    """Rows of the (R*T, C) view of a (R, T*C) per-chunk projection, flattened as (T, 4, N)."""
    rows = idx[t0:t1]
    if t1 - t0 > 1:
        rows = rows * (t1 - t0) + torch.arange(t1 - t0, device=idx.device).view(-1, 1, 1)
    return rows.reshape(-1)


def _tap_columns(w_taps: Tensor, t0: int, t1: int) -> Tensor:
    """Contiguous (Cin, T*Cout) weights of taps t0..t1-1, side by side."""
    return w_taps[t0:t1].transpose(0, 1).reshape(w_taps.shape[1], -1)


def _blend(corners: Tensor, weights: Tensor, out: Tensor) -> Tensor:
    """out (T, N, C) += sum over c of weights[:, c] * corners[:, c]; corners (T, 4, N, C)."""
    for c in range(4):
        out.addcmul_(corners[:, c], weights[:, c].unsqueeze(-1))
    return out


class _Scratch:
    """Named flat buffers, each allocated once and handed out as contiguous views."""

    def __init__(self, like: Tensor, **sizes: int) -> None:
        self.buffers = {name: like.new_empty(size) for name, size in sizes.items() if size > 0}

    def get(self, name: str, *shape: int) -> Tensor:
        return self.buffers[name][: math.prod(shape)].view(shape)


class _DeformConv2dFast(torch.autograd.Function):
    """Bilinear gather with shared corner indices per tap, then matrix multiplies.

    Sampling commutes with mixing channels, so when Cout < Cin the input is first projected by
    each tap's weight slice and the narrower result is sampled ("project first"); otherwise
    the input is sampled and then multiplied. Taps are processed in cache-sized chunks that
    accumulate into one (N, Cout) buffer, so no (N, Cin*K) column matrix is ever built.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        offset: Tensor,
        mask: Tensor,
        weight: Tensor,
        bias: Optional[Tensor],
        kernel: Tuple[int, int],
        stride: Tuple[int, int],
        padding: Tuple[int, int],
        dilation: Tuple[int, int],
    ) -> Tensor:
        b, cin, h, w = x.shape
        cout = weight.shape[0]
        ho, wo = offset.shape[2:]
        mask = mask.contiguous()
        rows_, weights_, fy, fx = _sampling_plan(offset, mask, (h, w), kernel, stride, padding, dilation)
        # Tap-major for the chunked gathers: idx and weights (K, 4, N), ly and lx (K, N).
        idx, weights = rows_.permute(1, 2, 0).contiguous(), weights_.permute(1, 2, 0).contiguous()
        ly, lx = fy.t().contiguous(), fx.t().contiguous()
        table = _bordered_table(x)
        rows, taps, n = table.shape[0], idx.shape[0], idx.shape[-1]
        # (K, Cin, Cout): tap t's slice of the kernel, ready to right-multiply channels-last rows.
        w_taps = weight.permute(2, 3, 1, 0).reshape(taps, cin, cout)
        project = _project_first(rows, n, cin, cout)
        width = cout if project else cin
        chunks = _tap_chunks(taps, n, width)
        most = max(t1 - t0 for t0, t1 in chunks)
        # Scratch buffers are reused across chunks: fresh multi-MB allocations page-fault.
        scratch = _Scratch(x, corners=most * 4 * n * width, blended=most * n * width,
                           mixed=rows * most * cout if project else 0)
        out = x.new_zeros(n, cout)
        for t0, t1 in chunks:
            chunk = t1 - t0
            corners = scratch.get("corners", chunk, 4, n, width)
            if project:
                # (R, T*Cout) viewed as (R*T, Cout): row r of chunk tap j sits at r*T + j.
                mixed = scratch.get("mixed", rows, chunk * cout)
                torch.mm(table, _tap_columns(w_taps, t0, t1), out=mixed)
                torch.index_select(mixed.view(-1, cout), 0, _chunk_rows(idx, t0, t1),
                                   out=corners.view(-1, cout))
                if chunk == 1:
                    _blend(corners, weights[t0:t1], out.unsqueeze(0))
                else:
                    blended = scratch.get("blended", chunk, n, cout).zero_()
                    out += _blend(corners, weights[t0:t1], blended).sum(0)
            else:
                torch.index_select(table, 0, idx[t0:t1].reshape(-1), out=corners.view(-1, cin))
                sampled = scratch.get("blended", chunk, n, cin).zero_()
                _blend(corners, weights[t0:t1], sampled)
                for j in range(chunk):
                    out.addmm_(sampled[j], w_taps[t0 + j])
        if bias is not None:
            out += bias
        ctx.save_for_backward(table, idx, weights, ly, lx, mask, w_taps)
        ctx.meta = (b, cin, h, w, cout, ho, wo, kernel, project, bias is not None)
        out = out.view(b, ho, wo, cout).permute(0, 3, 1, 2)  # a channels-last view
        # Channels-last in, channels-last out (no copy); otherwise the usual contiguous NCHW.
        return out if x.is_contiguous(memory_format=torch.channels_last) else out.contiguous()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        table, idx, weights, ly, lx, mask, w_taps = ctx.saved_tensors
        b, cin, h, w, cout, ho, wo, kernel, project, has_bias = ctx.meta
        need_x, need_offset, need_mask, need_weight, need_bias = ctx.needs_input_grad[:5]
        need_coord = need_offset or need_mask
        need_table = need_x or need_weight
        rows, taps, n = table.shape[0], idx.shape[0], idx.shape[-1]
        g = grad_out.permute(0, 2, 3, 1).reshape(n, cout).contiguous()

        g_table = torch.zeros_like(table) if need_x else None
        g_w = table.new_empty(taps, cin, cout) if need_weight else None
        # dots[t, c] = <grad, value at corner c of tap t> per location: offset and mask grads.
        dots = table.new_empty(taps, 4, n) if need_coord else None
        width = cout if project else cin
        chunks = _tap_chunks(taps, n, width)
        most = max(t1 - t0 for t0, t1 in chunks)
        corner_size = most * 4 * n * width
        if project:
            scratch = _Scratch(
                table,
                corners=corner_size if need_coord else 0,
                products=corner_size if need_table else 0,
                mixed=rows * most * cout if need_coord else 0,
                g_mixed=rows * most * cout if need_table else 0,
                g_w=cin * most * cout if need_weight else 0,
            )
        else:
            scratch = _Scratch(
                table,
                corners=corner_size if need_coord or need_weight else 0,
                products=corner_size if need_x else 0,
                g_cols=most * n * cin if need_coord or need_x else 0,
                sampled=most * n * cin if need_weight else 0,
            )
        for t0, t1 in chunks:
            chunk = t1 - t0
            chunk_weights = weights[t0:t1].unsqueeze(-1)  # (T, 4, N, 1)
            if project:
                # The gradient flows through mixed = table @ w_chunk, sampled with Cout-wide rows.
                chunk_rows = _chunk_rows(idx, t0, t1)
                w_chunk = _tap_columns(w_taps, t0, t1)
                if need_coord:
                    mixed = scratch.get("mixed", rows, chunk * cout)
                    corners = scratch.get("corners", chunk, 4, n, cout)
                    torch.mm(table, w_chunk, out=mixed)
                    torch.index_select(mixed.view(-1, cout), 0, chunk_rows,
                                       out=corners.view(-1, cout))
                    torch.sum(corners.mul_(g), -1, out=dots[t0:t1])
                if need_table:
                    g_mixed = scratch.get("g_mixed", rows, chunk * cout).zero_()
                    products = scratch.get("products", chunk, 4, n, cout)
                    torch.mul(g, chunk_weights, out=products)
                    g_mixed.view(-1, cout).index_add_(0, chunk_rows, products.view(-1, cout))
                    if need_x:
                        g_table.addmm_(g_mixed, w_chunk.t())
                    if need_weight:
                        g_w_chunk = scratch.get("g_w", cin, chunk * cout)
                        torch.mm(table.t(), g_mixed, out=g_w_chunk)
                        g_w[t0:t1] = g_w_chunk.view(cin, chunk, cout).transpose(0, 1)
            else:
                chunk_rows = idx[t0:t1].reshape(-1)
                if need_coord or need_weight:
                    corners = scratch.get("corners", chunk, 4, n, cin)
                    torch.index_select(table, 0, chunk_rows, out=corners.view(-1, cin))
                if need_weight:
                    sampled = scratch.get("sampled", chunk, n, cin).zero_()
                    _blend(corners, weights[t0:t1], sampled)
                    for j in range(chunk):
                        torch.mm(sampled[j].t(), g, out=g_w[t0 + j])
                if need_coord or need_x:
                    g_cols = scratch.get("g_cols", chunk, n, cin)  # grad of the sampled values
                    for j in range(chunk):
                        torch.mm(g, w_taps[t0 + j].t(), out=g_cols[j])
                    if need_coord:
                        torch.sum(corners.mul_(g_cols.unsqueeze(1)), -1, out=dots[t0:t1])
                    if need_x:
                        products = scratch.get("products", chunk, 4, n, cin)
                        torch.mul(g_cols.unsqueeze(1), chunk_weights, out=products)
                        g_table.index_add_(0, chunk_rows, products.view(-1, cin))

        g_x = g_offset = g_mask = g_weight = g_bias = None
        if need_x:
            g_x = g_table.view(b, h + 2 * BORDER, w + 2 * BORDER, cin)[:, BORDER:-BORDER, BORDER:-BORDER]
            g_x = g_x.permute(0, 3, 1, 2)
            g_x = g_x.contiguous()
        if need_coord:
            m = mask.transpose(0, 1).reshape(taps, n)
            d00, d01, d10, d11 = dots.unbind(1)
            hy, hx = 1 - ly, 1 - lx
            if need_offset:
                # d(bilinear)/d(ly) and /d(lx); floor() is piecewise constant, so these are
                # the gradients w.r.t. the y and x offsets themselves.
                g_y = m * (hx * (d10 - d00) + lx * (d11 - d01))
                g_xo = m * (hy * (d01 - d00) + ly * (d11 - d10))
                g_offset = (
                    torch.stack([g_y, g_xo], 1).view(taps, 2, b, ho, wo)
                    .permute(2, 0, 1, 3, 4).reshape(b, 2 * taps, ho, wo)
                )
            if need_mask:
                g_m = hy * (hx * d00 + lx * d01) + ly * (hx * d10 + lx * d11)
                g_mask = g_m.view(taps, b, ho, wo).transpose(0, 1).contiguous()
        if need_weight:
            g_weight = g_w.permute(2, 1, 0).reshape(cout, cin, *kernel)
        if need_bias and has_bias:
            g_bias = g.sum(0)
        return g_x, g_offset, g_mask, g_weight, g_bias, None, None, None, None


# ---------------------------------------------------------------------------------------------
# The module and its offset / mask convs


class DeformableConv2d(nn.Module):
    """Modulated deformable conv (DCNv2) with FeatherFace's parameter names.

    Offsets and modulation come from two zero-initialised convs, so at init the layer equals
    `regular_conv`. Params (k=3, no bias): 27*9*in + 27 + 9*in*out.
    """

    # Class-wide default; assign on an instance to override it for that layer only.
    backend: str = "auto"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair = 3,
        stride: IntPair = 1,
        padding: IntPair = 1,
        bias: bool = False,
    ) -> None:
        super().__init__()
        torchvision_ops()  # imported while building, never while tracing, exporting or compiling
        kh, kw = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        taps = kh * kw
        geometry = dict(kernel_size=(kh, kw), stride=self.stride, padding=self.padding)
        self.offset_conv = nn.Conv2d(in_channels, 2 * taps, bias=True, **geometry)
        self.modulator_conv = nn.Conv2d(in_channels, taps, bias=True, **geometry)
        self.regular_conv = nn.Conv2d(in_channels, out_channels, bias=bias, **geometry)
        for conv in (self.offset_conv, self.modulator_conv):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None) -> Tensor:
        """x (B, Cin, H, W) -> (B, Cout, Ho, Wo). `weight` / `bias` replace the regular conv's
        (a batch norm folded in by models/folding.py)."""
        offset, mask = shared_coordinates([self], x)
        if weight is None:
            weight, bias = self.regular_conv.weight, self.regular_conv.bias
        return deform_conv2d(x, offset, weight, bias, stride=self.stride, padding=self.padding, mask=mask,
                             backend=self.backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


def shared_coordinates(layers: Sequence[DeformableConv2d], x: Tensor) -> Tuple[Tensor, Tensor]:
    """(offsets (B, 2KG, Ho, Wo), masks = 2 sigmoid(modulators) (B, KG, Ho, Wo)) of G layers of
    one geometry that all read `x`, layer g's at channels 2Kg.. and Kg.. (`deform_conv2d_siblings`).

    Their offset and modulator convs run as one conv (weights concatenated on every call, so
    training updates them as usual). For the two SSH layers that read the same map this is one
    pass over it instead of four (on the CPU at 80x80, 52 channels: 2.5 vs 4.7 ms)."""
    first = layers[0]
    convs = [layer.offset_conv for layer in layers] + [layer.modulator_conv for layer in layers]
    if any(c.kernel_size != first.offset_conv.kernel_size or c.stride != first.offset_conv.stride
           or c.padding != first.offset_conv.padding for c in convs):
        raise ValueError("shared_coordinates needs deformable convs of one geometry")
    if len(layers) == 1:
        offsets, modulators = first.offset_conv(x), first.modulator_conv(x)
    else:
        weight = torch.cat([c.weight for c in convs])
        bias = torch.cat([c.bias for c in convs])
        out = F.conv2d(x, weight, bias, first.offset_conv.stride, first.offset_conv.padding)
        split = sum(layer.offset_conv.out_channels for layer in layers)
        offsets, modulators = out[:, :split], out[:, split:]
    return offsets, 2.0 * torch.sigmoid(modulators)


__all__: List[str] = [
    "BACKENDS",
    "DeformableConv2d",
    "deform_backend",
    "deform_conv2d",
    "deform_conv2d_fast",
    "deform_conv2d_siblings",
    "get_deform_backend",
    "shared_coordinates",
]

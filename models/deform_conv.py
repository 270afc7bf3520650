"""Modulated deformable convolution (DCNv2) as used in FeatherFace V1's SSH, with a fast CPU path.

`DeformableConv2d` keeps the official FeatherFace checkpoint keys (`offset_conv`,
`modulator_conv`, `regular_conv`). Its forward dispatches between
`torchvision.ops.deform_conv2d` (CUDA, other dtypes, export/compile tracing) and
`deform_conv2d_fast`, a pure-PyTorch CPU implementation with a hand-written backward that
reproduces torchvision's sampling rules (ARCHITECTURE.md section 2.4) several times faster.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torchvision.ops
from torch import Tensor

IntPair = Union[int, Tuple[int, int]]

BACKENDS = ("auto", "torchvision", "fast")

# Set by `deform_backend()`; when not None it wins over every module's own `backend`.
_forced_backend: Optional[str] = None

# Relative cost of gathering + blending one sampled element versus one multiply-add inside a
# matrix multiply (measured on CPU: ~0.4 ns vs ~0.02 ns); used to pick the cheaper order.
_GATHER_COST = 16


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


def get_deform_backend() -> Optional[str]:
    """The backend forced by `deform_backend()`, or None when modules choose for themselves."""
    return _forced_backend


@contextlib.contextmanager
def deform_backend(name: str) -> Iterator[None]:
    """Force every deformable conv inside the block onto one backend ("auto", "torchvision", "fast")."""
    global _forced_backend
    previous = _forced_backend
    _forced_backend = _check_backend(name)
    try:
        yield
    finally:
        _forced_backend = previous


def _is_tracing() -> bool:
    # Exporters and compilers must see torchvision's registered op: the dynamo ONNX exporter
    # maps it to the standard DeformConv node, while the fast path would be traced into
    # data-dependent gathers (or fail on fake tensors).
    return (
        torch.onnx.is_in_onnx_export()
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch.jit.is_scripting()
    )


def _uses_fast(backend: str, x: Tensor) -> bool:
    if _is_tracing() or backend == "torchvision":
        return False
    return backend == "fast" or (x.device.type == "cpu" and x.is_floating_point())


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
    """torchvision.ops.deform_conv2d with backend dispatch; `deform_backend()` overrides `backend`."""
    chosen = _check_backend(_forced_backend if _forced_backend is not None else backend)
    if _uses_fast(chosen, input):
        if input.dtype in (torch.float32, torch.float64):
            return deform_conv2d_fast(input, offset, weight, bias, stride, padding, dilation, mask)
        # torchvision has no CPU kernel for half/bfloat16, and sample positions need float32
        # precision anyway (bfloat16 cannot even represent x = 257.5).
        upcast = [None if t is None else t.float() for t in (input, offset, weight, bias, mask)]
        out = deform_conv2d_fast(*upcast[:4], stride, padding, dilation, upcast[4])
        return out.to(input.dtype)
    return torchvision.ops.deform_conv2d(
        input, offset, weight, bias, _pair(stride, "stride"), _pair(padding, "padding"),
        _pair(dilation, "dilation"), mask,
    )


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
    """Drop-in for torchvision.ops.deform_conv2d (groups = offset groups = 1), differentiable.

    input (B, Cin, H, W), offset (B, 2*kh*kw, Ho, Wo) as (dy, dx) per tap in row-major tap
    order, weight (Cout, Cin, kh, kw), mask (B, kh*kw, Ho, Wo) or None; returns (B, Cout, Ho, Wo).
    """
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
    if b == 0:
        return input.new_zeros(0, cout, ho, wo)
    if mask is None:
        mask = offset.new_ones(b, taps, ho, wo)
    return _DeformConv2dFast.apply(
        input, offset, mask, weight, bias, (kh, kw), (sh, sw), (ph, pw), (dh, dw)
    )


def _sampling_plan(
    offset: Tensor,
    mask: Tensor,
    in_hw: Tuple[int, int],
    kernel: Tuple[int, int],
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Corner rows, blend weights and fractional parts for every (tap, output location).

    Returns idx (K, 4, N) int64 rows of the zero-bordered channels-last table, weights (K, 4, N)
    = mask x bilinear factors, ly and lx (K, N); N = B*Ho*Wo, corners ordered
    (y0,x0), (y0,x1), (y1,x0), (y1,x1).
    """
    b, _, ho, wo = offset.shape
    h, w = in_hw
    kh, kw = kernel
    taps = kh * kw
    dev, dt = offset.device, offset.dtype
    tap_y = torch.arange(kh, device=dev).repeat_interleave(kw) * dilation[0]
    tap_x = torch.arange(kw, device=dev).repeat(kh) * dilation[1]
    base_y = tap_y.view(taps, 1, 1, 1) + (torch.arange(ho, device=dev) * stride[0] - padding[0]).view(1, 1, ho, 1)
    base_x = tap_x.view(taps, 1, 1, 1) + (torch.arange(wo, device=dev) * stride[1] - padding[1]).view(1, 1, 1, wo)
    off = offset.view(b, taps, 2, ho, wo).transpose(0, 1)  # (K, B, 2, Ho, Wo)
    # Same arithmetic as torchvision: integer grid position (as float) plus the learned offset.
    py = base_y.to(dt) + off[:, :, 0]
    px = base_x.to(dt) + off[:, :, 1]
    y0 = py.floor()
    x0 = px.floor()
    ly = (py - y0).reshape(taps, -1)
    lx = (px - x0).reshape(taps, -1)
    hy = 1 - ly
    hx = 1 - lx
    m = mask.transpose(0, 1).reshape(taps, -1)
    weights = torch.stack([hy * hx, hy * lx, ly * hx, ly * lx], 1).mul_(m.unsqueeze(1))
    # The table has a one-pixel zero border, so clamping a corner to [-1, H] (or [-1, W]) lands
    # it on a zero whenever it lies outside the image: torchvision's per-corner validity rule,
    # without masks. Clamping in float first keeps huge offsets from overflowing int64.
    wp = w + 2
    image_start = (torch.arange(b, device=dev) * ((h + 2) * wp)).view(1, b, 1, 1)
    r0 = (y0.clamp(-1, h) + 1).long() * wp + image_start
    r1 = ((y0 + 1).clamp(-1, h) + 1).long() * wp + image_start
    c0 = (x0.clamp(-1, w) + 1).long()
    c1 = ((x0 + 1).clamp(-1, w) + 1).long()
    idx = torch.stack([r0 + c0, r0 + c1, r1 + c0, r1 + c1], 1).view(taps, 4, -1)
    return idx, weights, ly, lx


def _bordered_table(x: Tensor) -> Tensor:
    """(B*(H+2)*(W+2), C) channels-last copy of x with a one-pixel zero border."""
    b, c, h, w = x.shape
    table = x.new_zeros(b, h + 2, w + 2, c)
    table[:, 1:-1, 1:-1] = x.permute(0, 2, 3, 1)
    return table.view(-1, c)


def _project_first(rows: int, n: int, cin: int, cout: int) -> bool:
    """True when mixing channels before sampling (gathering Cout-wide rows) is cheaper."""
    project = rows * cin * cout + 4 * n * cout * _GATHER_COST
    sample = n * cin * cout + 4 * n * cin * _GATHER_COST
    return project < sample


class _DeformConv2dFast(torch.autograd.Function):
    """Bilinear gather per tap with shared corner indices, then per-tap matrix multiplies.

    Sampling commutes with mixing channels, so when Cout < Cin the input is first projected by
    each tap's weight slice and the narrower result is sampled ("project first"); otherwise
    the input is sampled and then multiplied. Both orders accumulate over the K taps in place
    into one (N, Cout) buffer, so no (N, Cin*K) column matrix is ever built.
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
        x = x.contiguous()
        offset = offset.contiguous()
        mask = mask.contiguous()
        idx, weights, ly, lx = _sampling_plan(offset, mask, (h, w), kernel, stride, padding, dilation)
        table = _bordered_table(x)
        # (K, Cin, Cout): tap t's slice of the kernel, ready to right-multiply channels-last rows.
        w_taps = weight.permute(2, 3, 1, 0).reshape(-1, cin, cout)
        n = idx.shape[-1]
        project = _project_first(table.shape[0], n, cin, cout)
        width = cout if project else cin
        # All four corners of a tap are gathered by one index_select into (4, N, width).
        corners = x.new_empty(4, n, width)
        out = x.new_zeros(n, cout)
        if project:
            mixed = x.new_empty(table.shape[0], cout)
            for t in range(idx.shape[0]):
                torch.mm(table, w_taps[t], out=mixed)
                torch.index_select(mixed, 0, idx[t].view(-1), out=corners.view(-1, width))
                _blend_into(out, corners, weights[t])
        else:
            sampled = x.new_empty(n, cin)
            for t in range(idx.shape[0]):
                torch.index_select(table, 0, idx[t].view(-1), out=corners.view(-1, width))
                sampled.zero_()
                _blend_into(sampled, corners, weights[t])
                out.addmm_(sampled, w_taps[t])
        if bias is not None:
            out += bias
        ctx.save_for_backward(table, idx, weights, ly, lx, mask, w_taps)
        ctx.meta = (b, cin, h, w, cout, ho, wo, kernel, project, bias is not None)
        return out.view(b, ho, wo, cout).permute(0, 3, 1, 2).contiguous()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        table, idx, weights, ly, lx, mask, w_taps = ctx.saved_tensors
        b, cin, h, w, cout, ho, wo, kernel, project, has_bias = ctx.meta
        need_x, need_offset, need_mask, need_weight, need_bias = ctx.needs_input_grad[:5]
        need_coord = need_offset or need_mask
        taps, n = idx.shape[0], idx.shape[-1]
        g = grad_out.permute(0, 2, 3, 1).reshape(n, cout)

        g_table = torch.zeros_like(table) if need_x else None
        g_w = table.new_empty(taps, cin, cout) if need_weight else None
        # dots[t, c] = <grad, value at corner c of tap t> per location: offset and mask grads.
        dots = table.new_empty(taps, 4, n) if need_coord else None

        width = cout if project else cin
        corners = table.new_empty(4, n, width)
        products = table.new_empty(4, n, width)
        if project:
            # Here the gradient flows through mixed_t = table @ w_t, sampled with Cout-wide rows.
            mixed = table.new_empty(table.shape[0], cout)
            g_mixed = table.new_empty(table.shape[0], cout) if (need_x or need_weight) else None
            for t in range(taps):
                rows = idx[t].view(-1)
                if need_coord:
                    torch.mm(table, w_taps[t], out=mixed)
                    torch.index_select(mixed, 0, rows, out=corners.view(-1, width))
                    torch.sum(torch.mul(corners, g, out=products), 2, out=dots[t])
                if g_mixed is not None:
                    torch.mul(g, weights[t].unsqueeze(2), out=products)
                    g_mixed.zero_().index_add_(0, rows, products.view(-1, width))
                    if need_x:
                        g_table.addmm_(g_mixed, w_taps[t].t())
                    if need_weight:
                        torch.mm(table.t(), g_mixed, out=g_w[t])
        else:
            g_cols = table.new_empty(n, cin)
            sampled = table.new_empty(n, cin) if need_weight else None
            for t in range(taps):
                rows = idx[t].view(-1)
                torch.mm(g, w_taps[t].t(), out=g_cols)
                if need_weight or need_coord:
                    torch.index_select(table, 0, rows, out=corners.view(-1, width))
                if need_weight:
                    sampled.zero_()
                    _blend_into(sampled, corners, weights[t])
                    torch.mm(sampled.t(), g, out=g_w[t])
                if need_coord:
                    torch.sum(torch.mul(corners, g_cols, out=products), 2, out=dots[t])
                if need_x:
                    torch.mul(g_cols, weights[t].unsqueeze(2), out=products)
                    g_table.index_add_(0, rows, products.view(-1, width))

        g_x = g_offset = g_mask = g_weight = g_bias = None
        if need_x:
            g_x = g_table.view(b, h + 2, w + 2, cin)[:, 1:-1, 1:-1].permute(0, 3, 1, 2).contiguous()
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


def _blend_into(out: Tensor, corners: Tensor, weights: Tensor) -> None:
    """out += sum_c weights[c] * corners[c]; corners (4, N, C), weights (4, N)."""
    for c in range(4):
        out.addcmul_(corners[c], weights[c].unsqueeze(1))


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
        kh, kw = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        taps = kh * kw
        self.offset_conv = nn.Conv2d(in_channels, 2 * taps, (kh, kw), self.stride, self.padding, bias=True)
        self.modulator_conv = nn.Conv2d(in_channels, taps, (kh, kw), self.stride, self.padding, bias=True)
        self.regular_conv = nn.Conv2d(in_channels, out_channels, (kh, kw), self.stride, self.padding, bias=bias)
        for conv in (self.offset_conv, self.modulator_conv):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, Cin, H, W) -> (B, Cout, Ho, Wo)."""
        offset = self.offset_conv(x)  # (B, 2*K, Ho, Wo), (dy, dx) per tap
        mask = 2.0 * torch.sigmoid(self.modulator_conv(x))  # (B, K, Ho, Wo), 1 at init
        return deform_conv2d(
            x, offset, self.regular_conv.weight, self.regular_conv.bias,
            stride=self.stride, padding=self.padding, mask=mask, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


__all__: List[str] = [
    "BACKENDS",
    "DeformableConv2d",
    "deform_backend",
    "deform_conv2d",
    "deform_conv2d_fast",
    "get_deform_backend",
]

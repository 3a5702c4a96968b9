"""The `winograd` variant: the audio encoder's two convolutions computed by Winograd minimal filtering.

`apply_winograd` replaces `encoder.conv1` (kernel 3, stride 1) and `encoder.conv2` (kernel 3,
stride 2) with `WinogradConv1d`, which computes the same correlation as F(m, r): the input is
cut into overlapping tiles, each tile is moved into a transformed domain where the filter
becomes a pointwise product, and the result is moved back. F(m, 3) needs m + 2 multiplications
per m outputs instead of 3m (per pair of channels); the stride-2 convolution is split into its
even and odd phases, an F(m, 2) plus a 1-tap product, 2m + 1 multiplications instead of 3m.

These two convolutions are only 3.5 % (base) to 5 % (tiny) of the encoder's multiply-adds,
less in larger models (the transformer blocks are the rest), so the end-to-end effect is small
whatever the convolutions gain. Measured for base on this 2-core CPU (medians of 20, m = 4):
conv1 3.6 -> 2.9 ms; conv2 11.1 -> 11.0 ms (its 25 % fewer multiplications are spent on the
transforms and copies); both with their GELUs 16.8 -> 15.0 ms. The whole encoder is ~3 %
faster (502 -> 485 ms), but that is layout, not arithmetic: WinogradConv1d returns a view of
a time-major tensor, so the encoder's residual stream is contiguous, where openai-whisper's
`permute(0, 2, 1)` leaves it channels-first through every block; the reference encoder with
one `.contiguous()` added after that permute is as fast.

Numerics: the transforms are exact in exact arithmetic, but their constants grow with m
(F(2, 3): 1 and 1/2; F(4, 3): up to 5 in B^T, 8 in A^T, 1/24 in G; F(6, 3) needs the points
+-1/2 and has 32 in A^T), and with them the float rounding. F(4, 3) on the points 0, +-1, +-2
is the usual safe choice in float32: measured up to 2.5e-6 of the output's magnitude, against
3e-7 for the direct convolution.
"""

from __future__ import annotations

from fractions import Fraction
from math import prod

import torch
from torch import Tensor, nn
from whisper.model import Whisper

from optim.variants.technique import Technique

# Interpolation points in the order they are used: small integers first, then halves, which
# keeps the transform constants, and so the rounding, as small as possible for each size.
POINTS = tuple(Fraction(p) for p in (0, 1, -1, 2, -2, Fraction(1, 2), Fraction(-1, 2)))


def _polynomial_with_roots(roots: tuple[Fraction, ...]) -> list[Fraction]:
    """Coefficients, lowest power first, of prod(x - root)."""
    coefficients = [Fraction(1)]
    for root in roots:
        # x * p(x) - root * p(x)
        coefficients = [shifted - root * same for shifted, same in zip([0, *coefficients], [*coefficients, 0])]
    return coefficients


def winograd_transforms(m: int, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """B^T (n, n), G (n, r) and A^T (m, n) of F(m, r), n = m + r - 1, as float64 tensors.

    For a tile d of n samples and a filter g of r taps, the correlation
    y[i] = sum_j g[j] d[i + j] (i < m) is ``A^T ((G g) * (B^T d))``.

    Toom-Cook: a linear convolution (a product of polynomials of degrees m - 1 and r - 1) is
    found by evaluating both factors at n points (G evaluates the filter), multiplying the
    values and interpolating. Correlation is the transpose of that convolution taken as a map
    of the m-term factor, so the transposed interpolation becomes B^T and the transposed
    evaluation of the m-term factor becomes A^T. The points are the first n - 1 of POINTS plus
    the point at infinity (which takes the leading coefficients). Each Lagrange denominator is
    moved from B^T into G, which is applied once per filter, so that B^T, applied to every
    tile, has integer entries as long as the points are integers (up to F(4, 3)).
    """
    n = m + r - 1
    if n - 1 > len(POINTS):
        raise ValueError(f"F({m}, {r}) needs {n - 1} finite points, only {len(POINTS)} are defined")
    points = POINTS[: n - 1]
    input_rows, filter_rows, output_columns = [], [], []
    for i, point in enumerate(points):
        others = points[:i] + points[i + 1 :]
        # Lagrange basis polynomial of `point`, times its denominator: degree n - 2
        input_rows.append([*_polynomial_with_roots(others), 0])
        denominator = prod(point - other for other in others)
        filter_rows.append([point**power / denominator for power in range(r)])
        output_columns.append([point**power for power in range(m)])
    input_rows.append(_polynomial_with_roots(points))
    filter_rows.append([0] * (r - 1) + [1])
    output_columns.append([0] * (m - 1) + [1])

    def as_tensor(rows: list[list[Fraction]]) -> Tensor:
        return torch.tensor([[float(value) for value in row] for row in rows], dtype=torch.float64)

    return as_tensor(input_rows), as_tensor(filter_rows), as_tensor(output_columns).T.contiguous()


class WinogradConv1d(nn.Module):
    """An `nn.Conv1d` with kernel 3 and padding 1 (stride 1 or 2), computed by Winograd F(m, r).

    Stride 1 is F(m, 3). Stride 2 is split into phases: with the padded input x,
    y[t] = w0 x[2t] + w1 x[2t+1] + w2 x[2t+2], which is the 2-tap correlation of [w0, w2] with
    the even samples, done by F(m, 2), plus w1 times the odd samples, a plain matrix product.

    Computes in the input's dtype, like whisper's Conv1d; the transformed filters stay float32.
    The state_dict holds the transformed filters, not the convolution's weight: build the
    module from a loaded model rather than loading weights into it.
    """

    def __init__(self, conv: nn.Conv1d, m: int = 4):
        super().__init__()
        if (
            conv.kernel_size != (3,)
            or conv.padding != (1,)
            or conv.stride not in ((1,), (2,))
            or conv.dilation != (1,)
            or conv.groups != 1
            or conv.bias is None
        ):
            raise ValueError(f"WinogradConv1d handles kernel 3, padding 1, stride 1 or 2 with a bias, not {conv}")
        self.m = m
        self.stride = conv.stride[0]
        weight = conv.weight.detach().double()  # (out, in, 3)
        taps = weight if self.stride == 1 else weight[..., 0::2]
        input_transform, filter_transform, output_transform = winograd_transforms(m, taps.shape[-1])
        self.tile_size = input_transform.shape[0]  # n = m + r - 1 input samples per m outputs
        self.register_buffer("input_transform", input_transform.float(), persistent=False)
        self.register_buffer("output_transform", output_transform.float(), persistent=False)
        # (n, in, out): at each transform point, the matrix that mixes the channels
        self.register_buffer("filters", torch.einsum("kj,ocj->kco", filter_transform, taps).float())
        # (in, out): the middle tap, applied to the odd phase when the stride is 2
        self.register_buffer("odd_filter", weight[..., 1].T.float().contiguous() if self.stride == 2 else None)
        self.bias = nn.Parameter(conv.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, length = x.shape
        out_length = (length - 1) // self.stride + 1
        n_tiles = -(-out_length // self.m)
        # Time-major (batch, time, channels) inside, so that every product over the channels is
        # a plain matrix product. The padding is the convolution's one zero on each side plus
        # zeros up to a whole number of tiles; the extra outputs are cropped at the end.
        padded = x.new_zeros(batch, self.stride * n_tiles * self.m + 2, channels)
        padded[:, 1 : length + 1] = x.transpose(1, 2)
        if self.stride == 1:
            y = self._correlate(padded)
        else:
            y = self._correlate(padded[:, 0::2])
            y.baddbmm_(padded[:, 1:-1:2], self.odd_filter.to(x.dtype).expand(batch, -1, -1))
        # A (batch, channels, time) view of a time-major tensor: the encoder's permute(0, 2, 1)
        # after conv2 then costs nothing and leaves its residual stream contiguous.
        return y[:, :out_length].transpose(1, 2)

    def _correlate(self, padded: Tensor) -> Tensor:
        """F(m, r) correlation of time-major `padded` with `self.filters`, plus the bias."""
        dtype = padded.dtype
        tiles = padded.unfold(1, self.tile_size, self.m)  # (batch, tiles, channels, n), a view
        batch, n_tiles, channels, _ = tiles.shape
        # One matrix product for all tiles: (n, n) @ (n, batch * tiles * channels)
        transformed = self.input_transform.to(dtype) @ tiles.permute(3, 0, 1, 2).reshape(self.tile_size, -1)
        transformed = transformed.view(self.tile_size, batch * n_tiles, channels)
        # n products (batch * tiles, in) @ (in, out): where the multiplications are saved. One
        # torch.mm each rather than one bmm: torch's CPU bmm gives each thread whole matrices,
        # and 3 or 5 of them do not split evenly over 2 cores (conv2 of base: bmm 6.3 ms, this 5.3)
        filters = self.filters.to(dtype)
        products = transformed.new_empty(self.tile_size, batch * n_tiles, filters.shape[-1])
        for point in range(self.tile_size):
            torch.mm(transformed[point], filters[point], out=products[point])
        # back per tile, (m, n) @ (n, out), adding the bias: the m outputs of each tile come out
        # consecutive, so the tiles are already stitched in time order
        outputs = torch.baddbmm(
            self.bias.to(dtype),
            self.output_transform.to(dtype).expand(batch * n_tiles, -1, -1),
            products.transpose(0, 1),
        )
        return outputs.view(batch, n_tiles * self.m, -1)


def apply_winograd(model: Whisper, m: int = 4) -> Whisper:
    """Replace the audio encoder's conv1 and conv2 with `WinogradConv1d` F(m, .), in place."""
    model.encoder.conv1 = WinogradConv1d(model.encoder.conv1, m)
    model.encoder.conv2 = WinogradConv1d(model.encoder.conv2, m)
    return model


TECHNIQUE = Technique("winograd", apply_winograd, stage=1)

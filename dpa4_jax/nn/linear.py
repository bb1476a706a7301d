"""Linear maps: plain dense layers, per-focus linears, degree-wise (SO(3)) and SO(2) linears.

Weights are stored as (in, out) and applied as ``x @ W``, with the reference's
shapes and names, so that the optimizer routes them as the reference does and
weights import one to one.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


Dtype = Any


def product(spec: str, x: jnp.ndarray, w: jnp.ndarray, matmul_dtype: Dtype | None = None) -> jnp.ndarray:
    """``einsum(spec, x, w)``. With a ``matmul_dtype`` (bf16 mixed precision) both operands are cast to it
    and the products accumulate in float32; the result keeps ``x``'s dtype."""
    if matmul_dtype is None:
        return jnp.einsum(spec, x, w)
    y = jnp.einsum(spec, x.astype(matmul_dtype), w.astype(matmul_dtype), preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def trunc_normal_fan_in_out(scale: float = 1.0, blocks: int = 1):
    """Truncated normal (cut at 3 sigma) with ``sigma = scale / sqrt(fan_in + fan_out)``.

    The fans are those of each of the ``blocks`` equal slices of the last axis
    (one per focus stream); leading axes beyond the last two index independent
    matrices (one per degree).
    """

    def init(key, shape, dtype=jnp.float32):
        fan_in, fan_out = shape[-2], shape[-1] // blocks
        std = scale / (fan_in + fan_out) ** 0.5
        return std * jax.random.truncated_normal(key, -3.0, 3.0, shape, dtype)

    return init


def normal(std: float):
    def init(key, shape, dtype=jnp.float32):
        return std * jax.random.normal(key, shape, dtype)

    return init


def uniform_fan_in(key, shape, dtype=jnp.float32):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)), the reference's default for per-focus linears."""
    bound = 1.0 / shape[0] ** 0.5
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def uniform_per_degree(key, shape, dtype=jnp.float32):
    """U(-1/sqrt(Cin), 1/sqrt(Cin)) for per-degree weights ``(L+1, Cin, Cout)`` (the reference's frame
    expansion and contraction of the SO(3) grid nets)."""
    bound = 1.0 / shape[1] ** 0.5
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class Dense(nn.Module):
    """``act(x @ matrix + bias)``; ``matrix`` ~ N(0, 1/(in+out)), ``bias`` ~ N(0, 1) (reference init)."""

    features: int
    use_bias: bool = False
    activation: Any = None
    zero_init: bool = False
    param_dtype: Dtype = jnp.float32
    matmul_dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        std = 1.0 / (x.shape[-1] + self.features) ** 0.5
        init = nn.initializers.zeros if self.zero_init else normal(std)
        w = self.param("matrix", init, (x.shape[-1], self.features), self.param_dtype)
        y = product("...i,io->...o", x, w, self.matmul_dtype)
        if self.use_bias:
            y = y + self.param("bias", normal(1.0), (self.features,), self.param_dtype)
        return y if self.activation is None else self.activation(y)


class FocusLinear(nn.Module):
    """Independent linear map per focus stream: ``(..., F, Cin) -> (..., F, Cout)``,
    or ``(F, ..., Cin) -> (F, ..., Cout)`` with ``focus_major``.

    ``weight`` has shape ``(Cin, F * Cout)``; the optional ``bias`` ``(F * Cout,)`` starts at zero.
    """

    features: int
    n_focus: int = 1
    init_std: float | None = None
    focus_major: bool = False
    use_bias: bool = False
    param_dtype: Dtype = jnp.float32
    matmul_dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        c_in = x.shape[-1]
        init = uniform_fan_in if self.init_std is None else normal(self.init_std)
        w = self.param("weight", init, (c_in, self.n_focus * self.features), self.param_dtype)
        w = w.reshape(c_in, self.n_focus, self.features)
        spec = "f...i,fio->f...o" if self.focus_major else "...fi,fio->...fo"
        y = product(spec, x, w.transpose(1, 0, 2), self.matmul_dtype)
        if self.use_bias:
            b = self.param("bias", nn.initializers.zeros, (self.n_focus * self.features,), self.param_dtype)
            lead = (1,) * (y.ndim - 2) if self.focus_major else ()  # (F, Cout) broadcast against y's axes
            y = y + b.reshape((self.n_focus,) + lead + (self.features,))
        return y


class DegreeLinear(nn.Module):
    """Degree-wise linear map (paper Eq. 62): one ``(Cin, Cout)`` matrix per degree l,
    shared across m, so it commutes with rotations.

    ``(..., (L+1)^2, Cin) -> (..., (L+1)^2, Cout)``; ``weight`` has shape ``(L+1, Cin, Cout)``,
    initialised by ``kernel_init`` (default: truncated normal, or zeros with ``zero_init``).
    The optional ``bias`` ``(Cout,)`` (zero init) is added to l = 0 only: a constant on l >= 1
    would not rotate with the features.
    """

    lmax: int
    features: int
    zero_init: bool = False
    use_bias: bool = False
    kernel_init: Callable | None = None
    param_dtype: Dtype = jnp.float32
    matmul_dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        init = self.kernel_init or (nn.initializers.zeros if self.zero_init else trunc_normal_fan_in_out())
        w = self.param("weight", init, (self.lmax + 1, x.shape[-1], self.features), self.param_dtype)
        parts = [product("...di,io->...do", x[..., l * l:(l + 1) ** 2, :], w[l], self.matmul_dtype)
                 for l in range(self.lmax + 1)]
        if self.use_bias:
            parts[0] = parts[0] + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        return jnp.concatenate(parts, axis=-2)


class SO2Linear(nn.Module):
    """SO(2)-equivariant linear map on local features (paper Eq. 63-64).

    Works per focus stream on the local features of each |m| (``wigner.rotate_in``): the m = 0 rows
    ``(F, E, L+1, Cin)`` and, for m >= 1, the (-m, +m) pairs ``(F, E, L-m+1, 2, Cin)``; it returns
    them with ``Cout`` channels. The m = 0 rows of all degrees mix freely (``weight_m0``,
    ``((L+1)Cin, F(L+1)Cout)``); every pair ``(a, b)`` of the (-m, +m) rows is multiplied as the
    complex number ``a + ib`` by ``W_u + i W_v`` (``weight_m_{m-1}`` stores ``[W_u | W_v]`` per focus,
    ``((L-m+1)Cin, F 2(L-m+1)Cout)``), as one product with the real form of the complex matrix,
    ``[a | b] [[W_u, W_v], [-W_v, W_u]]``, its rows and columns in the pairs' order. Features of
    different |m| are never multiplied together: the zero blocks of the full matrix cost nothing.

    With ``use_bias`` a scalar bias ``bias0`` ``(F * Cout,)`` (zero init) is added to the (l, m) = (0, 0)
    row, times ``bias_scale`` ``(F, E, Cout)`` when given.
    """

    lmax: int
    mmax: int
    features: int
    n_focus: int = 1
    use_bias: bool = False
    param_dtype: Dtype = jnp.float32
    matmul_dtype: Dtype | None = None

    @nn.compact
    def __call__(self, groups: list[jnp.ndarray], bias_scale: jnp.ndarray | None = None) -> list[jnp.ndarray]:
        n_focus, n_edge, n0, c_in = groups[0].shape
        c_out = self.features
        flat = lambda g: g.reshape(n_focus, n_edge, -1)  # coefficient-major, channel-minor
        w0 = self.param("weight_m0", trunc_normal_fan_in_out(blocks=n_focus),
                        (n0 * c_in, n_focus * n0 * c_out), self.param_dtype)
        w0 = w0.reshape(n0 * c_in, n_focus, n0 * c_out).transpose(1, 0, 2)
        out = [product("fei,fio->feo", flat(groups[0]), w0, self.matmul_dtype).reshape(n_focus, n_edge, n0, c_out)]
        if self.use_bias:
            b = self.param("bias0", nn.initializers.zeros, (n_focus * c_out,), self.param_dtype)
            b = b.reshape(n_focus, 1, c_out)
            out[0] = out[0].at[:, :, 0].add(b if bias_scale is None else b * bias_scale)
        for m in range(1, self.mmax + 1):
            n = self.lmax - m + 1
            # The reference initialises the complex block at 1/sqrt(2) of the fan-in/out scale.
            w = self.param(f"weight_m_{m - 1}", trunc_normal_fan_in_out(scale=0.5**0.5, blocks=n_focus),
                           (n * c_in, n_focus * 2 * n * c_out), self.param_dtype)
            w = w.reshape(n, c_in, n_focus, 2, n, c_out)  # [l_in, c_in, focus, u|v, l_out, c_out]
            w_u, w_v = w[:, :, :, 0], w[:, :, :, 1]
            # [side_in][side_out]: -m -> -m: W_u, -m -> +m: W_v, +m -> -m: -W_v, +m -> +m: W_u.
            real = jnp.stack([jnp.stack([w_u, w_v], axis=4), jnp.stack([-w_v, w_u], axis=4)], axis=1)
            real = real.transpose(3, 0, 1, 2, 4, 5, 6).reshape(n_focus, n * 2 * c_in, n * 2 * c_out)
            y = product("fei,fio->feo", flat(groups[m]), real, self.matmul_dtype)
            out.append(y.reshape(n_focus, n_edge, n, 2, c_out))
        return out


class ChannelLinear(nn.Module):
    """Channel-only linear map ``(..., Cin) -> (..., Cout)``; ``weight (Cin, Cout)``, U(+-1/sqrt(Cin)) init."""

    features: int
    param_dtype: Dtype = jnp.float32
    matmul_dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        w = self.param("weight", uniform_fan_in, (x.shape[-1], self.features), self.param_dtype)
        return product("...i,io->...o", x, w, self.matmul_dtype)

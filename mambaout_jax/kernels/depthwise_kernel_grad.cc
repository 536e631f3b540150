// The depthwise convolution's kernel gradient on the CPU, as one XLA FFI call.
//
//   dk[i, j, c] = sum over n, h, w of xp[n, h + i, w + j, c] * g[n, h, w, c]
//
// xp is the input padded 'same' (N, H + k - 1, W + k - 1, C), g the cotangent (N, H, W, C), dk is
// (k * k, C) float32. XLA computes this as k * k separate reductions per image, each reading the
// image and the cotangent again (mambaout_jax/models/layers.py, the shift form's VJP): memory-bound,
// ~2.7 GFLOP/s. Here every row of g is read once per kernel row i and stays in registers for the k
// taps j of that row, with the k partial sums of a block of channels held in registers across
// the row (k + 1 vector registers of 16 channels): the loop is bound by FMAs, not by memory.
//
// Built on first use by mambaout_jax/kernels/cpu.py (g++ -O3 -march=native).

#include <algorithm>
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Accumulates one image into acc (k * k, C): B channels at a time, starting at channel c0.
template <int K, int B>
void AccumulateBlock(const float* xp, const float* g, float* acc, int64_t H, int64_t W, int64_t C, int64_t c0) {
  const int64_t Wp = W + K - 1;
  for (int64_t h = 0; h < H; ++h) {
    const float* grow = g + (h * W) * C + c0;
    for (int i = 0; i < K; ++i) {
      const float* xrow = xp + ((h + i) * Wp) * C + c0;
      float part[K][B];
      for (int j = 0; j < K; ++j)
        for (int b = 0; b < B; ++b) part[j][b] = 0.0f;
      for (int64_t w = 0; w < W; ++w) {
        const float* gw = grow + w * C;
        const float* xw = xrow + w * C;
        for (int j = 0; j < K; ++j) {
          const float* xj = xw + j * C;
#pragma GCC ivdep
          for (int b = 0; b < B; ++b) part[j][b] += xj[b] * gw[b];
        }
      }
      float* out = acc + (i * K) * C + c0;
      for (int j = 0; j < K; ++j)
        for (int b = 0; b < B; ++b) out[j * C + b] += part[j][b];
    }
  }
}

// The channels left over when C is not a multiple of the block: one channel at a time.
template <int K>
void AccumulateTail(const float* xp, const float* g, float* acc, int64_t H, int64_t W, int64_t C, int64_t c0) {
  for (int64_t c = c0; c < C; ++c) AccumulateBlock<K, 1>(xp, g, acc, H, W, C, c);
}

template <int K>
void AccumulateImages(const float* xp, const float* g, float* acc, int64_t N, int64_t H, int64_t W, int64_t C) {
  constexpr int B = 16;
  const int64_t image_xp = (H + K - 1) * (W + K - 1) * C, image_g = H * W * C;
  const int64_t blocked = C - C % B;
  for (int64_t n = 0; n < N; ++n) {
    const float* x = xp + n * image_xp;
    const float* gn = g + n * image_g;
    for (int64_t c0 = 0; c0 < blocked; c0 += B) AccumulateBlock<K, B>(x, gn, acc, H, W, C, c0);
    if (blocked < C) AccumulateTail<K>(x, gn, acc, H, W, C, blocked);
  }
}

ffi::Error DepthwiseKernelGradImpl(ffi::Buffer<ffi::F32> xp, ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dk) {
  const auto gd = g.dimensions();
  const auto xd = xp.dimensions();
  if (gd.size() != 4 || xd.size() != 4) return ffi::Error::InvalidArgument("expected NHWC inputs");
  const int64_t N = gd[0], H = gd[1], W = gd[2], C = gd[3];
  const int64_t k = xd[1] - H + 1;
  if (xd[0] != N || xd[3] != C || xd[2] - W + 1 != k)
    return ffi::Error::InvalidArgument("padded input and cotangent shapes disagree");
  if (dk->dimensions().size() != 2 || dk->dimensions()[0] != k * k || dk->dimensions()[1] != C)
    return ffi::Error::InvalidArgument("kernel gradient must be (k * k, C)");
  float* out = dk->typed_data();
  std::fill(out, out + k * k * C, 0.0f);
  switch (k) {
    case 7: AccumulateImages<7>(xp.typed_data(), g.typed_data(), out, N, H, W, C); break;
    case 3: AccumulateImages<3>(xp.typed_data(), g.typed_data(), out, N, H, W, C); break;
    case 5: AccumulateImages<5>(xp.typed_data(), g.typed_data(), out, N, H, W, C); break;
    default: return ffi::Error::InvalidArgument("kernel size must be 3, 5 or 7");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MambaOutDepthwiseKernelGrad, DepthwiseKernelGradImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

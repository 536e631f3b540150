// The depthwise 'same' convolution on the CPU, as XLA FFI calls: its forward (which also serves
// as its input gradient) and its kernel gradient. Built on first use by mambaout_jax/kernels/cpu.py
// (g++ -O3 -march=native).
//
// MambaOutDepthwiseForward: y = [x[..., :p], conv(x[..., p:]) + bias], x and y (N, H, W, p + C),
// kernel (k, k, C), bias (C), float32. This is the Gated CNN block's [i, conv(c)] on fc1's [i | c]
// output, in one pass: no padded copy of the input (the taps that would read the padding are
// skipped) and no concatenate. XLA's form (mambaout_jax/models/layers.py, the shift form) is a
// pad, a fused 49-tap loop and a concatenate, 2-3x slower (benchmarks/RESULTS.md). Here each block
// of one vector register of channels of an image is copied once into a cache-resident buffer with
// zero columns on both sides, and tiles of up to 16 output pixels keep their sums and a kernel
// row's taps in registers, loading each input vector once per kernel row; the (image, channel
// block) items are split over XLA's intra-op thread pool.
//
// MambaOutDepthwiseKernelGrad:
//   dk[i, j, c] = sum over n, h, w of xp[n, h + i, w + j, c] * g[n, h, w, c]
//
// xp is the input padded 'same' (N, H + k - 1, W + k - 1, C), g the cotangent (N, H, W, C), dk is
// (k * k, C) float32. XLA computes this as k * k separate reductions per image, each reading the
// image and the cotangent again (mambaout_jax/models/layers.py, the shift form's VJP): memory-bound,
// ~2.7 GFLOP/s. Here every row of g is read once per kernel row i and stays in registers for the k
// taps j of that row, with the k partial sums of a block of channels held in registers across
// the row (k + 1 vector registers of 16 channels): the loop is bound by FMAs, not by memory.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// ---------------------------------------------------------------------------------------------
// Forward.

// One vector register of channels: 16 floats with AVX-512, 8 with AVX2 (GCC's vector extension,
// lowered to whatever -march=native offers).
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float V __attribute__((vector_size(kLanes * sizeof(float))));

struct Shape {
  int64_t N, H, W, Ct, P, C;  // Ct = P + C channels in x and y, the last C convolved
};

// Output pixels [w, w + WB) of row h, one block of channels. S is the block's input with R zero
// columns on each side (row stride Wp); kv the block's k * k taps. Each input vector loaded is used
// for every output of the tile it reaches, with the tile's sums and the row's k taps in registers
// (WB + K + 1 registers). The taps are summed in XLA's order: kernel row i, then column j.
template <int K, int WB>
inline void Tile(const V* S, int64_t Wp, const V* kv, V bias, const Shape& s, int64_t h, int64_t w, float* y,
                 int64_t nb) {
  constexpr int R = K / 2;
  V acc[WB];
  for (int t = 0; t < WB; ++t) acc[t] = V{};
  const int64_t i0 = std::max<int64_t>(0, R - h), i1 = std::min<int64_t>(K, s.H - h + R);
  for (int64_t i = i0; i < i1; ++i) {
    const V* row = S + (h + i - R) * Wp + w;
    V k[K];
    for (int j = 0; j < K; ++j) k[j] = kv[i * K + j];
#pragma GCC unroll 64
    for (int u = 0; u < WB + K - 1; ++u) {
      const V x = row[u];
#pragma GCC unroll 32
      for (int t = 0; t < WB; ++t) {
        const int j = u - t;
        if (j >= 0 && j < K) acc[t] += x * k[j];
      }
    }
  }
  for (int t = 0; t < WB; ++t) {
    const V out = acc[t] + bias;
    std::memcpy(y + (h * s.W + w + t) * s.Ct, &out, nb * sizeof(float));
  }
}

// conv(x[..., c0 : c0 + nb]) + bias of one image (x, y point at the image's first convolved
// channel), nb <= kLanes; the missing lanes of a last partial block are zeros and not stored.
template <int K>
void ConvolveBlock(const float* x, const float* kernel, const float* bias, float* y, const Shape& s, int64_t c0,
                   int64_t nb) {
  constexpr int R = K / 2;
  const int64_t Wp = s.W + 2 * R;
  thread_local std::vector<V> scratch;
  scratch.resize(s.H * Wp + K * K);
  V* S = scratch.data();
  V* kv = S + s.H * Wp;
  for (int64_t h = 0; h < s.H; ++h) {
    V* row = S + h * Wp;
    for (int64_t w = 0; w < R; ++w) row[w] = row[Wp - 1 - w] = V{};
    for (int64_t w = 0; w < s.W; ++w) {
      if (nb < kLanes) row[R + w] = V{};
      std::memcpy(row + R + w, x + (h * s.W + w) * s.Ct + c0, nb * sizeof(float));
    }
  }
  for (int64_t t = 0; t < K * K; ++t) {
    kv[t] = V{};
    std::memcpy(kv + t, kernel + t * s.C + c0, nb * sizeof(float));
  }
  V b{};
  std::memcpy(&b, bias + c0, nb * sizeof(float));
  float* yc = y + c0;
  for (int64_t h = 0; h < s.H; ++h) {
    int64_t w = 0;
    for (; w + 16 <= s.W; w += 16) Tile<K, 16>(S, Wp, kv, b, s, h, w, yc, nb);
    for (; w + 4 <= s.W; w += 4) Tile<K, 4>(S, Wp, kv, b, s, h, w, yc, nb);
    for (; w < s.W; ++w) Tile<K, 1>(S, Wp, kv, b, s, h, w, yc, nb);
  }
}

// Runs body(begin, end) over [0, total) in chunks, on the calling thread and the pool's others.
// The caller claims chunks too and returns once every chunk is done, so the call never waits on
// a pool thread that is busy elsewhere; a task the pool starts late finds no chunk left and only
// touches the shared counters (kept alive by the shared_ptr), never the buffers.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t total, int64_t chunk, const Body& body) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable finished;
  };
  auto state = std::make_shared<State>();
  auto work = [state, total, chunk, body]() {
    for (;;) {
      const int64_t begin = state->next.fetch_add(chunk);
      if (begin >= total) return;
      const int64_t end = std::min(begin + chunk, total);
      body(begin, end);
      if (state->done.fetch_add(end - begin) + (end - begin) == total) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->finished.notify_all();
      }
    }
  };
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t helpers = std::min<int64_t>(threads, (total + chunk - 1) / chunk) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(work)(work));  // a copy: Schedule takes F&&
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->finished.wait(lock, [&] { return state->done.load() == total; });
}

// Work items: (image, block of kLanes channels), plus one per image copying its passthrough channels.
template <int K>
void Forward(ffi::ThreadPool& pool, const float* x, const float* kernel, const float* bias, float* y, const Shape& s) {
  const int64_t blocks = (s.C + kLanes - 1) / kLanes, per_image = blocks + (s.P > 0);
  const int64_t image = s.H * s.W * s.Ct;
  ParallelFor(pool, s.N * per_image, 1, [=](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / per_image, block = item % per_image;
      const float* xn = x + n * image;
      float* yn = y + n * image;
      if (block == blocks) {
        for (int64_t p = 0; p < s.H * s.W; ++p) std::memcpy(yn + p * s.Ct, xn + p * s.Ct, s.P * sizeof(float));
      } else {
        const int64_t c0 = block * kLanes;
        ConvolveBlock<K>(xn + s.P, kernel, bias, yn + s.P, s, c0, std::min<int64_t>(kLanes, s.C - c0));
      }
    }
  });
}

ffi::Error DepthwiseForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                                ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y, int64_t passthrough) {
  const auto xd = x.dimensions();
  const auto kd = kernel.dimensions();
  if (xd.size() != 4) return ffi::Error::InvalidArgument("expected an NHWC input");
  if (kd.size() != 3 || kd[0] != kd[1]) return ffi::Error::InvalidArgument("kernel must be (k, k, C)");
  const Shape s{xd[0], xd[1], xd[2], xd[3], passthrough, xd[3] - passthrough};
  if (passthrough < 0 || s.C != kd[2] || bias.dimensions().size() != 1 || bias.dimensions()[0] != s.C)
    return ffi::Error::InvalidArgument("passthrough + kernel channels must equal the input's channels");
  const auto yd = y->dimensions();
  if (yd.size() != 4 || !std::equal(yd.begin(), yd.end(), xd.begin()))
    return ffi::Error::InvalidArgument("output must have the input's shape");
  const float *xs = x.typed_data(), *ks = kernel.typed_data(), *bs = bias.typed_data();
  float* ys = y->typed_data();
  switch (kd[0]) {
    case 7: Forward<7>(pool, xs, ks, bs, ys, s); break;
    case 3: Forward<3>(pool, xs, ks, bs, ys, s); break;
    case 5: Forward<5>(pool, xs, ks, bs, ys, s); break;
    default: return ffi::Error::InvalidArgument("kernel size must be 3, 5 or 7");
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Kernel gradient.

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

XLA_FFI_DEFINE_HANDLER_SYMBOL(MambaOutDepthwiseForward, DepthwiseForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("passthrough"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MambaOutDepthwiseKernelGrad, DepthwiseKernelGradImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

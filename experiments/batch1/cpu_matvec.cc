// fp32 matrix-vector products for XLA:CPU through the XLA FFI: a fix tried for issue 10's batch-1
// gap and measured by experiments/batch1_limits.py ("ffi-matvec"). It is not part of kvjax: in
// the SmolLM2 step it was no faster than XLA's dot (docs/results.md has the figures).
//
// The idea: a batch-1 step is 211 matrix-vector products that stream the whole model (538 MB)
// once per token, and XLA runs each on one core while two cores stream faster than one (the
// roofline rows of batch1_limits.py). So the kernel splits each product over the calling thread
// plus XLA's intra-op pool.
//
// KvjaxMatvecInOut: y[m, n] = sum_d x[m, d] * w[d, n], w: [in, out] as kvjax stores the layer
// weights; x is [..., in] (the leading dims flattened to m), y is [..., out]. Every output
// element is written by exactly one task, so results do not depend on how the work was split.
//
// Work is cut into chunks of output columns that tasks claim from an atomic counter. The caller
// claims chunks too, and waits only for chunks that another thread has already claimed, so a
// helper that never gets scheduled (a busy pool) cannot deadlock a call: the caller then does
// every chunk itself.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Problem {
  const float* w;
  const float* x;
  float* y;
  int64_t m, in, out;
};

inline void relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

// ---- w [in, out]: four input rows at a time added into y[n0:n1] (kept in L1). ----
void in_out_columns(const Problem& p, int64_t n0, int64_t n1) {
  const int64_t out = p.out;
  for (int64_t r = 0; r < p.m; ++r) {
    const float* x = p.x + r * p.in;
    float* y = p.y + r * out;
    for (int64_t n = n0; n < n1; ++n) y[n] = 0.0f;
    int64_t d = 0;
    for (; d + 4 <= p.in; d += 4) {
      const float x0 = x[d], x1 = x[d + 1], x2 = x[d + 2], x3 = x[d + 3];
      const float* w0 = p.w + d * out;
      const float* w1 = w0 + out;
      const float* w2 = w1 + out;
      const float* w3 = w2 + out;
      int64_t n = n0;
#if defined(__AVX512F__)
      const __m512 v0 = _mm512_set1_ps(x0), v1 = _mm512_set1_ps(x1);
      const __m512 v2 = _mm512_set1_ps(x2), v3 = _mm512_set1_ps(x3);
      for (; n + 16 <= n1; n += 16) {
        __m512 acc = _mm512_loadu_ps(y + n);
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + n), v0, acc);
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(w1 + n), v1, acc);
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(w2 + n), v2, acc);
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(w3 + n), v3, acc);
        _mm512_storeu_ps(y + n, acc);
      }
#endif
      for (; n < n1; ++n) y[n] += w0[n] * x0 + w1[n] * x1 + w2[n] * x2 + w3[n] * x3;
    }
    for (; d < p.in; ++d) {
      const float xd = x[d];
      const float* wd = p.w + d * out;
      for (int64_t n = n0; n < n1; ++n) y[n] += wd[n] * xd;
    }
  }
}

struct Split {
  Problem problem;
  int64_t chunk, n_chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void work() {
    for (;;) {
      const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= n_chunks) return;
      const int64_t n0 = c * chunk;
      in_out_columns(problem, n0, std::min(problem.out, n0 + chunk));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Below this many weight bytes a second thread costs more than it saves.
constexpr int64_t kMinParallelBytes = 256 * 1024;

// Output columns are split in chunks of a multiple of `align` (the kernel's vector width).
void run(ffi::ThreadPool& pool, const Problem& p, int64_t align) {
  const int64_t bytes = p.in * p.out * static_cast<int64_t>(sizeof(float));
  const int64_t cores = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t threads = std::min<int64_t>(cores, pool.num_threads() + 1);
  if (bytes < kMinParallelBytes || threads < 2) {
    in_out_columns(p, 0, p.out);
    return;
  }
  // Two chunks per thread: enough to even out a late helper, few enough to keep long streams.
  auto split = std::make_shared<Split>();
  split->problem = p;
  int64_t chunk = (p.out + 2 * threads - 1) / (2 * threads);
  chunk = (chunk + align - 1) / align * align;
  split->chunk = chunk;
  split->n_chunks = (p.out + chunk - 1) / chunk;
  for (int64_t i = 1; i < threads; ++i) pool.Schedule([split] { split->work(); });
  split->work();
  while (split->done.load(std::memory_order_acquire) < split->n_chunks) relax();
}

ffi::Error MatvecInOut(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y) {
  auto wd = w.dimensions();
  if (wd.size() != 2) return ffi::Error::InvalidArgument("kvjax matvec: w must be 2-D");
  const int64_t in = wd[0], out = wd[1];
  const int64_t x_size = x.element_count();
  if (in <= 0 || x_size % in != 0 || static_cast<int64_t>(y->element_count()) != x_size / in * out)
    return ffi::Error::InvalidArgument("kvjax matvec: x, w and y shapes do not agree");
  run(pool, Problem{w.typed_data(), x.typed_data(), y->typed_data(), x_size / in, in, out}, 16);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KvjaxMatvecInOut, MatvecInOut,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

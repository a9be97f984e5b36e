// A plain read of a buffer on 1..N threads, for benchmarks/stream_sizes.py: the rate a weight stream
// with no work between its cache misses reaches on this host, the ceiling the one-row matmuls'
// stream curves are read against. Each thread sums its contiguous part (32-byte loads with AVX2,
// else 8-byte ones) and prefetches `prefetch` bytes ahead into L2 as the int8 stream does on AVX2
// (matmul.h: stream_ahead; 0: the hardware prefetcher alone). Built by meshlm.kernels.build.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <thread>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

uint64_t read_part(const char* p, int64_t n, int64_t prefetch) {
  uint64_t sum = 0;
  int64_t i = 0;
#if defined(__AVX2__)
  __m256i a = _mm256_setzero_si256(), b = a;
  for (; i + 128 <= n; i += 128) {
    if (prefetch > 0) {
      _mm_prefetch(p + i + prefetch, _MM_HINT_T1);
      _mm_prefetch(p + i + prefetch + 64, _MM_HINT_T1);
    }
    a = _mm256_add_epi64(a, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
    b = _mm256_add_epi64(b, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 32)));
    a = _mm256_add_epi64(a, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 64)));
    b = _mm256_add_epi64(b, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 96)));
  }
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), _mm256_add_epi64(a, b));
  for (uint64_t v : lanes) sum += v;
#endif
  for (; i + 8 <= n; i += 8) {
    if (prefetch > 0 && i % 64 == 0) __builtin_prefetch(p + i + prefetch, 0, 2);
    uint64_t v;
    __builtin_memcpy(&v, p + i, 8);
    sum += v;
  }
  for (; i < n; ++i) sum += static_cast<unsigned char>(p[i]);
  return sum;
}

}  // namespace

// Seconds that `passes` reads of p[0, bytes) took on `threads` threads (each pass split into
// contiguous parts at 64-byte boundaries, one per thread; threads started once per pass). *sum, if
// given, gets what was read: the buffer's little-endian 64-bit words and its last bytes past a
// whole word, added up (mod 2^64) once per pass, whatever the thread count.
extern "C" double meshlm_plain_read(const char* p, int64_t bytes, int threads, int64_t passes, int64_t prefetch,
                                    uint64_t* sum) {
  threads = std::max(1, threads);
  std::vector<uint64_t> sums(threads);
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t pass = 0; pass < passes; ++pass) {
    std::vector<std::thread> helpers;
    auto part = [&](int t) {
      const int64_t lo = bytes * t / threads / 64 * 64, hi = t + 1 == threads ? bytes : bytes * (t + 1) / threads / 64 * 64;
      sums[t] += read_part(p + lo, hi - lo, prefetch);
    };
    for (int t = 1; t < threads; ++t) helpers.emplace_back(part, t);
    part(0);
    for (auto& h : helpers) h.join();
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  volatile uint64_t total = 0;  // used, so the reads cannot be dropped
  for (uint64_t v : sums) total = total + v;
  if (sum) *sum = total;
  return s;
}

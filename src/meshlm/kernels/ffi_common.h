// Shared by meshlm's XLA FFI CPU kernels: error futures, the work split over XLA's intra-op pool,
// the AVX-512 lane mask of a tail.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define UNROLL _Pragma("GCC unroll 16")  // fixed-trip tile loops: keep accumulators in registers

namespace meshlm {

#if defined(__AVX512F__)
inline __mmask16 tail_mask(int64_t n) {  // first n of 16 lanes (n may be <= 0 or >= 16)
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}
#endif

namespace ffi = xla::ffi;

inline constexpr int64_t kMinBytesPerTask = 1 << 16;  // smaller work runs inline: splitting costs more
inline constexpr int64_t kChunksPerThread = 4;
// How long a helper keeps spinning for the next job after its last one. A decode step is ~150
// kernel calls microseconds apart; a helper that went back to sleep in the pool takes longer to
// wake (futex + IPI on a VM) than most of those calls take, so the caller would do them alone.
inline constexpr auto kLinger = std::chrono::microseconds(200);

inline ffi::Future failed(ffi::Error error) {
  ffi::Promise promise;
  ffi::Future future(promise);
  promise.SetError(std::move(error));
  return future;
}

inline ffi::Future done_future() {
  ffi::Promise promise;
  ffi::Future future(promise);
  promise.SetAvailable();
  return future;
}

// One kernel call split into chunks that threads claim from a counter.
struct Job {
  std::function<void(int64_t)> chunk;  // runs chunk i
  int64_t chunks = 0;
  std::atomic<int64_t> next{0}, finished{0};

  void drain() {
    for (int64_t i; (i = next.fetch_add(1)) < chunks;) {
      chunk(i);
      finished.fetch_add(1, std::memory_order_release);
    }
  }
};

// Jobs that helpers may join, and the helpers' bookkeeping. One per process: every simulated device
// and every kernel shares it.
class Board {
 public:
  static Board& get() {
    static Board* board = new Board;  // never destroyed: helpers may outlive static destruction
    return *board;
  }

  void post(const std::shared_ptr<Job>& job) {
    std::lock_guard<std::mutex> lock(mu_);
    jobs_.push_back(job);
    open_.fetch_add(1);
  }

  void retire(const Job* job) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = jobs_.begin(); it != jobs_.end(); ++it)
      if (it->get() == job) {
        jobs_.erase(it);
        open_.fetch_sub(1);
        return;
      }
  }

  // Make sure up to `want` helpers are around (spinning, or working on jobs).
  void recruit(ffi::ThreadPool& pool, int64_t want) {
    for (int64_t alive = alive_.load(); alive < want; alive = alive_.load())
      if (alive_.compare_exchange_weak(alive, alive + 1)) pool.Schedule([this] { linger(); });
  }

 private:
  std::shared_ptr<Job> pick() {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& j : jobs_)
      if (j->next.load() < j->chunks) return j;
    return nullptr;
  }

  // A helper: joins posted jobs until none has come for kLinger, then returns its pool thread.
  void linger() {
    auto deadline = std::chrono::steady_clock::now() + kLinger;
    for (;;) {
      if (open_.load() > 0) {
        if (auto job = pick()) {
          job->drain();
          deadline = std::chrono::steady_clock::now() + kLinger;
          continue;
        }
      }
      if (std::chrono::steady_clock::now() > deadline) break;
#if defined(__x86_64__)
      __builtin_ia32_pause();
#endif
    }
    alive_.fetch_sub(1);
  }

  std::mutex mu_;
  std::vector<std::shared_ptr<Job>> jobs_;
  std::atomic<int64_t> open_{0}, alive_{0};
};

// Chunk i of [0, C) split into `chunks` chunks aligned to `align`: [lo, hi).
inline std::pair<int64_t, int64_t> chunk_range(int64_t C, int64_t align, int64_t chunks, int64_t i) {
  const int64_t units = (C + align - 1) / align;
  return {std::min(C, units * i / chunks * align), std::min(C, units * (i + 1) / chunks * align)};
}

// How many chunks run_split makes of [0, C): up to chunks_per_thread per thread of the pool, no
// more than `align` units, none of less than kMinBytesPerTask of the `bytes` (1: run inline).
inline int64_t split_chunks(ffi::ThreadPool& pool, int64_t C, int64_t align, int64_t bytes,
                            int64_t chunks_per_thread = kChunksPerThread) {
  const int64_t units = (C + align - 1) / align;
  const int64_t threads = std::min({std::max<int64_t>(1, pool.num_threads()), units,
                                    std::max<int64_t>(1, bytes / kMinBytesPerTask)});
  return threads <= 1 ? 1 : std::min(units, threads * chunks_per_thread);
}

// body(i, lo, hi) for each chunk i of [0, C) (chunk_range), claimed from a counter by the calling
// thread and up to chunks - 1 helpers (Board). The caller works through chunks itself, then waits
// only for chunks a helper has already claimed (so it is never slower than running alone by more
// than one chunk, and never waits on a thread that has not started), and returns a completed
// Future: XLA's continuation stays on the caller's thread. Nothing ever waits for a pool thread to
// be scheduled, so simulated devices sharing the pool cannot deadlock.
template <typename Body>
ffi::Future run_split_indexed(ffi::ThreadPool& pool, int64_t C, int64_t align, int64_t chunks, Body body) {
  if (chunks <= 1) {
    body(int64_t(0), int64_t(0), C);
    return done_future();
  }
  auto job = std::make_shared<Job>();
  job->chunks = chunks;
  job->chunk = [&body, C, align, chunks](int64_t i) {
    const auto [lo, hi] = chunk_range(C, align, chunks, i);
    body(i, lo, hi);
  };
  Board& board = Board::get();
  board.post(job);
  board.recruit(pool, std::min(chunks, std::max<int64_t>(1, pool.num_threads())) - 1);
  job->drain();
  board.retire(job.get());
  while (job->finished.load(std::memory_order_acquire) < chunks) {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#endif
  }
  return done_future();
}

// body(lo, hi) over [0, C) in split_chunks chunks (run_split_indexed).
template <typename Body>
ffi::Future run_split(ffi::ThreadPool& pool, int64_t C, int64_t align, int64_t bytes, Body body,
                      int64_t chunks_per_thread = kChunksPerThread) {
  return run_split_indexed(pool, C, align, split_chunks(pool, C, align, bytes, chunks_per_thread),
                           [&body](int64_t, int64_t lo, int64_t hi) { body(lo, hi); });
}

inline std::string shape_str(ffi::Span<const int64_t> d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

}  // namespace meshlm

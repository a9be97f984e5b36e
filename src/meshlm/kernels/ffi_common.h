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

// Work posted on the Board that helpers may join. It belongs to the thread that posts it, which
// takes it off the Board (Board::retire) before it goes: retire waits until every helper that picked
// it has left join(), so a task can live on the poster's stack or be reused for its next call.
struct Task {
  virtual ~Task() = default;
  virtual bool wanted() const = 0;  // is there work left that a joining thread could take?
  virtual void join() = 0;          // take work until none is left to take
  std::atomic<int64_t> users{0};    // helpers between Board::pick and the end of their join()
};

// The 64-byte lines of [p, p + bytes) into L2: a share's first data, fetched by a thread waiting to
// run it (Team's warm).
inline void prefetch_l2(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, 0, 2);
}

inline void spin_pause() {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#endif
}

// n atomics set to `value`, in storage kept from call to call (grown, never shrunk): a call's flags
// and counters without an allocation a call.
template <typename T>
class Atomics {
 public:
  std::atomic<T>* fill(int64_t n, T value) {
    if (n > size_) data_ = std::make_unique<std::atomic<T>[]>(n), size_ = n;
    for (int64_t i = 0; i < n; ++i) data_[i].store(value, std::memory_order_relaxed);
    return data_.get();
  }

 private:
  std::unique_ptr<std::atomic<T>[]> data_;
  int64_t size_ = 0;
};

// One kernel call split into chunks that threads claim from a counter.
struct Job : Task {
  std::function<void(int64_t)> chunk;  // runs chunk i
  int64_t chunks = 0;
  std::atomic<int64_t> next{0};

  bool wanted() const override { return next.load() < chunks; }
  void join() override { drain(); }
  void drain() {
    for (int64_t i; (i = next.fetch_add(1)) < chunks;) chunk(i);
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

  void post(Task* job) {
    std::lock_guard<std::mutex> lock(mu_);
    jobs_.push_back(job);
    open_.fetch_add(1);
    posted_.fetch_add(1, std::memory_order_release);
  }

  // Takes job off the Board and returns once no helper is inside it.
  void retire(Task* job) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = std::find(jobs_.begin(), jobs_.end(), job);
      if (it != jobs_.end()) {
        jobs_.erase(it);
        open_.fetch_sub(1);
      }
    }
    while (job->users.load(std::memory_order_acquire) > 0) spin_pause();
  }

  // Make sure up to `want` helpers are around (spinning, or working on jobs).
  void recruit(ffi::ThreadPool& pool, int64_t want) {
    for (int64_t alive = alive_.load(); alive < want; alive = alive_.load())
      if (alive_.compare_exchange_weak(alive, alive + 1)) pool.Schedule([this] { linger(); });
  }

 private:
  // A wanted job, counted as used (under the lock, so retire cannot miss it), or null.
  Task* pick() {
    std::lock_guard<std::mutex> lock(mu_);
    for (Task* j : jobs_)
      if (j->wanted()) {
        j->users.fetch_add(1, std::memory_order_relaxed);
        return j;
      }
    return nullptr;
  }

  // A helper: joins posted jobs until none has come for kLinger, then returns its pool thread. It
  // looks for work again only after a post (or a job it finished): spinning on pick()'s lock kept
  // the caller's retire waiting ~1 us a call.
  void linger() {
    auto deadline = std::chrono::steady_clock::now() + kLinger;
    for (int64_t seen = -1;;) {
      const int64_t posted = posted_.load(std::memory_order_acquire);
      if (posted != seen && open_.load() > 0) {
        if (Task* job = pick()) {
          job->join();
          job->users.fetch_sub(1, std::memory_order_release);  // job may be gone from here on
          deadline = std::chrono::steady_clock::now() + kLinger;
          continue;
        }
        seen = posted;
      }
      if (std::chrono::steady_clock::now() > deadline) break;
      spin_pause();
    }
    alive_.fetch_sub(1);
  }

  // The counters helpers spin on, each on its own cache line, away from the lock and the list the
  // caller writes (on one line, post and recruit took ~1.3 us a call against ~0.5).
  std::mutex mu_;
  std::vector<Task*> jobs_;
  alignas(64) std::atomic<int64_t> open_{0};
  alignas(64) std::atomic<int64_t> posted_{0};
  alignas(64) std::atomic<int64_t> alive_{0};
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
  Job job;
  job.chunks = chunks;
  job.chunk = [&body, C, align, chunks](int64_t i) {
    const auto [lo, hi] = chunk_range(C, align, chunks, i);
    body(i, lo, hi);
  };
  Board& board = Board::get();
  board.post(&job);
  board.recruit(pool, std::min(chunks, std::max<int64_t>(1, pool.num_threads())) - 1);
  job.drain();
  board.retire(&job);  // returns once every helper has left, so its claimed chunks are done
  return done_future();
}

// body(lo, hi) over [0, C) in split_chunks chunks (run_split_indexed).
template <typename Body>
ffi::Future run_split(ffi::ThreadPool& pool, int64_t C, int64_t align, int64_t bytes, Body body,
                      int64_t chunks_per_thread = kChunksPerThread) {
  return run_split_indexed(pool, C, align, split_chunks(pool, C, align, bytes, chunks_per_thread),
                           [&body](int64_t, int64_t lo, int64_t hi) { body(lo, hi); });
}

// A kernel call of several steps as one task (decoder_layer.cc): phases of shares that the calling
// thread and its helpers work through in order. The thread that finishes a phase's last share runs
// the phase's serial work (`then`) and opens the next phase; the others spin until it opens. One
// post, recruit and retire per call instead of one per step, and a helper is already spinning in
// the call when a phase opens instead of finding the next step's job on the Board (~1 us later).
// Each thread has a rank (the caller 0, helpers 1, 2, ... as they join) and takes share `rank` of a
// phase first, then whichever are left, so it knows its next share while it waits for the phase
// to open and can warm it (phase's `warm`: e.g. its first weight lines into L2).
// As in run_split, the caller takes every share no helper has claimed and waits only on shares a
// running thread holds, never on a pool thread being scheduled: simulated devices cannot deadlock.
// A calling thread reuses one Team (local()) and its phases' storage from call to call: built and
// freed afresh, a decoder layer's Team took ~2 us a call in allocations, part of them freed on
// the helper's thread.
class Team : public Task {
 public:
  using Share = std::function<void(int64_t)>;
  // The calling thread's Team, with no phases (what the last call left is cleared).
  static Team& local() {
    thread_local Team team;
    team.first_.clear();
    team.used_ = 0;
    team.opened_.store(0, std::memory_order_relaxed);
    team.ranks_.store(1, std::memory_order_relaxed);
    return team;
  }
  // A phase of `shares` (>= 1) calls share(i), i < shares, in any order, on any of the threads;
  // warm(i), if given, is called by the thread likely to run share i before the phase opens.
  void phase(int64_t shares, Share share, Share warm = nullptr) {
    if (used_ == int64_t(phases_.size())) phases_.push_back(std::make_unique<Phase>());
    phases_[used_++]->reset(std::max<int64_t>(1, shares), std::move(share), std::move(warm));
  }
  // Serial work after the last phase added (before any phase: at the start, on the caller).
  void then(std::function<void()> fn) { (used_ == 0 ? first_ : phases_[used_ - 1]->then).push_back(std::move(fn)); }
  // fn(b) for rows b < B: a phase of row ranges when their `bytes` are worth splitting
  // (split_chunks), else serial work.
  template <typename Fn>
  void rows(ffi::ThreadPool& pool, int64_t B, int64_t bytes, Fn fn) {
    const int64_t n = split_chunks(pool, B, 1, bytes);
    if (n <= 1) return then([B, fn] {
      for (int64_t b = 0; b < B; ++b) fn(b);
    });
    phase(n, [B, n, fn](int64_t i) {
      const auto [lo, hi] = chunk_range(B, 1, n, i);
      for (int64_t b = lo; b < hi; ++b) fn(b);
    });
  }

  // Every phase, with whichever helpers join; returns once all are done.
  void run(ffi::ThreadPool& pool) {
    int64_t most = 1;
    for (int64_t k = 0; k < used_; ++k) most = std::max(most, phases_[k]->shares);
    Board& board = Board::get();
    if (most > 1) {
      board.post(this);
      board.recruit(pool, std::min(most, std::max<int64_t>(1, pool.num_threads())) - 1);
    }
    for (auto& fn : first_) fn();
    opened_.store(1, std::memory_order_release);
    work(0, 0);
    // returns once no helper is inside: every phase is done (the caller ran what no helper claimed)
    // and the Team may be reused
    if (most > 1) board.retire(this);
  }

  bool wanted() const override { return opened_.load() <= used_; }
  void join() override {
    const int64_t rank = ranks_.fetch_add(1);
    work(std::max<int64_t>(0, opened_.load(std::memory_order_acquire) - 1), rank);
  }

 private:
  struct Phase {
    void reset(int64_t n, Share fn, Share w) {
      shares = n, share = std::move(fn), warm = std::move(w);
      then.clear();
      done.store(0, std::memory_order_relaxed);
      taken = flags.fill(n, false);
    }
    // share `rank` if free, else the first free one; -1: none left
    int64_t claim(int64_t rank) {
      if (rank < shares && !taken[rank].load(std::memory_order_relaxed) && !taken[rank].exchange(true)) return rank;
      for (int64_t i = 0; i < shares; ++i)
        if (!taken[i].load(std::memory_order_relaxed) && !taken[i].exchange(true)) return i;
      return -1;
    }
    int64_t shares = 0;
    Share share, warm;
    std::vector<std::function<void()>> then;
    Atomics<bool> flags;
    std::atomic<bool>* taken = nullptr;  // share i claimed (flags' storage)
    std::atomic<int64_t> done{0};
  };

  // Phases k, k + 1, ...: take their unclaimed shares as each opens. A thread that reaches a phase
  // before it opens claims share `rank` at once (the caller then waits for it as for any claimed
  // share, so what warm reads stays alive) and warms it while it waits.
  void work(int64_t k, int64_t rank) {
    for (const int64_t P = used_; k < P; ++k) {
      Phase& ph = *phases_[k];
      int64_t mine = -1;
      if (ph.warm && rank < ph.shares && opened_.load(std::memory_order_acquire) <= k &&
          !ph.taken[rank].load(std::memory_order_relaxed) && !ph.taken[rank].exchange(true)) {
        mine = rank;
        ph.warm(rank);
      }
      while (opened_.load(std::memory_order_acquire) <= k) spin_pause();
      if (mine >= 0) run_share(ph, k, mine);
      for (int64_t i; (i = ph.claim(rank)) >= 0;) run_share(ph, k, i);
    }
  }

  void run_share(Phase& ph, int64_t k, int64_t i) {
    ph.share(i);
    if (ph.done.fetch_add(1, std::memory_order_acq_rel) + 1 == ph.shares) {  // the phase's last share
      for (auto& fn : ph.then) fn();
      opened_.store(k + 2, std::memory_order_release);
    }
  }

  std::vector<std::function<void()>> first_;
  std::vector<std::unique_ptr<Phase>> phases_;  // the first used_ are this call's
  int64_t used_ = 0;
  std::atomic<int64_t> opened_{0};  // phases [0, opened_) are open; used_ + 1: all done
  std::atomic<int64_t> ranks_{1};   // the next helper's rank (the caller is 0)
};

inline std::string shape_str(ffi::Span<const int64_t> d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

}  // namespace meshlm

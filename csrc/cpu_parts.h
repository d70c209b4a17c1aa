// Thread-level helpers shared by the fused CPU kernels (semclip_cpu.cpp: the softmax partitions;
// sigmoid_cpu.cpp: the sigmoid pair loss): row-block parts, denormal flushing, ordered column deposits.
#pragma once

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <vector>

#if defined(__SSE2__)
#include <xmmintrin.h>
#endif

namespace semclip {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Flush denormals to zero (FTZ + DAZ) on this thread while a part runs. In peaked softmaxes the gradient
// weights of far tiles reach 1e-40 and below; as denormals they would send every FMA of the BLAS products
// through a slow microcode path, and their value is ~1e-32 of the row's unit mass anyway.
struct FlushDenormals {
#if defined(__SSE2__)
  unsigned int saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

// The row blocks split into n_parts contiguous parts, one per thread, processed by at::parallel_for.
// Parts (not thread ids) index the per-part accumulators, so results depend only on the thread count.
struct Parts {
  int64_t n_rb, count;
  explicit Parts(int64_t n_row_blocks)
      : n_rb(n_row_blocks), count(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_row_blocks))) {}
  int64_t begin(int64_t part) const { return part * n_rb / count; }
  int64_t end(int64_t part) const { return (part + 1) * n_rb / count; }
  // fn(part) for every part; a thread given several parts runs them in increasing order.
  template <typename F>
  void run(const F& fn) const {
    at::parallel_for(0, count, 1, [&](int64_t first, int64_t last) {
      for (int64_t part = first; part < last; ++part) fn(part);
    });
  }
};

// grad_cols of a column block collects from every part. Each part sums its own contributions in a private
// block_cols × d buffer, then deposits it: with more than two parts in part order (0, 1, …), deterministic,
// and the parts sweep the column blocks in the same order, so a part rarely waits for its turn; with two
// parts in either order, because 0 + a + b and 0 + b + a are the same bits (IEEE addition commutes), so the
// first part to finish a column block adds first and neither waits for the other.
class ColumnDeposits {
 public:
  ColumnDeposits(int64_t n_parts, int64_t n_col_blocks)
      : ordered_(n_parts > 2), deposits_(n_col_blocks, 0), col_locks_(ordered_ ? 0 : n_col_blocks) {}

  // Runs add() (which adds the part's share of column block cb, if it has one) in the deterministic order.
  template <typename F>
  void deposit(int64_t part, int64_t cb, bool has_share, const F& add) {
    if (ordered_) {
      std::unique_lock<std::mutex> lock(mutex_);
      done_.wait(lock, [&] { return deposits_[cb] == part || failed_; });
      TORCH_CHECK(!failed_, "semclip_kernels._C: another part of the backward failed");
      lock.unlock();
      if (has_share) add();
      lock.lock();
      deposits_[cb] += 1;
      done_.notify_all();
    } else if (has_share) {
      std::lock_guard<std::mutex> lock(col_locks_[cb]);
      add();
    }
  }

  // A part threw: wake every waiting part so that none waits forever.
  void fail() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      failed_ = true;
    }
    done_.notify_all();
  }

 private:
  const bool ordered_;
  std::vector<int64_t> deposits_;  // parts that have added their share of each column block
  std::vector<std::mutex> col_locks_;
  std::mutex mutex_;
  std::condition_variable done_;
  bool failed_ = false;
};

}  // namespace semclip

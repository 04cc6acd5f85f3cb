// cuda_emu.h -- just enough of CUDA for snncc's generated kernels to compile and run as host C++17 (g++).
//
// Execution model (what tests/cuda_emu/__init__.py's wrappers do through emu::launch):
//   * blocks one after another; inside a block, warps one after another;
//   * a kernel with warp collectives (__ballot_sync): each lane of a warp is a fiber (ucontext, its own
//     stack) and the lanes meet at every collective: the scheduler runs each live lane until it reaches
//     the ballot or returns, then completes the ballot with all their predicates and resumes them, so the
//     ballot sees the 32 lanes as on hardware (lockstep at the collectives, free-running in between).
//     Fibers rather than one OS thread per lane: the same barrier semantics, deterministic (a failure
//     reproduces exactly) and ~20x faster on a 2-core machine than 32 threads waking at every ballot;
//   * a lane that returns leaves its warp ("arrive and drop"): later ballots don't wait for it, and a
//     ballot whose mask names an exited lane is reported as an error (undefined behaviour on a GPU,
//     what compute-sanitizer's synccheck flags) instead of silently giving a result; so are lanes of
//     one ballot with different masks, and a lane the mask names that never arrives;
//   * a kernel without collectives: any order of its threads is a valid CUDA execution, so the lanes run
//     one after another on the caller's thread.
// No __syncthreads / shared memory: the harness refuses sources that use them (warps of a block would have
// to run concurrently). Errors are collected and returned by the launch; the wrapper never throws
// across the C boundary.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <ucontext.h>

#include <algorithm>
#include <exception>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define EMU_EXPORT __attribute__((visibility("default")))
// g++ knows __restrict__ itself.

struct uint3 { unsigned int x, y, z; };
struct dim3 {
  unsigned int x, y, z;
  dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

// the built-in variables, set before each lane runs (thread_local: a launch owns its calling thread)
inline thread_local uint3 threadIdx = {0, 0, 0};
inline thread_local uint3 blockIdx = {0, 0, 0};
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
static const int warpSize = 32;

// ---------------------------------------------------------------------------------------------- half types
// float16: g++ 12 has _Float16 on x86-64 (IEEE binary16, conversions round to nearest even, as __float2half).
typedef _Float16 __half;

// bfloat16: no __bf16 arithmetic in g++ 12, so a storage struct with CUDA's float conversions.
struct __nv_bfloat16 {
  unsigned short raw;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) {              // round to nearest even, NaN stays a (quiet) NaN: __float2bfloat16
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) { raw = (unsigned short)((u >> 16) | 0x40u); return; }
    u += 0x7fffu + ((u >> 16) & 1u);
    raw = (unsigned short)(u >> 16);
  }
  // from double would round twice through float here: the kernels never need it, so it must not compile.
  __nv_bfloat16(double) = delete;
  operator float() const {
    uint32_t u = (uint32_t)raw << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
  }
};

// ---------------------------------------------------------------------------------------------- atomics
inline unsigned int atomicOr(unsigned int* address, unsigned int val) {
  return __atomic_fetch_or(address, val, __ATOMIC_RELAXED);
}
inline int atomicOr(int* address, int val) { return __atomic_fetch_or(address, val, __ATOMIC_RELAXED); }
inline unsigned int atomicAdd(unsigned int* address, unsigned int val) {
  return __atomic_fetch_add(address, val, __ATOMIC_RELAXED);
}

namespace emu {

// errors of the current launch (the launch returns them)
inline std::string& errors() { static std::string* s = new std::string(); return *s; }
inline void error(const std::string& s) {
  if (errors().size() < 4000) errors() += s + "\n";
}

// One warp of a lockstep kernel: 32 fibers and the scheduler's context.
struct Warp {
  static constexpr size_t kStack = 256 * 1024;
  ucontext_t sched;
  ucontext_t ctx[32];
  std::vector<char> stack[32];
  const std::function<void()>* kernel = nullptr;
  unsigned int launched = 0, exited = 0, waiting = 0, preds = 0;
  unsigned int mask[32] = {0}, result[32] = {0};
  long long block = 0;
  int warp = 0, lanes = 0, current = 0;

  std::string where() const { return "block " + std::to_string(block) + " warp " + std::to_string(warp); }

  // called from a lane's fiber: park at the ballot, return what the scheduler computed
  unsigned int ballot(unsigned int m, bool pred) {
    const int lane = current;
    const unsigned int bit = 1u << lane;
    mask[lane] = m;
    waiting |= bit;
    if (pred) preds |= bit;
    swapcontext(&ctx[lane], &sched);
    return result[lane];
  }

  // every live lane is at a ballot or has returned: complete the ballot
  void complete() {
    const int first = __builtin_ctz(waiting);
    const unsigned int m = mask[first];
    for (int l = 0; l < lanes; ++l)
      if ((waiting >> l & 1u) && mask[l] != m) error(where() + ": lanes of one ballot passed different masks");
    if (!(m & (1u << first))) error(where() + ": ballot called by a lane its mask does not name");
    if (m & ~launched) error(where() + ": ballot mask names lanes that do not exist");
    if (m & exited)
      error(where() + ": ballot mask names lanes that have already returned (undefined behaviour on a GPU)");
    if ((m & launched & ~exited) != waiting)
      error(where() + ": the lanes at a ballot are not the live lanes its mask names");
    const unsigned int word = preds & m;
    for (int l = 0; l < lanes; ++l) result[l] = word;
    waiting = preds = 0;
  }
};

inline thread_local Warp* current_warp = nullptr;

inline void set_builtins(long long grid, long long block, long long b, int tid) {
  threadIdx = {(unsigned int)tid, 0, 0};
  blockIdx = {(unsigned int)b, 0, 0};
  blockDim = dim3((unsigned int)block);
  gridDim = dim3((unsigned int)grid);
}

inline void run_guarded(const std::function<void()>& kernel) {
  try {
    kernel();
  } catch (const std::exception& e) {
    error(std::string("exception in a lane: ") + e.what());
  } catch (...) {
    error("exception in a lane");
  }
}

inline void fiber_entry() {
  Warp* w = current_warp;
  run_guarded(*w->kernel);
  w->exited |= 1u << w->current;       // then uc_link returns to the scheduler
}

inline void run_warp_lockstep(Warp& w, long long grid, long long block) {
  current_warp = &w;
  for (int l = 0; l < w.lanes; ++l) {
    if (w.stack[l].empty()) w.stack[l].resize(Warp::kStack);
    getcontext(&w.ctx[l]);
    w.ctx[l].uc_stack.ss_sp = w.stack[l].data();
    w.ctx[l].uc_stack.ss_size = w.stack[l].size();
    w.ctx[l].uc_link = &w.sched;
    makecontext(&w.ctx[l], fiber_entry, 0);
  }
  for (;;) {
    for (int l = 0; l < w.lanes; ++l) {    // run every live lane to its next ballot (or its return)
      if (w.exited >> l & 1u) continue;
      w.current = l;
      set_builtins(grid, block, w.block, 32 * w.warp + l);
      swapcontext(&w.sched, &w.ctx[l]);
    }
    if (!w.waiting) break;                 // all lanes returned
    w.complete();
  }
  current_warp = nullptr;
}

inline std::mutex& launch_mutex() {
  static std::mutex* m = new std::mutex();
  return *m;
}
inline std::string& last_error_text() { static std::string* s = new std::string(); return *s; }

// Run `kernel` over grid x block threads (1-d). Returns 0, or 1 with the message in last_error_text().
inline int launch(long long grid, long long block, bool lockstep, const std::function<void()>& kernel) {
  std::lock_guard<std::mutex> serial(launch_mutex());    // one launch at a time (errors are per launch)
  errors().clear();
  if (grid <= 0 || block <= 0 || block > 1024 || grid > 2147483647LL) {
    last_error_text() = "invalid launch configuration: grid " + std::to_string(grid) + ", block " +
                        std::to_string(block) + " (cudaErrorInvalidConfiguration)";
    return 1;
  }
  static Warp* w = new Warp();             // its 32 fiber stacks are reused by every warp
  const int n_warps = (int)((block + 31) / 32);
  for (long long b = 0; b < grid; ++b) {
    for (int wi = 0; wi < n_warps; ++wi) {
      const int lanes = (int)std::min<long long>(32, block - 32LL * wi);
      if (!lockstep) {
        for (int l = 0; l < lanes; ++l) {
          set_builtins(grid, block, b, 32 * wi + l);
          run_guarded(kernel);
        }
        continue;
      }
      w->kernel = &kernel;
      w->block = b;
      w->warp = wi;
      w->lanes = lanes;
      w->launched = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
      w->exited = w->waiting = w->preds = 0;
      run_warp_lockstep(*w, grid, block);
    }
  }
  last_error_text() = errors();
  return errors().empty() ? 0 : 1;
}

}  // namespace emu

inline unsigned int __ballot_sync(unsigned int mask, int predicate) {
  if (!emu::current_warp) {        // the harness decides lockstep from the source: it must have missed one
    emu::error("__ballot_sync in a kernel launched without lockstep");
    return 0;
  }
  return emu::current_warp->ballot(mask, predicate != 0);
}

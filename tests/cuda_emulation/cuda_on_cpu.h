// Just enough of CUDA's execution model to run this project's kernels on the CPU, for tests only:
// one block at a time, one std::thread per CUDA thread, __syncthreads() as a block-wide barrier,
// __shared__ as function-static storage (shared by the block's threads, reused by the next block),
// warp shuffles through a per-warp exchange slot between two barriers (valid because every kernel
// here calls them with the whole block converged). Not a simulator of timing or memory models.
#pragma once

#include <barrier>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

struct dim3_emu { unsigned int x = 0, y = 0, z = 0; };
inline thread_local dim3_emu threadIdx, blockIdx;
inline dim3_emu blockDim, gridDim;
inline std::barrier<>* block_barrier = nullptr;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static

struct uint2 { unsigned int x, y; };
struct uint4 { unsigned int x, y, z, w; };

inline void __syncthreads() { block_barrier->arrive_and_wait(); }

template <typename T>
inline T atomicAdd(T* address, T value) { return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST); }

inline long long shuffle_slot[1024];  // one value per thread of the block

template <typename T>
T shuffle_read(T value, int source_lane) {
  const int warp_base = threadIdx.x & ~31u;
  shuffle_slot[threadIdx.x] = static_cast<long long>(value);
  __syncthreads();
  T out = value;
  if (source_lane >= 0 && source_lane < 32) out = static_cast<T>(shuffle_slot[warp_base + source_lane]);
  __syncthreads();
  return out;
}

template <typename T>
T __shfl_up_sync(unsigned, T value, int delta) {
  const int lane = threadIdx.x & 31;
  return shuffle_read(value, lane >= delta ? lane - delta : lane);
}

template <typename T>
T __shfl_down_sync(unsigned, T value, int delta) {
  const int lane = threadIdx.x & 31;
  return shuffle_read(value, lane + delta < 32 ? lane + delta : lane);
}

// kernel<<<blocks, threads>>>(...) as launch(blocks, threads, [&] { kernel(...); })
inline void launch(unsigned int blocks, unsigned int threads, const std::function<void()>& body) {
  gridDim.x = blocks;
  blockDim.x = threads;
  for (unsigned int b = 0; b < blocks; ++b) {
    std::barrier<> barrier(threads);
    block_barrier = &barrier;
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned int t = 0; t < threads; ++t)
      pool.emplace_back([&, b, t] {
        blockIdx.x = b;
        threadIdx.x = t;
        body();
      });
    for (auto& th : pool) th.join();
  }
}

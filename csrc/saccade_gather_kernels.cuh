// CUDA kernels of the saccade op. Self-contained (no standard headers) so that the same text builds
// with nvcc (saccade_gather.cu) and at run time with NVRTC (deepencoder_kernels.cupy_saccade).
//
// saccade_select: one block per image.
//   1. radix select over the 32-bit score keys (4 passes x 8 bits, shared histogram): the key T of
//      the k-th best element and how many elements with key T are taken (ties: lowest index);
//   2. compaction in index order (block scans), which is already the spatial order;
//   3. for score order, each chosen element's rank = how many chosen have a smaller rank key
//      (keys staged through shared memory; O(k^2 / threads), cheap for the budgets used here).
// saccade_gather_rows_*: one warp per output row, vector copies.
#pragma once

#include "saccade_order.h"

#define DK_SELECT_THREADS 256
#define DK_WARPS (DK_SELECT_THREADS / 32)

namespace dk {

__device__ __forceinline__ long long image_length(const int* cu_seqlens, long long uniform_length, int b) {
  const long long n = cu_seqlens ? (long long)cu_seqlens[b + 1] - (long long)cu_seqlens[b] : uniform_length;
  return n > 0 ? n : 0;
}

__device__ __forceinline__ long long clamp_budget(long long k, long long n) { return k < 0 ? 0 : (k > n ? n : k); }

// Exclusive block-wide prefix sum of one int per thread; `total` gets the block's sum in every
// thread. warp_sums and shared_total are shared scratch.
__device__ __forceinline__ int block_exclusive_scan(int value, int* warp_sums, int* shared_total, int& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int inclusive = value;
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int up = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += up;
  }
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  if (threadIdx.x == 0) {
    int running = 0;
    for (int w = 0; w < DK_WARPS; ++w) {
      const int s = warp_sums[w];
      warp_sums[w] = running;
      running += s;
    }
    *shared_total = running;
  }
  __syncthreads();
  total = *shared_total;
  const int result = warp_sums[warp] + inclusive - value;
  __syncthreads();  // warp_sums and shared_total are reused by the next call
  return result;
}

}  // namespace dk

extern "C" __global__ void __launch_bounds__(DK_SELECT_THREADS)
saccade_select(const void* scores, int score_dtype, const int* cu_seqlens, long long uniform_length,
               const long long* k_per_image, int spatial_order, long long* positions, long long* sources,
               int* cu_seqlens_out) {
  __shared__ unsigned int histogram[256];
  __shared__ unsigned int threshold_key, remaining;
  __shared__ int warp_sums[DK_WARPS];
  __shared__ int scan_total;
  __shared__ unsigned long long staged[DK_SELECT_THREADS];

  const int b = blockIdx.x;
  const long long start = cu_seqlens ? (long long)cu_seqlens[b] : b * uniform_length;
  const long long n = dk::image_length(cu_seqlens, uniform_length, b);
  // budgets are clamped to [0, N_b] here too (the host checks them when it sizes the outputs, but
  // not on the device): a k > N would walk the radix select past its histogram
  const long long k = dk::clamp_budget(k_per_image[b], n);
  // this image's output offset: the sum of the budgets before it (a few hundred at most)
  long long partial = 0;
  for (int i = threadIdx.x; i < b; i += blockDim.x)
    partial += dk::clamp_budget(k_per_image[i], dk::image_length(cu_seqlens, uniform_length, i));
  for (int offset = 16; offset > 0; offset >>= 1) partial += __shfl_down_sync(0xffffffffu, partial, offset);
  __shared__ long long warp_partials[DK_WARPS];
  if ((threadIdx.x & 31) == 0) warp_partials[threadIdx.x >> 5] = partial;
  __syncthreads();
  long long out_offset = 0;
  for (int w = 0; w < DK_WARPS; ++w) out_offset += warp_partials[w];
  if (threadIdx.x == 0) {
    cu_seqlens_out[b + 1] = (int)(out_offset + k);
    if (b == 0) cu_seqlens_out[0] = 0;
  }
  if (k == 0) return;
  long long* out_pos = positions + out_offset;
  long long* out_src = sources + out_offset;

  // 1. radix select: after the pass over bits [shift, shift + 8), threshold_key holds the high
  //    bits of T and `remaining` is T's rank among the elements sharing those bits.
  if (threadIdx.x == 0) {
    threshold_key = 0u;
    remaining = (unsigned int)k;
  }
  unsigned int known_mask = 0u;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) histogram[i] = 0u;
    __syncthreads();
    const unsigned int prefix = threshold_key;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) {
      const unsigned int key = dk::score_key(dk::load_score(scores, score_dtype, start + i));
      if ((key & known_mask) == prefix) atomicAdd(&histogram[(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned int rank = remaining, bucket = 0u;
      while (histogram[bucket] < rank) rank -= histogram[bucket++];
      threshold_key = prefix | (bucket << shift);
      remaining = rank;
    }
    known_mask |= 255u << shift;
    __syncthreads();
  }
  const unsigned int T = threshold_key;
  const unsigned int ties_taken = remaining;  // elements with key == T that are chosen (lowest index)

  // 2. compaction in index order
  int chosen_before = 0, ties_before = 0;
  for (long long base = 0; base < n; base += blockDim.x) {
    const long long i = base + threadIdx.x;
    unsigned int key = 0xffffffffu;
    bool valid = i < n;
    if (valid) key = dk::score_key(dk::load_score(scores, score_dtype, start + i));
    const int tie = valid && key == T;
    int ties_in_chunk;
    const int tie_rank = ties_before + dk::block_exclusive_scan(tie, warp_sums, &scan_total, ties_in_chunk);
    const int take = valid && (key < T || (tie && tie_rank < (int)ties_taken));
    int taken_in_chunk;
    const int slot = chosen_before + dk::block_exclusive_scan(take, warp_sums, &scan_total, taken_in_chunk);
    if (take) out_src[slot] = i;  // position within the image, ascending
    ties_before += ties_in_chunk;
    chosen_before += taken_in_chunk;
  }
  __syncthreads();

  if (spatial_order) {
    for (long long j = threadIdx.x; j < k; j += blockDim.x) {
      const long long p = out_src[j];
      out_pos[j] = p;
      out_src[j] = start + p;
    }
    return;
  }

  // 3. score order: rank among the chosen by the unique 64-bit rank key
  for (long long base = 0; base < k; base += blockDim.x) {
    const long long j = base + threadIdx.x;
    unsigned long long mine = 0ull;
    long long rank = 0;
    if (j < k) {
      const long long p = out_src[j];
      mine = dk::rank_key(dk::score_key(dk::load_score(scores, score_dtype, start + p)), p);
    }
    for (long long chunk = 0; chunk < k; chunk += blockDim.x) {
      const long long c = chunk + threadIdx.x;
      if (c < k) {
        const long long p = out_src[c];
        staged[threadIdx.x] = dk::rank_key(dk::score_key(dk::load_score(scores, score_dtype, start + p)), p);
      }
      __syncthreads();
      const long long count = (k - chunk < (long long)blockDim.x) ? k - chunk : (long long)blockDim.x;
      if (j < k)
        for (long long t = 0; t < count; ++t) rank += staged[t] < mine;
      __syncthreads();
    }
    if (j < k) out_pos[rank] = dk::rank_key_index(mine);
  }
  __syncthreads();
  for (long long j = threadIdx.x; j < k; j += blockDim.x) out_src[j] = start + out_pos[j];
}

// One warp per output row; VEC is the copy unit (16, 8, 4, 2 or 1 bytes) chosen by the launcher
// from the row size and the pointers' alignment.
#define DK_DEFINE_GATHER(NAME, VEC)                                                                    \
  extern "C" __global__ void NAME(const void* features, long long row_units, const long long* sources, \
                                  long long total_out, void* gathered) {                               \
    const long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;                     \
    if (row >= total_out) return;                                                                      \
    const VEC* src = (const VEC*)features + sources[row] * row_units;                                  \
    VEC* dst = (VEC*)gathered + row * row_units;                                                       \
    for (long long u = threadIdx.x & 31; u < row_units; u += 32) dst[u] = src[u];                      \
  }

DK_DEFINE_GATHER(saccade_gather_rows_16, uint4)
DK_DEFINE_GATHER(saccade_gather_rows_8, uint2)
DK_DEFINE_GATHER(saccade_gather_rows_4, unsigned int)
DK_DEFINE_GATHER(saccade_gather_rows_2, unsigned short)
DK_DEFINE_GATHER(saccade_gather_rows_1, unsigned char)

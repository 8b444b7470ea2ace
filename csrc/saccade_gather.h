// The saccade op's C++ API: raw pointers, so neither implementation depends on a torch build.
// The Python layer validates the arguments, allocates the outputs and passes data_ptr()s.
#pragma once

#include <cstdint>

namespace dk {

struct SaccadeGatherArgs {
  const void* scores;            // [total] packed (or [B, N]), dtype score_dtype
  int score_dtype;               // ScoreDtype
  const int32_t* cu_seqlens;     // [num_images + 1] image starts in the packed inputs, or null:
  int64_t uniform_length;        //   then every image has this many positions ([B, N] inputs)
  const int64_t* k;              // [num_images] budget, 0 <= k[b] <= its length (checked by the caller)
  int64_t num_images;
  int64_t total_out;             // sum of k (the caller knows it: it sized the outputs)
  const void* features;          // [total, row_bytes / element size] rows, contiguous
  int64_t row_bytes;
  bool spatial_order;            // true: ascending position; false: descending score
  void* gathered;                // out [sum k] rows of row_bytes
  int64_t* positions;            // out [sum k] index within the image
  int64_t* sources;              // scratch [sum k]: row of the packed features
  int32_t* cu_seqlens_out;       // out [num_images + 1] exclusive prefix sum of k
};

// CPU: OpenMP over images for the selection (nth_element on rank keys, no full sort), then over
// output rows for the copy. Returns 0.
int saccade_gather_cpu(const SaccadeGatherArgs& args);

#ifdef DK_WITH_CUDA
// CUDA: one block per image selects by a 4-pass radix select on the score keys, compacts in index
// order, ranks for score order; then one warp per output row copies it. `stream` is a
// cudaStream_t. All pointers are device pointers. Returns a cudaError_t (0 = success).
int saccade_gather_cuda(const SaccadeGatherArgs& args, void* stream);
#endif

}  // namespace dk

// The saccade op's C++ API: raw pointers, so neither implementation depends on a torch build.
// The Python layer validates the arguments, allocates the outputs and passes data_ptr()s.
#pragma once

#include <cstdint>

namespace dk {

// Every pointer is to dense (contiguous) memory: the ops layer makes views contiguous first.
struct SaccadeGatherArgs {
  const void* scores;            // [total_in] packed (or [B, N]), dtype score_dtype
  int score_dtype;               // ScoreDtype
  const int32_t* cu_seqlens;     // [num_images + 1] image starts in the packed inputs, or null:
  int64_t uniform_length;        //   then every image has this many positions ([B, N] inputs)
  const int64_t* k;              // [num_images] budget, 0 <= k[b] <= its length
  int64_t num_images;
  int64_t total_in;              // positions in scores (= rows of features)
  int64_t total_out;             // sum of k (the caller knows it: it sized the outputs)
  const void* features;          // [total, row_bytes / element size] rows, contiguous
  int64_t row_bytes;
  bool spatial_order;            // true: ascending position; false: descending score
  void* gathered;                // out [sum k] rows of row_bytes
  int64_t* positions;            // out [sum k] index within the image
  int64_t* sources;              // scratch [sum k]: row of the packed features
  int32_t* cu_seqlens_out;       // out [num_images + 1] exclusive prefix sum of k
};

// Refusals, negative so that they never collide with a cudaError_t.
enum SaccadeStatus : int {
  kSaccadeOk = 0,
  kBadOffsets = -1,     // cu_seqlens[0] != 0, decreasing, or cu_seqlens[B] != total_in
  kBadBudget = -2,      // some k[b] outside [0, N_b]
  kBadTotal = -3,       // sum of k != total_out
  kWrongDevice = -4,    // a pointer that is not memory of the launch device
};

// CPU: checks the offsets and budgets (before writing anything), then OpenMP over images for the
// selection (nth_element on rank keys, no full sort) and over output rows for the copy. Returns
// kSaccadeOk or a refusal.
int saccade_gather_cpu(const SaccadeGatherArgs& args);

#ifdef DK_WITH_CUDA
// CUDA, on `device` (made current for the call, then restored) and `stream` (a cudaStream_t of
// that device): one block per image selects by a 4-pass radix select on the score keys, compacts
// in index order, ranks for score order; then one warp per output row copies it. All pointers are
// device pointers of `device` (checked: kWrongDevice). Budgets are read on the device only: the
// kernel clamps each k[b] to [0, N_b] (never selecting past an image); the caller checks them when
// it sizes the outputs. Returns a cudaError_t (0 = success) or a refusal.
int saccade_gather_cuda(const SaccadeGatherArgs& args, void* stream, int device);
#endif

}  // namespace dk

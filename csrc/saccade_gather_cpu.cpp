// CPU implementation of the saccade op (see saccade_gather.h).
#include "saccade_gather.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "saccade_order.h"

namespace dk {
namespace {

// Below this much work a parallel region costs more than it saves.
constexpr int64_t kParallelMinElements = 1 << 14;
constexpr int64_t kParallelMinBytes = 1 << 18;

// The k[b] best positions of one image, written to positions/sources in the requested order.
void select_image(const SaccadeGatherArgs& a, int64_t b, int64_t out_offset, std::vector<unsigned long long>& keys) {
  const int64_t start = a.cu_seqlens ? a.cu_seqlens[b] : b * a.uniform_length;
  const int64_t n = a.cu_seqlens ? a.cu_seqlens[b + 1] - start : a.uniform_length;
  const int64_t k = a.k[b];
  if (k == 0) return;
  keys.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) keys[i] = rank_key(score_key(load_score(a.scores, a.score_dtype, start + i)), i);
  // keys are unique, so after nth_element the first k are exactly the k smallest
  if (k < n) std::nth_element(keys.begin(), keys.begin() + k, keys.end());
  if (a.spatial_order) {
    for (int64_t j = 0; j < k; ++j) keys[j] = static_cast<unsigned long long>(rank_key_index(keys[j]));
  }
  std::sort(keys.begin(), keys.begin() + k);
  int64_t* positions = a.positions + out_offset;
  int64_t* sources = a.sources + out_offset;
  for (int64_t j = 0; j < k; ++j) {
    positions[j] = rank_key_index(keys[j]);
    sources[j] = start + positions[j];
  }
}

// The values the selection relies on, checked before anything is written: under torch.compile,
// or when the custom op is called directly, nothing above this checked them.
int check_values(const SaccadeGatherArgs& a) {
  if (a.cu_seqlens) {
    if (a.cu_seqlens[0] != 0 || a.cu_seqlens[a.num_images] != a.total_in) return kBadOffsets;
    for (int64_t b = 0; b < a.num_images; ++b)
      if (a.cu_seqlens[b + 1] < a.cu_seqlens[b]) return kBadOffsets;
  } else if (a.num_images * a.uniform_length != a.total_in) {
    return kBadOffsets;
  }
  int64_t total = 0;
  for (int64_t b = 0; b < a.num_images; ++b) {
    const int64_t n = a.cu_seqlens ? int64_t{a.cu_seqlens[b + 1]} - a.cu_seqlens[b] : a.uniform_length;
    if (a.k[b] < 0 || a.k[b] > n) return kBadBudget;
    total += a.k[b];
  }
  return total == a.total_out ? kSaccadeOk : kBadTotal;
}

}  // namespace

int saccade_gather_cpu(const SaccadeGatherArgs& a) {
  if (const int status = check_values(a)) return status;
  std::vector<int64_t> out_offsets(static_cast<size_t>(a.num_images) + 1, 0);
  for (int64_t b = 0; b < a.num_images; ++b) out_offsets[b + 1] = out_offsets[b] + a.k[b];
  for (int64_t b = 0; b <= a.num_images; ++b) a.cu_seqlens_out[b] = static_cast<int32_t>(out_offsets[b]);
  const int64_t total_in = a.total_in;

#pragma omp parallel if (a.num_images > 1 && total_in >= kParallelMinElements)
  {
    std::vector<unsigned long long> keys;  // one buffer per thread, reused across images
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < a.num_images; ++b) select_image(a, b, out_offsets[b], keys);
  }

  const char* src = static_cast<const char*>(a.features);
  char* dst = static_cast<char*>(a.gathered);
  const int64_t row = a.row_bytes;
#pragma omp parallel for schedule(static) if (a.total_out * row >= kParallelMinBytes)
  for (int64_t r = 0; r < a.total_out; ++r) std::memcpy(dst + r * row, src + a.sources[r] * row, static_cast<size_t>(row));
  return 0;
}

}  // namespace dk

// Host side of the CUDA saccade op (kernels in saccade_gather_kernels.cuh). Raw pointers and a
// stream: this translation unit needs the CUDA runtime only, not a CUDA build of torch.
#include <cuda_runtime.h>

#include "saccade_gather.h"
#include "saccade_gather_kernels.cuh"

namespace dk {

namespace {

// The widest copy unit that divides the row size and both base addresses.
int copy_unit(const void* features, const void* gathered, int64_t row_bytes) {
  const unsigned long long bits = (unsigned long long)row_bytes | reinterpret_cast<uintptr_t>(features) |
                                  reinterpret_cast<uintptr_t>(gathered);
  for (int unit = 16; unit > 1; unit >>= 1)
    if (bits % unit == 0) return unit;
  return 1;
}

}  // namespace

int saccade_gather_cuda(const SaccadeGatherArgs& a, void* stream_handle) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  if (a.num_images == 0) return 0;
  saccade_select<<<(unsigned int)a.num_images, DK_SELECT_THREADS, 0, stream>>>(
      a.scores, a.score_dtype, (const int*)a.cu_seqlens, (long long)a.uniform_length, (const long long*)a.k,
      a.spatial_order ? 1 : 0, (long long*)a.positions, (long long*)a.sources, (int*)a.cu_seqlens_out);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return (int)err;

  if (a.total_out == 0 || a.row_bytes == 0) return 0;

  const int unit = copy_unit(a.features, a.gathered, a.row_bytes);
  const long long row_units = a.row_bytes / unit;
  const int threads = 256;  // 8 rows per block
  const unsigned int blocks = (unsigned int)((a.total_out * 32 + threads - 1) / threads);
  const long long* sources = (const long long*)a.sources;
  switch (unit) {
    case 16: saccade_gather_rows_16<<<blocks, threads, 0, stream>>>(a.features, row_units, sources, a.total_out, a.gathered); break;
    case 8: saccade_gather_rows_8<<<blocks, threads, 0, stream>>>(a.features, row_units, sources, a.total_out, a.gathered); break;
    case 4: saccade_gather_rows_4<<<blocks, threads, 0, stream>>>(a.features, row_units, sources, a.total_out, a.gathered); break;
    case 2: saccade_gather_rows_2<<<blocks, threads, 0, stream>>>(a.features, row_units, sources, a.total_out, a.gathered); break;
    default: saccade_gather_rows_1<<<blocks, threads, 0, stream>>>(a.features, row_units, sources, a.total_out, a.gathered); break;
  }
  return (int)cudaGetLastError();
}

}  // namespace dk

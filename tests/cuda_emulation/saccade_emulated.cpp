// The CUDA saccade kernels, unchanged, run through cuda_on_cpu.h (tests only).
#include "cuda_on_cpu.h"
#include "saccade_gather_kernels.cuh"

extern "C" int saccade_gather_emulated(const void* scores, int score_dtype, const int* cu_seqlens, long long uniform_length,
                                       const long long* k, long long num_images, long long total_out, const void* features,
                                       long long row_bytes, int spatial_order, void* gathered, long long* positions,
                                       long long* sources, int* cu_seqlens_out, int copy_unit) {
  launch((unsigned)num_images, DK_SELECT_THREADS, [&] {
    saccade_select(scores, score_dtype, cu_seqlens, uniform_length, k, spatial_order, positions, sources, cu_seqlens_out);
  });
  if (total_out == 0 || row_bytes == 0) return 0;
  const long long units = row_bytes / copy_unit;
  const unsigned blocks = (unsigned)((total_out * 32 + 255) / 256);
  launch(blocks, 256, [&] {
    switch (copy_unit) {
      case 16: saccade_gather_rows_16(features, units, sources, total_out, gathered); break;
      case 8: saccade_gather_rows_8(features, units, sources, total_out, gathered); break;
      case 4: saccade_gather_rows_4(features, units, sources, total_out, gathered); break;
      case 2: saccade_gather_rows_2(features, units, sources, total_out, gathered); break;
      default: saccade_gather_rows_1(features, units, sources, total_out, gathered); break;
    }
  });
  return 0;
}

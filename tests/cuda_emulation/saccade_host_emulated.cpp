// csrc/saccade_gather.cu, the real host launcher, compiled for the CPU against the stand-in
// runtime (cuda_runtime.h here) and the block model of cuda_on_cpu.h (tests only).
#define DK_WITH_CUDA
#include "cuda_runtime.h"
#include "saccade_gather.cu"

extern "C" {

// The pybind entry point's arguments, in its order (csrc/module.cpp).
int emu_saccade_gather_cuda(const void* scores, int score_dtype, const int32_t* cu_seqlens, int64_t uniform_length,
                            const int64_t* k, int64_t num_images, int64_t total_in, int64_t total_out, const void* features,
                            int64_t row_bytes, bool spatial_order, void* gathered, int64_t* positions, int64_t* sources,
                            int32_t* cu_seqlens_out, void* stream, int device) {
  const dk::SaccadeGatherArgs args{scores, score_dtype, cu_seqlens, uniform_length, k, num_images, total_in, total_out,
                                   features, row_bytes, spatial_order, gathered, positions, sources, cu_seqlens_out};
  return dk::saccade_gather_cuda(args, stream, device);
}

void emu_reset(int current_device, int device_count) {
  emu::current_device = current_device;
  emu::device_count = device_count;
  emu::regions.clear();
  emu::events.clear();
}

void emu_register(uintptr_t begin, uint64_t bytes, int device) { emu::regions.push_back({begin, begin + bytes, device}); }

int emu_current_device() { return emu::current_device; }

int emu_event_count() { return (int)emu::events.size(); }

// kind, device, blocks of event i; its stream through emu_event_stream
void emu_event(int i, int* kind, int* device, unsigned int* blocks) {
  *kind = emu::events[i].kind;
  *device = emu::events[i].device;
  *blocks = emu::events[i].blocks;
}

uintptr_t emu_event_stream(int i) { return reinterpret_cast<uintptr_t>(emu::events[i].stream); }

// One kernel launch by name with the kernel's own parameters (the CuPy path's launch plans).
int emu_launch_select(unsigned int blocks, unsigned int threads, const void* scores, int score_dtype, const int* cu_seqlens,
                      long long uniform_length, const long long* k, int spatial_order, long long* positions, long long* sources,
                      int* cu_seqlens_out) {
  launch(blocks, threads, [&] {
    saccade_select(scores, score_dtype, cu_seqlens, uniform_length, k, spatial_order, positions, sources, cu_seqlens_out);
  });
  return 0;
}

int emu_launch_gather(int unit, unsigned int blocks, unsigned int threads, const void* features, long long row_units,
                      const long long* sources, long long total_out, void* gathered) {
  launch(blocks, threads, [&] {
    switch (unit) {
      case 16: saccade_gather_rows_16(features, row_units, sources, total_out, gathered); break;
      case 8: saccade_gather_rows_8(features, row_units, sources, total_out, gathered); break;
      case 4: saccade_gather_rows_4(features, row_units, sources, total_out, gathered); break;
      case 2: saccade_gather_rows_2(features, row_units, sources, total_out, gathered); break;
      default: saccade_gather_rows_1(features, row_units, sources, total_out, gathered); break;
    }
  });
  return 0;
}
}

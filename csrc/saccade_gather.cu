// Host side of the CUDA saccade op (kernels in saccade_gather_kernels.cuh). Raw pointers, a stream
// and a device index: this translation unit needs the CUDA runtime only, not a CUDA build of torch.
#include <cuda_runtime.h>

#include "saccade_gather.h"
#include "saccade_gather_kernels.cuh"

// kernel<<<blocks, threads, 0, stream>>>(...) spelled as DK_LAUNCH(kernel, blocks, threads, stream)(...),
// so that tests/cuda_emulation can compile this very file for the CPU with its own launcher.
#ifndef DK_LAUNCH
#define DK_LAUNCH(kernel, blocks, threads, stream) kernel<<<(blocks), (threads), 0, (stream)>>>
#endif

namespace dk {

namespace {

// Makes `device` current for the call (launches and memsets go to the current device) and gives
// the caller back its own current device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    status_ = cudaGetDevice(&previous_);
    if (status_ == cudaSuccess && previous_ != device) {
      status_ = cudaSetDevice(device);
      restore_ = status_ == cudaSuccess;
    }
  }
  ~DeviceGuard() {
    if (restore_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
  cudaError_t status() const { return status_; }

 private:
  int previous_ = 0;
  bool restore_ = false;
  cudaError_t status_ = cudaSuccess;
};

// Whether `p` is memory the kernels on `device` may read and write (null: an empty tensor).
bool on_device(const void* p, int device) {
  if (p == nullptr) return true;
  cudaPointerAttributes attr;
  if (cudaPointerGetAttributes(&attr, p) != cudaSuccess) {
    cudaGetLastError();  // not sticky: leave no error behind for the next launch check
    return false;
  }
  return (attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged) && attr.device == device;
}

// The widest copy unit that divides the row size and both base addresses.
int copy_unit(const void* features, const void* gathered, int64_t row_bytes) {
  const unsigned long long bits = (unsigned long long)row_bytes | reinterpret_cast<uintptr_t>(features) |
                                  reinterpret_cast<uintptr_t>(gathered);
  for (int unit = 16; unit > 1; unit >>= 1)
    if (bits % unit == 0) return unit;
  return 1;
}

}  // namespace

int saccade_gather_cuda(const SaccadeGatherArgs& a, void* stream_handle, int device) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  const DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return (int)guard.status();
  const void* pointers[] = {a.scores, a.cu_seqlens, a.k, a.features, a.gathered, a.positions, a.sources, a.cu_seqlens_out};
  for (const void* p : pointers)
    if (!on_device(p, device)) return kWrongDevice;

  if (a.num_images == 0)  // no block runs: cu_seqlens_out = [0] here
    return (int)cudaMemsetAsync(a.cu_seqlens_out, 0, sizeof(int32_t), stream);
  DK_LAUNCH(saccade_select, (unsigned int)a.num_images, DK_SELECT_THREADS, stream)(
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
    case 16: DK_LAUNCH(saccade_gather_rows_16, blocks, threads, stream)(a.features, row_units, sources, a.total_out, a.gathered); break;
    case 8: DK_LAUNCH(saccade_gather_rows_8, blocks, threads, stream)(a.features, row_units, sources, a.total_out, a.gathered); break;
    case 4: DK_LAUNCH(saccade_gather_rows_4, blocks, threads, stream)(a.features, row_units, sources, a.total_out, a.gathered); break;
    case 2: DK_LAUNCH(saccade_gather_rows_2, blocks, threads, stream)(a.features, row_units, sources, a.total_out, a.gathered); break;
    default: DK_LAUNCH(saccade_gather_rows_1, blocks, threads, stream)(a.features, row_units, sources, a.total_out, a.gathered); break;
  }
  return (int)cudaGetLastError();
}

}  // namespace dk

// A stand-in for <cuda_runtime.h> (tests only): just the runtime calls csrc/saccade_gather.cu makes,
// over host memory, with a device index per registered allocation, a current device, and a log of
// every launch and memset (the device current then and the stream used). With cuda_on_cpu.h it lets
// the tests compile and run the real host launcher, unchanged, on the CPU.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cuda_on_cpu.h"

typedef int cudaError_t;
enum : int { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidDevice = 101 };
typedef struct emu_stream_t* cudaStream_t;
enum cudaMemoryType { cudaMemoryTypeUnregistered = 0, cudaMemoryTypeHost = 1, cudaMemoryTypeDevice = 2, cudaMemoryTypeManaged = 3 };
struct cudaPointerAttributes {
  cudaMemoryType type;
  int device;
  void* devicePointer;
  void* hostPointer;
};

namespace emu {
struct Region { uintptr_t begin, end; int device; };
struct Event { int kind; int device; void* stream; unsigned int blocks; };   // kind 0: launch, 1: memset
inline int device_count = 2;
inline int current_device = 0;
inline std::vector<Region> regions;
inline std::vector<Event> events;
}  // namespace emu

inline cudaError_t cudaGetDevice(int* device) {
  *device = emu::current_device;
  return cudaSuccess;
}

inline cudaError_t cudaSetDevice(int device) {
  if (device < 0 || device >= emu::device_count) return cudaErrorInvalidDevice;
  emu::current_device = device;
  return cudaSuccess;
}

inline cudaError_t cudaGetLastError() { return cudaSuccess; }

inline cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* attr, const void* p) {
  const auto address = reinterpret_cast<uintptr_t>(p);
  *attr = {cudaMemoryTypeUnregistered, -2, nullptr, const_cast<void*>(p)};
  for (const auto& r : emu::regions)
    if (address >= r.begin && address < r.end) *attr = {cudaMemoryTypeDevice, r.device, const_cast<void*>(p), nullptr};
  return cudaSuccess;
}

inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t stream) {
  emu::events.push_back({1, emu::current_device, stream, 0});
  std::memset(p, value, bytes);
  return cudaSuccess;
}

// DK_LAUNCH(kernel, blocks, threads, stream)(args...) of csrc/saccade_gather.cu
template <typename Kernel>
auto emu_launch(Kernel* kernel, unsigned int blocks, unsigned int threads, cudaStream_t stream) {
  return [=](auto... args) {
    emu::events.push_back({0, emu::current_device, stream, blocks});
    launch(blocks, threads, [&] { kernel(args...); });
  };
}
#define DK_LAUNCH(kernel, blocks, threads, stream) emu_launch(&kernel, (blocks), (threads), (stream))

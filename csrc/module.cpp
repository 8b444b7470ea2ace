// deepencoder_kernels._C: the C++ extension's entry point (pybind11). Tensors cross as data
// pointers (Python ints) plus sizes: the Python ops layer validates, allocates and registers the
// torch op, so this module needs no torch headers and works with any torch build.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "saccade_gather.h"
#include "saccade_order.h"

#ifdef DK_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = "unknown";
#endif
#if defined(_OPENMP)
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["cplusplus"] = static_cast<long>(__cplusplus);
#if defined(__SANITIZE_ADDRESS__)
  info["address_sanitizer"] = true;
#else
  info["address_sanitizer"] = false;
#endif
#ifdef DK_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  return info;
}

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

dk::SaccadeGatherArgs saccade_args(uintptr_t scores, int score_dtype, uintptr_t cu_seqlens, int64_t uniform_length,
                                   uintptr_t k, int64_t num_images, int64_t total_in, int64_t total_out, uintptr_t features,
                                   int64_t row_bytes, bool spatial_order, uintptr_t gathered, uintptr_t positions,
                                   uintptr_t sources, uintptr_t cu_seqlens_out) {
  if (score_dtype < dk::kFloat32 || score_dtype > dk::kBFloat16) throw py::value_error("score_dtype must be 0 (fp32), 1 (fp16) or 2 (bf16)");
  if (num_images < 0 || total_in < 0 || total_out < 0 || row_bytes < 0 || uniform_length < 0)
    throw py::value_error("num_images, total_in, total_out, row_bytes and uniform_length must be >= 0");
  if (!cu_seqlens_out || (num_images && !k) || (total_in && !scores) || (total_out && (!positions || !sources)) ||
      (total_out && row_bytes && (!features || !gathered)))
    throw py::value_error("null pointer for a non-empty input or output");
  return {ptr<const void>(scores), score_dtype, ptr<const int32_t>(cu_seqlens), uniform_length, ptr<const int64_t>(k),
          num_images, total_in, total_out, ptr<const void>(features), row_bytes, spatial_order, ptr<void>(gathered),
          ptr<int64_t>(positions), ptr<int64_t>(sources), ptr<int32_t>(cu_seqlens_out)};
}

constexpr const char* kSaccadeDoc =
    "Saccade gather on raw pointers to dense memory (see csrc/saccade_gather.h). Arguments: scores, score_dtype "
    "(0 fp32, 1 fp16, 2 bf16), cu_seqlens (0: uniform), uniform_length, k, num_images, total_in, total_out, "
    "features, row_bytes, spatial_order, gathered, positions, sources, cu_seqlens_out (CUDA: then stream, device). "
    "Returns 0 or a code (negative: a refusal, dk::SaccadeStatus; positive: a cudaError_t). "
    "Use deepencoder_kernels.ops.saccade_gather.";

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "deepencoder-kernels C++ extension";
  m.def("build_info", &build_info, "How this extension was compiled: compiler, OpenMP, C++ standard, CUDA.");
  m.def(
      "saccade_gather_cpu",
      [](uintptr_t scores, int score_dtype, uintptr_t cu_seqlens, int64_t uniform_length, uintptr_t k,
         int64_t num_images, int64_t total_in, int64_t total_out, uintptr_t features, int64_t row_bytes,
         bool spatial_order, uintptr_t gathered, uintptr_t positions, uintptr_t sources, uintptr_t cu_seqlens_out) {
        const auto args = saccade_args(scores, score_dtype, cu_seqlens, uniform_length, k, num_images, total_in,
                                       total_out, features, row_bytes, spatial_order, gathered, positions, sources,
                                       cu_seqlens_out);
        py::gil_scoped_release release;
        return dk::saccade_gather_cpu(args);
      },
      kSaccadeDoc);
#ifdef DK_WITH_CUDA
  m.def(
      "saccade_gather_cuda",
      [](uintptr_t scores, int score_dtype, uintptr_t cu_seqlens, int64_t uniform_length, uintptr_t k,
         int64_t num_images, int64_t total_in, int64_t total_out, uintptr_t features, int64_t row_bytes,
         bool spatial_order, uintptr_t gathered, uintptr_t positions, uintptr_t sources, uintptr_t cu_seqlens_out,
         uintptr_t stream, int device) {
        const auto args = saccade_args(scores, score_dtype, cu_seqlens, uniform_length, k, num_images, total_in,
                                       total_out, features, row_bytes, spatial_order, gathered, positions, sources,
                                       cu_seqlens_out);
        if (device < 0) throw py::value_error("device must be a CUDA device index >= 0");
        py::gil_scoped_release release;
        return dk::saccade_gather_cuda(args, reinterpret_cast<void*>(stream), device);
      },
      kSaccadeDoc);
  m.def(
      "cuda_error_string", [](int code) { return std::string(cudaGetErrorName(static_cast<cudaError_t>(code))) + ": " +
                                                 cudaGetErrorString(static_cast<cudaError_t>(code)); },
      "A cudaError_t's name and description.");
#endif
}

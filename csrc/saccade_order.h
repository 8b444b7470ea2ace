// The one ranking rule of the saccade op, shared by the CPU code, the CUDA kernels and NVRTC
// (so it uses no standard headers). An element's 64-bit rank key is (score key << 32) | index;
// smaller keys are chosen first, and every key is unique, so the selection is deterministic:
//   - higher score first;
//   - equal scores (+0 and -0 are equal): lower index first;
//   - NaN after every number (-inf included), lower index first among NaNs.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define DK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DK_HOST_DEVICE inline
#endif

namespace dk {

enum ScoreDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

DK_HOST_DEVICE float bits_to_float(unsigned int bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  union { unsigned int u; float f; } v;  // well-defined in GNU C++ and NVCC; no <cstring> needed
  v.u = bits;
  return v.f;
#endif
}

DK_HOST_DEVICE unsigned int float_to_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  union { float f; unsigned int u; } v;
  v.f = x;
  return v.u;
#endif
}

// IEEE binary16 bits -> float, exact (subnormals included).
DK_HOST_DEVICE float half_bits_to_float(unsigned short h) {
  const unsigned int sign = (unsigned int)(h & 0x8000u) << 16;
  const unsigned int exponent = (h >> 10) & 0x1fu;
  const unsigned int mantissa = h & 0x3ffu;
  if (exponent == 0x1fu) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));  // inf, NaN
  if (exponent == 0u) {  // zero or subnormal: mantissa * 2^-24, exact in float
    const float magnitude = (float)mantissa * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

DK_HOST_DEVICE float load_score(const void* scores, int dtype, long long i) {
  if (dtype == kFloat16) return half_bits_to_float(((const unsigned short*)scores)[i]);
  if (dtype == kBFloat16) return bits_to_float((unsigned int)((const unsigned short*)scores)[i] << 16);
  return ((const float*)scores)[i];
}

// 32-bit key, ascending = better: descending score, NaN last.
DK_HOST_DEVICE unsigned int score_key(float x) {
  if (x != x) return 0xffffffffu;  // NaN (no -ffast-math anywhere in this build)
  if (x == 0.0f) x = 0.0f;         // -0 ranks as +0
  const unsigned int b = float_to_bits(x);
  const unsigned int ascending = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  return ~ascending;  // the largest key of a number is ~ascending(-inf) = 0xff800000 < NaN's
}

DK_HOST_DEVICE unsigned long long rank_key(unsigned int key, long long index) {
  return ((unsigned long long)key << 32) | (unsigned long long)(unsigned int)index;
}

DK_HOST_DEVICE long long rank_key_index(unsigned long long rank) { return (long long)(rank & 0xffffffffull); }

}  // namespace dk

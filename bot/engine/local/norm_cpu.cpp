// Llama's RMSNorm on a CPU in one op (see cpu_kernels.py, norm.py), bf16 in and out:
//   weight * bf16(x * rsqrt(mean(x^2) + eps))
// with the sum of squares and the scaling in fp32 and the two roundings to bf16 where transformers' module
// rounds (nearest even), so only the order of the fp32 sum differs from its eight ops.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

inline float to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if (std::isnan(f)) return 0x7FC0;
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16,
              "rms_norm: bf16 x and weight");
  TORCH_CHECK(weight.dim() == 1 && x.size(-1) == weight.size(0), "rms_norm: a weight as wide as x's last dim");
  const at::Tensor in = x.contiguous(), w = weight.contiguous();
  at::Tensor out = at::empty_like(in);
  const int64_t n = in.size(-1), rows = n ? in.numel() / n : 0;
  const auto* xs = reinterpret_cast<const uint16_t*>(in.data_ptr<c10::BFloat16>());
  const auto* ws = reinterpret_cast<const uint16_t*>(w.data_ptr<c10::BFloat16>());
  auto* os = reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>());
  const float epsilon = static_cast<float>(eps);
  // a decode step's 8 rows run on the calling thread: waking the pool cost more than the norm
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint16_t* row = xs + r * n;
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < n; ++i) sum += to_float(row[i]) * to_float(row[i]);
      const float scale = 1.f / std::sqrt(sum / static_cast<float>(n) + epsilon);
      uint16_t* dst = os + r * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) dst[i] = to_bf16(to_float(ws[i]) * to_float(to_bf16(to_float(row[i]) * scale)));
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(personabot, m) { m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor"); }

TORCH_LIBRARY_IMPL(personabot, CPU, m) { m.impl("rms_norm", &rms_norm); }

// Many LoRA adapters' terms added into a layer's output in one pass on a CPU (see lora_cpu.py).
//
// out[n, c] += sum_k B[slot[n], part(c) * r + k, c] * (A[slot[n], part(c) * r + k, :] . x[n, :])
//
// A: [slots, parts * r, in], B transposed: [slots, parts * r, out] (part p's rows are zero outside its
// columns, so only its own r rows are read for them). Rows are read straight from the slots, never gathered.
// Work is split over (row, rank row) for A and over (row, CHUNK output columns of one part) for B, so a
// lone row keeps every thread busy too. The sums are fp32; a bf16 output is rounded once, to nearest even.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t CHUNK = 128;  // output columns per task: the accumulators stay in registers

inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline void add_to(float& out, float v) { out += v; }
inline void add_to(c10::BFloat16& out, float v) {
  float f = to_float(out) + v;
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  bits += 0x7FFFu + ((bits >> 16) & 1u);  // an infinity or a quiet NaN keeps its top 16 bits
  out.x = static_cast<uint16_t>(bits >> 16);
}

template <typename W>
inline float dot(const W* __restrict a, const float* __restrict x, int64_t n) {
  float sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += to_float(a[i]) * x[i];
  return sum;
}

struct Chunk {
  int64_t part, start, size;
};

template <typename O, typename W>
void add_lora(at::Tensor& out, const at::Tensor& x, const int64_t* slot, const at::Tensor& a,
              const at::Tensor& b, const std::vector<Chunk>& chunks, int64_t rank) {
  const int64_t rows = x.size(0), fan_in = x.size(1), width = a.size(1), fan_out = b.size(2);
  std::vector<float> x32(rows * fan_in);  // here rather than a torch cast: one op fewer a layer
  const O* x_in = x.data_ptr<O>();
  const int64_t x_stride = x.stride(0);
  for (int64_t n = 0; n < rows; ++n)
    for (int64_t i = 0; i < fan_in; ++i) x32[n * fan_in + i] = to_float(x_in[n * x_stride + i]);
  const float* xs = x32.data();
  const W* as = a.data_ptr<W>();
  const W* bs = b.data_ptr<W>();
  O* outs = out.data_ptr<O>();
  const int64_t out_stride = out.stride(0);
  std::vector<float> hidden(rows * width);
  at::parallel_for(0, rows * width, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / width, k = t % width;
      hidden[t] = dot(as + (slot[n] * width + k) * fan_in, xs + n * fan_in, fan_in);
    }
  });
  const int64_t tasks = static_cast<int64_t>(chunks.size());
  at::parallel_for(0, rows * tasks, 1, [&](int64_t begin, int64_t end) {
    float acc[CHUNK];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / tasks;
      const Chunk& chunk = chunks[t % tasks];
      std::fill(acc, acc + chunk.size, 0.f);
      for (int64_t k = chunk.part * rank; k < (chunk.part + 1) * rank; ++k) {
        const float h = hidden[n * width + k];
        const W* row = bs + (slot[n] * width + k) * fan_out + chunk.start;
#pragma omp simd
        for (int64_t j = 0; j < chunk.size; ++j) acc[j] += h * to_float(row[j]);
      }
      O* target = outs + n * out_stride + chunk.start;
      for (int64_t j = 0; j < chunk.size; ++j) add_to(target[j], acc[j]);
    }
  });
}

void lora_add(at::Tensor out, const at::Tensor& x, const at::Tensor& slots, const at::Tensor& a,
              const at::Tensor& b, c10::IntArrayRef splits) {
  TORCH_CHECK(out.dim() == 2 && x.dim() == 2 && out.size(0) == x.size(0) && out.stride(1) == 1 &&
                  x.stride(1) == 1 && x.scalar_type() == out.scalar_type(),
              "lora_add: out [rows, out] and x [rows, in] of one dtype, each row contiguous");
  TORCH_CHECK(a.dim() == 3 && b.dim() == 3 && a.is_contiguous() && b.is_contiguous() &&
                  a.scalar_type() == b.scalar_type() && a.size(0) == b.size(0) && a.size(1) == b.size(1) &&
                  a.size(2) == x.size(1) && b.size(2) == out.size(1),
              "lora_add: A [slots, parts * r, in] and B [slots, parts * r, out], contiguous, one dtype");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.size(0) == x.size(0),
              "lora_add: one int64 slot per row");
  const int64_t parts = static_cast<int64_t>(splits.size()), rank = a.size(1) / parts;
  std::vector<Chunk> chunks;
  int64_t start = 0;
  for (int64_t p = 0; p < parts; ++p) {
    for (int64_t c = start; c < start + splits[p]; c += CHUNK)
      chunks.push_back({p, c, std::min(CHUNK, start + splits[p] - c)});
    start += splits[p];
  }
  TORCH_CHECK(start == out.size(1) && rank * parts == a.size(1), "lora_add: splits must sum to out's width");
  const at::Tensor slot = slots.contiguous();
  const int64_t* slot_ptr = slot.data_ptr<int64_t>();
  const bool bf16_out = out.scalar_type() == at::kBFloat16, bf16_w = a.scalar_type() == at::kBFloat16;
  TORCH_CHECK((bf16_out || out.scalar_type() == at::kFloat) && (bf16_w || a.scalar_type() == at::kFloat),
              "lora_add: fp32 or bf16 output and weights");
  if (bf16_out && bf16_w) add_lora<c10::BFloat16, c10::BFloat16>(out, x, slot_ptr, a, b, chunks, rank);
  else if (bf16_out) add_lora<c10::BFloat16, float>(out, x, slot_ptr, a, b, chunks, rank);
  else if (bf16_w) add_lora<float, c10::BFloat16>(out, x, slot_ptr, a, b, chunks, rank);
  else add_lora<float, float>(out, x, slot_ptr, a, b, chunks, rank);
}

}  // namespace

TORCH_LIBRARY(personabot, m) {
  m.def("lora_add(Tensor(a!) out, Tensor x, Tensor slots, Tensor a, Tensor b, int[] splits) -> ()");
}

TORCH_LIBRARY_IMPL(personabot, CPU, m) { m.impl("lora_add", &lora_add); }

// Causal attention on a CPU, bf16, with AVX512-BF16 dot products (see cpu_kernels.py, attention.py).
//
// q [B, H, Q, D], k and v [B, KV, T, D] (each row of D contiguous; H a multiple of KV), starts [B]: query i of
// row b sits at key position T - Q + i and sees keys starts[b] .. T - Q + i (left padding, then causal). The
// result is [B, Q, H, D]; a query that sees no key (padding) gets zeros.
// prefill_attention: a flash-attention loop; per task, one key/value head and QB query positions of its H / KV
// query heads, over blocks of KB keys packed for vdpbf16ps; the scores and softmax sums are fp32, the
// probabilities are rounded to bf16 for P.V as in torch's CPU flash kernel.
// decode_attention (Q = 1): per task, one key/value head's H / KV queries over CHUNK keys read where they lie
// in the cache, all in fp32 after the dot products; the chunks' partial sums are merged after.
// Built only where the compiler targets AVX512-BF16; elsewhere the ops are absent and SDPA runs.
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

namespace {

constexpr int64_t KB = 128;  // keys per block (64-128-256 measured: 8.1, 5.2, 6.0 ms a layer at 1014 tokens)
constexpr int64_t QB = 32;   // query positions per task
constexpr int64_t R = 6;     // query rows per register tile: 24 accumulators, 4 operands, 1 broadcast
constexpr int64_t NV = KB / 16;

// exp on 16 floats (Cephes' expf polynomial, within 2 ulp); inputs below -87.3 give about 1e-38.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

inline __m512bh load_bh(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }

inline __m512bh broadcast_pair(const void* p) {
  int32_t word;
  std::memcpy(&word, p, sizeof word);
  return (__m512bh)_mm512_set1_epi32(word);
}

// One block of up to KB keys: K as [D/2 pairs][KB keys][2] (a vector holds one pair of 16 keys), V as
// [KB/2 key pairs][D][2] (a vector holds 16 columns of two keys). Keys past the end are zeros.
void pack_block(const uint16_t* k, int64_t k_stride, const uint16_t* v, int64_t v_stride, int64_t keys, int64_t d,
                uint16_t* kp, uint16_t* vp) {
  std::memset(kp, 0, KB * d * sizeof(uint16_t));
  std::memset(vp, 0, KB * d * sizeof(uint16_t));
  for (int64_t j = 0; j < keys; ++j)
    for (int64_t p = 0; p < d / 2; ++p) std::memcpy(kp + (p * KB + j) * 2, k + j * k_stride + 2 * p, 4);
  for (int64_t j = 0; j < keys; ++j)
    for (int64_t c = 0; c < d; ++c) vp[((j / 2) * d + c) * 2 + j % 2] = v[j * v_stride + c];
}

struct Task {
  int64_t rows;                         // query rows (heads x positions), padded to whole tiles
  std::vector<float> s, o, m, l;        // scores of a tile, outputs, running maxima and sums
  std::vector<uint16_t> p;              // a tile's probabilities in bf16
  std::vector<int64_t> pos;             // each row's key position
  std::vector<const uint16_t*> q;       // each row's query
  Task(int64_t most, int64_t d)
      : rows(0), s(R * KB), o(most * d), m(most), l(most), p(R * KB), pos(most), q(most) {}
};

// Scores of R rows against one block: s[r][j] = q_r . k_j, in sub-blocks of 64 keys (24 accumulators).
inline void scores(Task& t, int64_t r0, const uint16_t* kp, int64_t d) {
  for (int64_t sb = 0; sb < KB; sb += 64) {
    __m512 acc[R][4];
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int64_t pp = 0; pp < d / 2; ++pp) {
      const uint16_t* kk = kp + (pp * KB + sb) * 2;
      const __m512bh k0 = load_bh(kk), k1 = load_bh(kk + 32), k2 = load_bh(kk + 64), k3 = load_bh(kk + 96);
      for (int64_t r = 0; r < R; ++r) {
        const __m512bh a = broadcast_pair(t.q[r0 + r] + 2 * pp);
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, k0);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, k1);
        acc[r][2] = _mm512_dpbf16_ps(acc[r][2], a, k2);
        acc[r][3] = _mm512_dpbf16_ps(acc[r][3], a, k3);
      }
    }
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < 4; ++c) _mm512_storeu_ps(t.s.data() + r * KB + sb + c * 16, acc[r][c]);
  }
}

// Online softmax of R rows' scores (keys j0.. of the block; all visible when ``full``): updates the running
// maxima and sums, rescales the outputs so far, and leaves the bf16 probabilities in t.p.
inline void softmax(Task& t, int64_t r0, int64_t j0, int64_t start, bool full, float scale, int64_t d) {
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t row = r0 + r;
    __mmask16 seen[NV];
    for (int64_t c = 0; c < NV; ++c) {
      if (full) {
        seen[c] = 0xFFFF;
        continue;
      }
      const __m512i j = _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int32_t>(j0 + c * 16)));
      seen[c] = _mm512_cmpge_epi32_mask(j, _mm512_set1_epi32(static_cast<int32_t>(start))) &
                _mm512_cmple_epi32_mask(j, _mm512_set1_epi32(static_cast<int32_t>(t.pos[row])));
    }
    __m512 x[NV];
    __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t c = 0; c < NV; ++c) {
      x[c] = _mm512_mul_ps(_mm512_loadu_ps(t.s.data() + r * KB + c * 16), _mm512_set1_ps(scale));
      top = _mm512_mask_max_ps(top, seen[c], top, x[c]);
    }
    const float most = std::max(t.m[row], _mm512_reduce_max_ps(top));
    const float alpha = std::exp(t.m[row] - most);  // 0 on a row's first block (its maximum was -inf)
    t.m[row] = most;
    __m512 sum = _mm512_setzero_ps();
    for (int64_t c = 0; c < NV; ++c) {
      x[c] = _mm512_maskz_mov_ps(seen[c], exp16(_mm512_sub_ps(x[c], _mm512_set1_ps(most))));
      sum = _mm512_add_ps(sum, x[c]);
    }
    t.l[row] = t.l[row] * alpha + _mm512_reduce_add_ps(sum);
    for (int64_t c = 0; c < NV; c += 2)
      _mm512_storeu_si512(t.p.data() + r * KB + c * 16, (__m512i)_mm512_cvtne2ps_pbh(x[c + 1], x[c]));
    if (alpha != 1.f) {
      float* out = t.o.data() + row * d;
      for (int64_t c = 0; c < d; c += 16)
        _mm512_storeu_ps(out + c, _mm512_mul_ps(_mm512_loadu_ps(out + c), _mm512_set1_ps(alpha)));
    }
  }
}

// o[r] += p[r] . V for R rows, 64 columns at a time (24 accumulators).
inline void weigh(Task& t, int64_t r0, const uint16_t* vp, int64_t d) {
  for (int64_t c0 = 0; c0 < d; c0 += 64) {
    __m512 acc[R][4];
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < 4; ++c) acc[r][c] = _mm512_loadu_ps(t.o.data() + (r0 + r) * d + c0 + c * 16);
    for (int64_t jp = 0; jp < KB / 2; ++jp) {
      const uint16_t* vv = vp + (jp * d + c0) * 2;
      const __m512bh v0 = load_bh(vv), v1 = load_bh(vv + 32), v2 = load_bh(vv + 64), v3 = load_bh(vv + 96);
      for (int64_t r = 0; r < R; ++r) {
        const __m512bh a = broadcast_pair(t.p.data() + r * KB + 2 * jp);
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, v0);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, v1);
        acc[r][2] = _mm512_dpbf16_ps(acc[r][2], a, v2);
        acc[r][3] = _mm512_dpbf16_ps(acc[r][3], a, v3);
      }
    }
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < 4; ++c) _mm512_storeu_ps(t.o.data() + (r0 + r) * d + c0 + c * 16, acc[r][c]);
  }
}

void check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& starts, const char* op) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() && q.size(0) == k.size(0) &&
                  q.size(3) == k.size(3) && k.size(1) > 0 && q.size(1) % k.size(1) == 0 && q.size(2) <= k.size(2),
              op, ": q [B, H, Q, D], k and v [B, KV, T, D] with H a multiple of KV and Q <= T");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
                  v.scalar_type() == at::kBFloat16 && q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              op, ": bf16 q, k, v, each row of D contiguous");
  TORCH_CHECK(q.size(3) % 64 == 0 && q.size(3) <= 256, op, ": a head size that is a multiple of 64, at most 256");
  TORCH_CHECK(starts.scalar_type() == at::kLong && starts.dim() == 1 && starts.size(0) == q.size(0),
              op, ": one int64 start per row");
}

at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& starts,
                             double scale) {
  check(q, k, v, starts, "prefill_attention");
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), KV = k.size(1), T = k.size(2);
  const int64_t G = H / KV, offset = T - Lq, blocks = (T + KB - 1) / KB, qblocks = (Lq + QB - 1) / QB;
  at::Tensor out = at::zeros({B, Lq, H, D}, q.options());
  if (Lq == 0) return out;
  const at::Tensor start_t = starts.contiguous();
  const int64_t* start = start_t.data_ptr<int64_t>();
  // not zeroed here: pack_block writes (or zeroes) every element of its block, in parallel
  const int64_t packed_size = B * KV * blocks * KB * D;
  std::unique_ptr<uint16_t[]> kpack(new uint16_t[packed_size]), vpack(new uint16_t[packed_size]);
  const auto* kd = reinterpret_cast<const uint16_t*>(k.data_ptr<c10::BFloat16>());
  const auto* vd = reinterpret_cast<const uint16_t*>(v.data_ptr<c10::BFloat16>());
  at::parallel_for(0, B * KV * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / (KV * blocks), h = i / blocks % KV, kb = i % blocks;
      pack_block(kd + b * k.stride(0) + h * k.stride(1) + kb * KB * k.stride(2), k.stride(2),
                 vd + b * v.stride(0) + h * v.stride(1) + kb * KB * v.stride(2), v.stride(2),
                 std::min(KB, T - kb * KB), D, kpack.get() + i * KB * D, vpack.get() + i * KB * D);
    }
  });
  const auto* qd = reinterpret_cast<const uint16_t*>(q.data_ptr<c10::BFloat16>());
  auto* od = reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>());
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * KV * qblocks, 1, [&](int64_t begin, int64_t end) {
    Task t(G * QB + R, D);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / (KV * qblocks), h = i / qblocks % KV, order = i % qblocks;
      // causal blocks grow with position: light and heavy ones alternate so each thread's range is even
      const int64_t qb = order % 2 ? qblocks - 1 - order / 2 : order / 2;
      const int64_t i0 = qb * QB, n = std::min(QB, Lq - i0), s0 = std::max<int64_t>(start[b], 0);
      const int64_t first = std::max<int64_t>(0, s0 - offset - i0);  // the task's first position that sees a key
      if (first >= n) continue;
      const int64_t seeing = n - first;
      t.rows = 0;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t j = first; j < n; ++j, ++t.rows) {
          t.pos[t.rows] = offset + i0 + j;
          t.q[t.rows] = qd + b * q.stride(0) + (h * G + g) * q.stride(1) + (i0 + j) * q.stride(2);
        }
      const int64_t real = t.rows;
      for (; t.rows % R; ++t.rows) {  // whole tiles: copies of the last row, computed and never written
        t.pos[t.rows] = t.pos[real - 1];
        t.q[t.rows] = t.q[real - 1];
      }
      std::fill(t.o.begin(), t.o.begin() + t.rows * D, 0.f);
      std::fill(t.m.begin(), t.m.begin() + t.rows, -std::numeric_limits<float>::infinity());
      std::fill(t.l.begin(), t.l.begin() + t.rows, 0.f);
      const int64_t lowest = offset + i0 + first, highest = offset + i0 + n - 1;
      const int64_t packed = (b * KV + h) * blocks * KB * D;
      for (int64_t kb = s0 / KB; kb * KB <= highest; ++kb) {
        const int64_t j0 = kb * KB;
        const bool full = j0 >= s0 && j0 + KB - 1 <= lowest;
        for (int64_t r0 = 0; r0 < t.rows; r0 += R) {
          scores(t, r0, kpack.get() + packed + j0 * D, D);
          softmax(t, r0, j0, s0, full, sc, D);
          weigh(t, r0, vpack.get() + packed + j0 * D, D);
        }
      }
      for (int64_t row = 0; row < real; ++row) {
        const int64_t g = row / seeing, j = first + row % seeing;
        const __m512 inv = _mm512_set1_ps(1.f / t.l[row]);
        uint16_t* dst = od + ((b * Lq + i0 + j) * H + h * G + g) * D;
        for (int64_t c = 0; c < D; c += 32) {
          const __m512 lo = _mm512_mul_ps(_mm512_loadu_ps(t.o.data() + row * D + c), inv);
          const __m512 hi = _mm512_mul_ps(_mm512_loadu_ps(t.o.data() + row * D + c + 16), inv);
          _mm512_storeu_si512(dst + c, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
      }
    }
  });
  return out;
}


constexpr int64_t CHUNK = 256;  // keys per decode task: a lone row's 1000 keys still feed both threads
constexpr int64_t GMAX = 16;    // query heads per key/value head a decode task holds

inline __m512 bf16_to_fp32(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// One decode task: scores of G queries against keys j0..j1-1, their softmax (maximum m, sum l) and o = P.V.
void decode_chunk(const uint16_t* const* q, int64_t G, const uint16_t* k, int64_t k_stride, const uint16_t* v,
                  int64_t v_stride, int64_t n, int64_t d, float scale, float* s, float* m, float* l, float* o) {
  for (int64_t g = 0; g < G; ++g) {
    __m512bh qv[8];
    for (int64_t c = 0; c < d / 32; ++c) qv[c] = load_bh(q[g] + c * 32);
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n; ++j) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t c = 0; c < d / 32; ++c) acc = _mm512_dpbf16_ps(acc, qv[c], load_bh(k + j * k_stride + c * 32));
      s[g * CHUNK + j] = _mm512_reduce_add_ps(acc) * scale;
      top = std::max(top, s[g * CHUNK + j]);
    }
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 in = n - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - j)) - 1);
      float* row = s + g * CHUNK + j;
      const __m512 x = _mm512_sub_ps(_mm512_maskz_loadu_ps(in, row), _mm512_set1_ps(top));
      const __m512 e = _mm512_maskz_mov_ps(in, exp16(x));
      _mm512_mask_storeu_ps(row, in, e);
      sum = _mm512_add_ps(sum, e);
    }
    m[g] = top;
    l[g] = _mm512_reduce_add_ps(sum);
  }
  for (int64_t d0 = 0; d0 < d; d0 += 64) {
    __m512 acc[GMAX][4];
    for (int64_t g = 0; g < G; ++g)
      for (int64_t c = 0; c < 4; ++c) acc[g][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      const uint16_t* vv = v + j * v_stride + d0;
      const __m512 v0 = bf16_to_fp32(vv), v1 = bf16_to_fp32(vv + 16), v2 = bf16_to_fp32(vv + 32),
                   v3 = bf16_to_fp32(vv + 48);
      for (int64_t g = 0; g < G; ++g) {
        const __m512 p = _mm512_set1_ps(s[g * CHUNK + j]);
        acc[g][0] = _mm512_fmadd_ps(p, v0, acc[g][0]);
        acc[g][1] = _mm512_fmadd_ps(p, v1, acc[g][1]);
        acc[g][2] = _mm512_fmadd_ps(p, v2, acc[g][2]);
        acc[g][3] = _mm512_fmadd_ps(p, v3, acc[g][3]);
      }
    }
    for (int64_t g = 0; g < G; ++g)
      for (int64_t c = 0; c < 4; ++c) _mm512_storeu_ps(o + g * d + d0 + c * 16, acc[g][c]);
  }
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& starts,
                            double scale) {
  check(q, k, v, starts, "decode_attention");
  TORCH_CHECK(q.size(2) == 1 && q.size(1) / k.size(1) <= GMAX,
              "decode_attention: one query per row, at most 16 query heads per key/value head");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), KV = k.size(1), T = k.size(2);
  const int64_t G = H / KV, chunks = (T + CHUNK - 1) / CHUNK;
  const at::Tensor start_t = starts.contiguous();
  const int64_t* start = start_t.data_ptr<int64_t>();
  std::vector<float> part_m(B * KV * chunks * G), part_l(part_m.size()), part_o(part_m.size() * D);
  const auto* qd = reinterpret_cast<const uint16_t*>(q.data_ptr<c10::BFloat16>());
  const auto* kd = reinterpret_cast<const uint16_t*>(k.data_ptr<c10::BFloat16>());
  const auto* vd = reinterpret_cast<const uint16_t*>(v.data_ptr<c10::BFloat16>());
  at::parallel_for(0, B * KV * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(GMAX * CHUNK);
    const uint16_t* rows[GMAX];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / (KV * chunks), h = i / chunks % KV, c = i % chunks;
      const int64_t j0 = std::max<int64_t>(c * CHUNK, start[b]), j1 = std::min<int64_t>((c + 1) * CHUNK, T);
      if (j0 >= j1) {  // all padding: no weight in the merge
        std::fill_n(part_m.data() + i * G, G, -std::numeric_limits<float>::infinity());
        continue;
      }
      for (int64_t g = 0; g < G; ++g) rows[g] = qd + b * q.stride(0) + (h * G + g) * q.stride(1);
      decode_chunk(rows, G, kd + b * k.stride(0) + h * k.stride(1) + j0 * k.stride(2), k.stride(2),
                   vd + b * v.stride(0) + h * v.stride(1) + j0 * v.stride(2), v.stride(2), j1 - j0, D,
                   static_cast<float>(scale), s.data(), part_m.data() + i * G, part_l.data() + i * G,
                   part_o.data() + i * G * D);
    }
  });
  at::Tensor out = at::zeros({B, 1, H, D}, q.options());
  auto* od = reinterpret_cast<c10::BFloat16*>(out.data_ptr<c10::BFloat16>());
  std::vector<float> sum(D);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < KV; ++h)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t first = (b * KV + h) * chunks;
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t c = 0; c < chunks; ++c) top = std::max(top, part_m[(first + c) * G + g]);
        if (top == -std::numeric_limits<float>::infinity()) continue;  // a row of padding only
        float total = 0.f;
        std::fill(sum.begin(), sum.end(), 0.f);
        for (int64_t c = 0; c < chunks; ++c) {
          const int64_t at = (first + c) * G + g;
          if (part_m[at] == -std::numeric_limits<float>::infinity()) continue;
          const float w = std::exp(part_m[at] - top);
          total += w * part_l[at];
          for (int64_t x = 0; x < D; ++x) sum[x] += w * part_o[at * D + x];
        }
        for (int64_t x = 0; x < D; ++x) od[(b * H + h * G + g) * D + x] = c10::BFloat16(sum[x] / total);
      }
  return out;
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(personabot, m) {
  m.def("prefill_attention(Tensor q, Tensor k, Tensor v, Tensor starts, float scale) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor starts, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(personabot, CPU, m) {
  m.impl("prefill_attention", &prefill_attention);
  m.impl("decode_attention", &decode_attention);
}
#endif

// Matrix-vector products with low-precision weights on x86 CPUs with AVX2 (built by quant.py on first use).
//
// y (M, N) = x (M, K) @ W^T, with x float32 and W (N, K) stored as int8 (one scale per row), NF4 (two 4-bit codes
// a byte, high nibble first, one absmax per block of 64 weights) or float16/bfloat16. Each weight is widened to
// float32 in registers and multiplied there, so the result is the float32 product with the dequantised weight.
// At batch 1, decoding reads every weight once a token: fewer bytes a weight is what makes it faster, as long as
// widening costs less than the bytes it saves. torch has no such kernel for a CPU at batch 1
// (_weight_int8pack_mm is slower than a float32 F.linear there). M is meant to be small (decoding); each weight
// row is read once and used for all M rows of x while it is in the L1 cache.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace {

float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Eight consecutive weights widened to float32.
__m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
__m256 load8(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
__m256 load8(const c10::BFloat16* p) {  // a bfloat16 is the top half of a float32
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

__m256 load8(const float* p) { return _mm256_loadu_ps(p); }

// sum_k w[k] * x[k]: four accumulators, so that consecutive multiply-adds do not wait for each other.
template <typename T>
float dot(const T* w, const float* x, int64_t K) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    a0 = _mm256_fmadd_ps(load8(w + k), _mm256_loadu_ps(x + k), a0);
    a1 = _mm256_fmadd_ps(load8(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
    a2 = _mm256_fmadd_ps(load8(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
    a3 = _mm256_fmadd_ps(load8(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
  }
  float sum = horizontal_sum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; k < K; k++) sum += static_cast<float>(w[k]) * x[k];
  return sum;
}

void check_input(const at::Tensor& x, const at::Tensor& w, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32 (M, K)");
  TORCH_CHECK(w.is_contiguous() && x.size(1) == K, "weight: contiguous, with K = x.size(1) columns");
}

// y = x @ (w * row_scale[:, None])^T; row_scale is empty for float16/bfloat16 weights.
template <typename T>
at::Tensor matvec(const at::Tensor& x, const at::Tensor& w, const float* row_scale) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const T* wp = w.data_ptr<T>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; n++) {
      const float scale = row_scale ? row_scale[n] : 1.0f;
      for (int64_t m = 0; m < M; m++) yp[m * N + n] = dot(wp + n * K, xp + m * K, K) * scale;
    }
  });
  return y;
}

at::Tensor int8_matvec(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  check_input(x, w, w.size(1));
  TORCH_CHECK(w.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat && scale.is_contiguous(),
              "int8 weight with a float32 scale per row");
  return matvec<int8_t>(x, w, scale.data_ptr<float>());
}

at::Tensor half_matvec(const at::Tensor& x, const at::Tensor& w) {
  check_input(x, w, w.size(1));
  if (w.scalar_type() == at::kHalf) return matvec<c10::Half>(x, w, nullptr);
  TORCH_CHECK(w.scalar_type() == at::kBFloat16, "float16 or bfloat16 weight");
  return matvec<c10::BFloat16>(x, w, nullptr);
}

// NF4: codes (N * K / 2) bytes, absmax (N * K / 64); K must be a multiple of 64, so a block never spans two rows.
// levels: the 16 NF4 values. A code picks its level with two 8-entry table lookups (permutevar8x32), its 4th bit
// choosing between them; each block's partial sums are scaled by its absmax once.
at::Tensor nf4_matvec(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& absmax,
                      const at::Tensor& levels, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32 (M, K)");
  TORCH_CHECK(K % 64 == 0 && codes.numel() == N * K / 2 && absmax.numel() == N * K / 64 && levels.numel() == 16,
              "nf4: K a multiple of 64, N * K / 2 code bytes, N * K / 64 absmax values, 16 levels");
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* ap = absmax.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const __m256 low_levels = _mm256_loadu_ps(levels.data_ptr<float>());
  const __m256 high_levels = _mm256_loadu_ps(levels.data_ptr<float>() + 8);
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    const __m128i nibble = _mm_set1_epi8(0x0f);
    std::vector<__m256> acc(M);
    for (int64_t n = begin; n < end; n++) {
      std::fill(acc.begin(), acc.end(), _mm256_setzero_ps());
      for (int64_t b = 0; b < K / 64; b++) {
        // The block's 64 codes (32 bytes) as 64 levels: byte j holds weights 2j (high nibble) and 2j + 1 (low).
        __m256 w[8];
        const uint8_t* c = cp + (n * K + b * 64) / 2;
        for (int half = 0; half < 2; half++) {
          __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + 16 * half));
          __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble), low = _mm_and_si128(bytes, nibble);
          __m128i in_order[2] = {_mm_unpacklo_epi8(high, low), _mm_unpackhi_epi8(high, low)};
          for (int i = 0; i < 4; i++) {
            __m256i idx = _mm256_cvtepu8_epi32(i % 2 ? _mm_srli_si128(in_order[i / 2], 8) : in_order[i / 2]);
            __m256 is_high = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));  // bit 3 moved to the sign bit
            w[4 * half + i] = _mm256_blendv_ps(_mm256_permutevar8x32_ps(low_levels, idx),
                                               _mm256_permutevar8x32_ps(high_levels, idx), is_high);
          }
        }
        const __m256 scale = _mm256_set1_ps(ap[n * K / 64 + b]);
        for (int64_t m = 0; m < M; m++) {
          const float* xb = xp + m * K + b * 64;
          __m256 s0 = _mm256_mul_ps(w[0], _mm256_loadu_ps(xb)), s1 = _mm256_mul_ps(w[1], _mm256_loadu_ps(xb + 8));
          for (int i = 2; i < 8; i += 2) {
            s0 = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(xb + 8 * i), s0);
            s1 = _mm256_fmadd_ps(w[i + 1], _mm256_loadu_ps(xb + 8 * i + 8), s1);
          }
          acc[m] = _mm256_fmadd_ps(_mm256_add_ps(s0, s1), scale, acc[m]);
        }
      }
      for (int64_t m = 0; m < M; m++) yp[m * N + n] = horizontal_sum(acc[m]);
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(nanollm_quant, m) {
  m.def("int8_matvec(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("half_matvec(Tensor x, Tensor w) -> Tensor");
  m.def("nf4_matvec(Tensor x, Tensor codes, Tensor absmax, Tensor levels, int N) -> Tensor");
}

TORCH_LIBRARY_IMPL(nanollm_quant, CPU, m) {
  m.impl("int8_matvec", &int8_matvec);
  m.impl("half_matvec", &half_matvec);
  m.impl("nf4_matvec", &nf4_matvec);
}

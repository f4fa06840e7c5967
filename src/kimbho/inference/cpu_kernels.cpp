// Matrix products of a few rows (a decode step's) by int8 and bf16 weight matrices, for the
// CPU's compiled decode step (cpu_kernels.py says why and how they are built and called).
//
// Both read each weight once per call, a vector at a time, with the few input rows prepared
// once per call so that the inner loop is a load of weights and one multiply-add per row:
//
// - int8 weights (N, K) (their scales per output feature are applied by the caller, fused into
//   what follows): the input rows are quantized to int16, one scale per row (15 bits: their rounding is ~1e-5 of the row's largest value), and
//   16 weights at a time are widened to int16 and multiplied by `vpmaddwd` into int32 sums
//   (exact). llama.cpp's q8_0 quantizes its inputs to int8 instead (`vpmaddubsw`): more work per
//   weight on AVX2 (two sign fix-ups) and 8 bits less of the input.
// - bf16 weights (N, K): a bf16 is the top half of an fp32, so a vector of 16 is two vectors of
//   8 fp32 by one shift (even positions) and one mask (odd positions); the input rows are stored
//   in that even/odd order once per call. Two fused multiply-adds per 16 weights, no conversion.
//
// Each product runs on OpenMP's threads (the runtime Inductor's own kernels use), every thread a
// contiguous range of output features. They are AOTInductor C shims: called directly by the
// compiled step's code, no dispatcher in between.

#include <torch/csrc/inductor/aoti_torch/c/shim.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KIMBHO_AVX2 1
#endif

namespace {

// Rows handled in one pass over the weights (more rows: more passes). Each row keeps its own
// accumulators in registers, which AVX2's 16 hold for 8 rows with room for the weights.
constexpr int64_t kRowsPerPass = 8;
// int16 x int8 sums of 16 columns stay exact in int32 for 256 vectors: partial sums are taken
// to int64 every kColumnsPerBlock columns.
constexpr int64_t kColumnsPerBlock = 4096;

float bf16_to_float(uint16_t bits) {
  uint32_t word = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &word, sizeof value);
  return value;
}

uint16_t float_to_bf16(float value) {  // round to nearest even, as PyTorch does
  uint32_t word;
  std::memcpy(&word, &value, sizeof word);
  if ((word & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  word += 0x7fffu + ((word >> 16) & 1u);
  return static_cast<uint16_t>(word >> 16);
}

// A matrix of input rows as the C shim passes it, fp32 or bf16, read once per call.
struct Rows {
  const void* data;
  bool bf16;
  int64_t count, width, row_stride, col_stride;

  float at(int64_t row, int64_t col) const {
    const int64_t i = row * row_stride + col * col_stride;
    return bf16 ? bf16_to_float(static_cast<const uint16_t*>(data)[i]) : static_cast<const float*>(data)[i];
  }
};

void store(void* out, bool bf16, int64_t i, float value) {
  if (bf16) {
    static_cast<uint16_t*>(out)[i] = float_to_bf16(value);
  } else {
    static_cast<float*>(out)[i] = value;
  }
}

// Splits [0, n) across the threads of the current parallel region.
void thread_range(int64_t n, int64_t* begin, int64_t* end) {
  const int64_t threads = omp_get_num_threads(), me = omp_get_thread_num();
  const int64_t share = (n + threads - 1) / threads;
  *begin = std::min(n, me * share);
  *end = std::min(n, *begin + share);
}

#ifdef KIMBHO_AVX2
int64_t sum_lanes(__m256i v) {
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), v);
  int64_t total = 0;
  for (int32_t lane : lanes) total += lane;
  return total;
}

float sum_lanes(__m256 v) {
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = _mm_add_ps(half, _mm_movehl_ps(half, half));
  half = _mm_add_ss(half, _mm_movehdup_ps(half));
  return _mm_cvtss_f32(half);
}
#endif

// ---- int8 weights ----------------------------------------------------------------------------

// Sums of `rows` (R) int16 rows (padded width `padded`) times weight row `w` (K int8 values).
template <int R>
void int8_dot(const int16_t* xq, int64_t padded, const int8_t* w, int64_t K, int64_t* sums) {
  int64_t col = 0;
  for (int r = 0; r < R; ++r) sums[r] = 0;
#ifdef KIMBHO_AVX2
  const int64_t vectors = K / 16 * 16;
  while (col < vectors) {
    const int64_t stop = std::min(vectors, col + kColumnsPerBlock);
    __m256i acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
    for (; col < stop; col += 16) {
      const __m256i w16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + col)));
      for (int r = 0; r < R; ++r) {
        const __m256i x16 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * padded + col));
        acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(w16, x16));
      }
    }
    for (int r = 0; r < R; ++r) sums[r] += sum_lanes(acc[r]);
  }
#endif
  for (; col < K; ++col) {
    for (int r = 0; r < R; ++r) sums[r] += static_cast<int64_t>(w[col]) * xq[r * padded + col];
  }
}

template <int R>
void int8_pass(const int16_t* xq, int64_t padded, const float* row_scales, const int8_t* weight,
               int64_t K, int64_t begin, int64_t end, void* out, bool bf16, int64_t N) {
  int64_t sums[R];
  for (int64_t n = begin; n < end; ++n) {
    int8_dot<R>(xq, padded, weight + n * K, K, sums);
    for (int r = 0; r < R; ++r) store(out, bf16, r * N + n, static_cast<float>(sums[r]) * row_scales[r]);
  }
}

void int8_linear(const Rows& x, const int8_t* weight, int64_t N, void* out, bool bf16) {
  const int64_t M = x.count, K = x.width, padded = (K + 15) / 16 * 16;
  // Each row as int16 with its own scale: value ~= xq * row_scale, |xq| <= 32767.
  std::vector<int16_t> xq(M * padded, 0);
  std::vector<float> row_scales(M);
  for (int64_t m = 0; m < M; ++m) {
    float largest = 0.f;
    for (int64_t k = 0; k < K; ++k) largest = std::max(largest, std::fabs(x.at(m, k)));
    const float scale = largest > 0.f ? largest / 32767.f : 1.f;
    row_scales[m] = scale;
    const float inverse = 1.f / scale;
    for (int64_t k = 0; k < K; ++k) {
      xq[m * padded + k] = static_cast<int16_t>(std::nearbyint(std::min(32767.f, std::max(-32767.f, x.at(m, k) * inverse))));
    }
  }
#pragma omp parallel
  {
    int64_t begin, end;
    thread_range(N, &begin, &end);
    for (int64_t m = 0; m < M; m += kRowsPerPass) {
      const int64_t rows = std::min(kRowsPerPass, M - m);
      const int16_t* xm = xq.data() + m * padded;
      const float* sm = row_scales.data() + m;
      void* om = bf16 ? static_cast<void*>(static_cast<uint16_t*>(out) + m * N)
                      : static_cast<void*>(static_cast<float*>(out) + m * N);
      switch (rows) {
        case 1: int8_pass<1>(xm, padded, sm, weight, K, begin, end, om, bf16, N); break;
        case 2: int8_pass<2>(xm, padded, sm, weight, K, begin, end, om, bf16, N); break;
        case 3: int8_pass<3>(xm, padded, sm, weight, K, begin, end, om, bf16, N); break;
        case 4: int8_pass<4>(xm, padded, sm, weight, K, begin, end, om, bf16, N); break;
        case 5: int8_pass<5>(xm, padded, sm, weight, K, begin, end, om, bf16, N); break;
        case 6: int8_pass<6>(xm, padded, sm, weight, K, begin, end, om, bf16, N); break;
        case 7: int8_pass<7>(xm, padded, sm, weight, K, begin, end, om, bf16, N); break;
        default: int8_pass<8>(xm, padded, sm, weight, K, begin, end, om, bf16, N); break;
      }
    }
  }
}

// ---- fp32 and bf16 weights ------------------------------------------------------------------

// Weights of type W read 16 at a time as two vectors of 8 fp32: fp32 as they are (columns 0-7,
// then 8-15); bf16, the top half of an fp32, by one shift (the even columns) and one mask (the
// odd ones). `column(j)`: which of the 16 columns the j-th value of the two vectors is, the
// order in which the input rows are stored.
template <typename W>
struct Sixteen;

template <>
struct Sixteen<float> {
  static int64_t column(int64_t j) { return j; }
  static float value(float w) { return w; }
#ifdef KIMBHO_AVX2
  static void load(const float* w, __m256* first, __m256* second) {
    *first = _mm256_loadu_ps(w);
    *second = _mm256_loadu_ps(w + 8);
  }
#endif
};

template <>
struct Sixteen<uint16_t> {  // bf16
  static int64_t column(int64_t j) { return j < 8 ? 2 * j : 2 * (j - 8) + 1; }
  static float value(uint16_t w) { return bf16_to_float(w); }
#ifdef KIMBHO_AVX2
  static void load(const uint16_t* w, __m256* first, __m256* second) {
    const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    *first = _mm256_castsi256_ps(_mm256_slli_epi32(words, 16));
    *second = _mm256_castsi256_ps(_mm256_and_si256(words, _mm256_set1_epi32(static_cast<int32_t>(0xffff0000u))));
  }
#endif
};

// Sums of R fp32 rows (stored in `Sixteen<W>::column` order, padded width `padded`) times
// weight row `w` (K values).
template <typename W, int R>
void float_dot(const float* xs, int64_t padded, const W* w, int64_t K, float* sums) {
  int64_t col = 0;
  for (int r = 0; r < R; ++r) sums[r] = 0.f;
#ifdef KIMBHO_AVX2
  const int64_t vectors = K / 16 * 16;
  // Up to 4 rows, two chains of additions per row, so that enough multiply-adds are in flight;
  // from 5, one (the registers hold no more).
  constexpr int C = R <= 4 ? 2 : 1;
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  }
  for (; col < vectors; col += 16) {
    __m256 w1, w2;
    Sixteen<W>::load(w + col, &w1, &w2);
    for (int r = 0; r < R; ++r) {
      acc[r][0] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xs + r * padded + col), acc[r][0]);
      acc[r][C - 1] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xs + r * padded + col + 8), acc[r][C - 1]);
    }
  }
  for (int r = 0; r < R; ++r) sums[r] = sum_lanes(C == 2 ? _mm256_add_ps(acc[r][0], acc[r][C - 1]) : acc[r][0]);
#endif
  for (; col < K; ++col) {
    for (int r = 0; r < R; ++r) sums[r] += Sixteen<W>::value(w[col]) * xs[r * padded + col];
  }
}

template <typename W, int R>
void float_pass(const float* xs, int64_t padded, const W* weight, int64_t K, int64_t begin,
                int64_t end, void* out, bool bf16, int64_t N) {
  float sums[R];
  for (int64_t n = begin; n < end; ++n) {
    float_dot<W, R>(xs, padded, weight + n * K, K, sums);
    for (int r = 0; r < R; ++r) store(out, bf16, r * N + n, sums[r]);
  }
}

template <typename W>
void float_linear(const Rows& x, const W* weight, int64_t N, void* out, bool bf16) {
  const int64_t M = x.count, K = x.width, padded = (K + 15) / 16 * 16;
#ifdef KIMBHO_AVX2
  const int64_t vectors = K / 16 * 16;
#else
  const int64_t vectors = 0;
#endif
  std::vector<float> xs(M * padded, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    float* row = xs.data() + m * padded;
    for (int64_t k = 0; k < vectors; k += 16) {
      for (int64_t j = 0; j < 16; ++j) row[k + j] = x.at(m, k + Sixteen<W>::column(j));
    }
    for (int64_t k = vectors; k < K; ++k) row[k] = x.at(m, k);  // the tail, in order
  }
#pragma omp parallel
  {
    int64_t begin, end;
    thread_range(N, &begin, &end);
    for (int64_t m = 0; m < M; m += kRowsPerPass) {
      const int64_t rows = std::min(kRowsPerPass, M - m);
      const float* xm = xs.data() + m * padded;
      void* om = bf16 ? static_cast<void*>(static_cast<uint16_t*>(out) + m * N)
                      : static_cast<void*>(static_cast<float*>(out) + m * N);
      switch (rows) {
        case 1: float_pass<W, 1>(xm, padded, weight, K, begin, end, om, bf16, N); break;
        case 2: float_pass<W, 2>(xm, padded, weight, K, begin, end, om, bf16, N); break;
        case 3: float_pass<W, 3>(xm, padded, weight, K, begin, end, om, bf16, N); break;
        case 4: float_pass<W, 4>(xm, padded, weight, K, begin, end, om, bf16, N); break;
        case 5: float_pass<W, 5>(xm, padded, weight, K, begin, end, om, bf16, N); break;
        case 6: float_pass<W, 6>(xm, padded, weight, K, begin, end, om, bf16, N); break;
        case 7: float_pass<W, 7>(xm, padded, weight, K, begin, end, om, bf16, N); break;
        default: float_pass<W, 8>(xm, padded, weight, K, begin, end, om, bf16, N); break;
      }
    }
  }
}

// ---- the C shims -----------------------------------------------------------------------------

#define KIMBHO_CHECK(call)                       \
  do {                                           \
    if ((call) != AOTI_TORCH_SUCCESS) return AOTI_TORCH_FAILURE; \
  } while (0)

// The input rows (M, K), fp32 or bf16, and a new (M, N) output of their dtype.
AOTITorchError rows_and_output(AtenTensorHandle x, int64_t N, Rows* rows, AtenTensorHandle* out) {
  int64_t dim;
  int64_t *sizes, *strides;
  int32_t dtype;
  void* data;
  KIMBHO_CHECK(aoti_torch_get_dim(x, &dim));
  KIMBHO_CHECK(aoti_torch_get_sizes(x, &sizes));
  KIMBHO_CHECK(aoti_torch_get_strides(x, &strides));
  KIMBHO_CHECK(aoti_torch_get_dtype(x, &dtype));
  KIMBHO_CHECK(aoti_torch_get_data_ptr(x, &data));
  const bool bf16 = dtype == aoti_torch_dtype_bfloat16();
  if (dim != 2 || !(bf16 || dtype == aoti_torch_dtype_float32())) return AOTI_TORCH_FAILURE;
  *rows = Rows{data, bf16, sizes[0], sizes[1], strides[0], strides[1]};
  const int64_t out_sizes[2] = {sizes[0], N}, out_strides[2] = {N, 1};
  return aoti_torch_empty_strided(2, out_sizes, out_strides, dtype, aoti_torch_device_type_cpu(), 0, out);
}

}  // namespace

extern "C" {

// kimbho::int8_linear(x, weight): x (M, K) @ weight (N, K).T, weight in int8
AOTITorchError aoti_torch_cpu_int8_linear(AtenTensorHandle x, AtenTensorHandle weight, AtenTensorHandle* ret0) {
  int64_t* sizes;
  void *w, *out;
  Rows rows;
  KIMBHO_CHECK(aoti_torch_get_sizes(weight, &sizes));
  KIMBHO_CHECK(aoti_torch_get_data_ptr(weight, &w));
  KIMBHO_CHECK(rows_and_output(x, sizes[0], &rows, ret0));
  KIMBHO_CHECK(aoti_torch_get_data_ptr(*ret0, &out));
  int8_linear(rows, static_cast<const int8_t*>(w), sizes[0], out, rows.bf16);
  return AOTI_TORCH_SUCCESS;
}

// kimbho::linear(x, weight): x (M, K) @ weight (N, K).T, weight in fp32 or bf16
AOTITorchError aoti_torch_cpu_linear(AtenTensorHandle x, AtenTensorHandle weight, AtenTensorHandle* ret0) {
  int64_t* sizes;
  int32_t dtype;
  void *w, *out;
  Rows rows;
  KIMBHO_CHECK(aoti_torch_get_sizes(weight, &sizes));
  KIMBHO_CHECK(aoti_torch_get_dtype(weight, &dtype));
  KIMBHO_CHECK(aoti_torch_get_data_ptr(weight, &w));
  KIMBHO_CHECK(rows_and_output(x, sizes[0], &rows, ret0));
  KIMBHO_CHECK(aoti_torch_get_data_ptr(*ret0, &out));
  if (dtype == aoti_torch_dtype_bfloat16()) {
    float_linear(rows, static_cast<const uint16_t*>(w), sizes[0], out, rows.bf16);
  } else if (dtype == aoti_torch_dtype_float32()) {
    float_linear(rows, static_cast<const float*>(w), sizes[0], out, rows.bf16);
  } else {
    return AOTI_TORCH_FAILURE;
  }
  return AOTI_TORCH_SUCCESS;
}

}  // extern "C"

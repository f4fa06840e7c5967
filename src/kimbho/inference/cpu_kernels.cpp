// Matrix products of a few rows (a decode step's) by fp32, bf16 and int8 weight matrices, for the
// CPU's compiled decode step (cpu_kernels.py says why and how they are built and called).
//
// Each reads every weight once per call, a vector at a time, with the few input rows prepared
// once per call so that the inner loop is a load of weights and one multiply-add per row:
//
// - int8 weights (N, K) (their scales per output feature are applied by the caller, fused into
//   what follows): the input rows are rounded to int16, one scale per row (15 bits: their
//   rounding is ~1e-5 of the row's largest value), and 16 weights at a time are widened to int16
//   and multiplied by `vpmaddwd` into int32 sums, which are exact. llama.cpp's q8_0 rounds its
//   inputs to int8 instead (`vpmaddubsw`): two sign fix-ups more per 32 weights on AVX2, and 8
//   bits less of the input.
// - bf16 weights (N, K): a bf16 is the top half of an fp32, so a vector of 16 is two vectors of
//   8 fp32 by one shift (even columns) and one mask (odd columns); the input rows are stored in
//   that even/odd order. Two fused multiply-adds per 16 weights, no conversion.
// - fp32 weights: two loads and two fused multiply-adds per 16 weights; what counts is that the
//   weights are read once, on every thread, at the memory's speed.
//
// What bounds them is the memory: on a 2-core Zen 3 the 25 products of a `small` step read
// fp32, bf16 and int8 weights at ~30-37 GB/s alike. One output feature is computed at a time,
// its weight row read in order (the rows follow each other in memory, one stream): computing 2,
// 4 or 8 features together, each vector of the input rows loaded once for all of them, was
// slower there for every dtype (fp32 1.34 against 1.82 ms with 2). Each product is one OpenMP
// parallel region (the runtime Inductor's own code uses): every thread prepares the rows itself,
// which is little work, rather than wait at a barrier while one thread does it, then takes a
// contiguous range of output features. The products are AOTInductor C shims: the compiled
// step's code calls them directly.

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

// Rows handled in one pass over the weights (more rows: more passes).
constexpr int kRowsPerPass = 8;
// int16 x int8 products of 16 columns summed in int32 stay exact for 256 vectors of them (each
// lane at most 256 x 2 x 127 x 32767 < 2^31): the sums are taken to int64 every 4,096 columns.
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

// A matrix of input rows as the C shim passes it: fp32 or bf16, any strides.
struct Rows {
  const void* data;
  bool bf16;
  int64_t count, width, row_stride, col_stride;

  float at(int64_t row, int64_t col) const {
    const int64_t i = row * row_stride + col * col_stride;
    return bf16 ? bf16_to_float(static_cast<const uint16_t*>(data)[i]) : static_cast<const float*>(data)[i];
  }
};

// The output (M, N), fp32 or bf16 as the input rows.
struct Output {
  void* data;
  bool bf16;
  int64_t width;

  void set(int64_t row, int64_t col, float value) const {
    const int64_t i = row * width + col;
    if (bf16) {
      static_cast<uint16_t*>(data)[i] = float_to_bf16(value);
    } else {
      static_cast<float*>(data)[i] = value;
    }
  }
};

// A buffer of this thread's, kept from call to call (no allocation per product).
template <typename T>
T* scratch(size_t size) {
  thread_local std::vector<T> buffer;
  if (buffer.size() < size) buffer.resize(size);
  return buffer.data();
}

// This thread's share of [0, n).
void thread_range(int64_t n, int64_t* begin, int64_t* end) {
  const int64_t threads = omp_get_num_threads(), me = omp_get_thread_num();
  const int64_t share = (n + threads - 1) / threads;
  *begin = std::min(n, me * share);
  *end = std::min(n, *begin + share);
}

// Runs pass<R>(first_row) for every pass of up to kRowsPerPass rows of M.
template <template <int> class Pass, typename... Args>
void passes(int64_t M, Args&&... args) {
  for (int64_t m = 0; m < M; m += kRowsPerPass) {
    switch (std::min<int64_t>(kRowsPerPass, M - m)) {
      case 1: Pass<1>::run(m, args...); break;
      case 2: Pass<2>::run(m, args...); break;
      case 3: Pass<3>::run(m, args...); break;
      case 4: Pass<4>::run(m, args...); break;
      case 5: Pass<5>::run(m, args...); break;
      case 6: Pass<6>::run(m, args...); break;
      case 7: Pass<7>::run(m, args...); break;
      default: Pass<8>::run(m, args...); break;
    }
  }
}

#ifdef KIMBHO_AVX2
int64_t sum_lanes(__m256i v) {  // eight int32, summed exactly
  const __m256i wide = _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(v)),
                                        _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1)));
  const __m128i half = _mm_add_epi64(_mm256_castsi256_si128(wide), _mm256_extracti128_si256(wide, 1));
  return _mm_cvtsi128_si64(half) + _mm_extract_epi64(half, 1);
}

float sum_lanes(__m256 v) {
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = _mm_add_ps(half, _mm_movehl_ps(half, half));
  half = _mm_add_ss(half, _mm_movehdup_ps(half));
  return _mm_cvtss_f32(half);
}
#endif

// ---- int8 weights ----------------------------------------------------------------------------

// The rows as int16 (M, padded), zeros past K, each with its scale: value ~= xq * scale.
void round_rows(const Rows& x, int64_t padded, int16_t* xq, float* scales) {
  for (int64_t m = 0; m < x.count; ++m) {
    float largest = 0.f;
    for (int64_t k = 0; k < x.width; ++k) largest = std::max(largest, std::fabs(x.at(m, k)));
    scales[m] = largest > 0.f ? largest / 32767.f : 1.f;
    const float inverse = 1.f / scales[m];
    int16_t* row = xq + m * padded;
    for (int64_t k = 0; k < x.width; ++k) {
      row[k] = static_cast<int16_t>(std::nearbyint(std::clamp(x.at(m, k) * inverse, -32767.f, 32767.f)));
    }
    std::fill(row + x.width, row + padded, int16_t{0});
  }
}

// Sums (exact) of R int16 rows times weight row `w` (K int8 values).
template <int R>
void int8_dot(const int16_t* xq, int64_t padded, const int8_t* w, int64_t K, int64_t sums[R]) {
  for (int r = 0; r < R; ++r) sums[r] = 0;
  int64_t col = 0;
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
struct Int8Pass {
  // Rows [m, m + R) times the weight rows [begin, end).
  static void run(int64_t m, const int16_t* xq, int64_t padded, const float* scales, const int8_t* weight,
                  int64_t K, int64_t begin, int64_t end, const Output& out) {
    int64_t sums[R];
    for (int64_t n = begin; n < end; ++n) {
      int8_dot<R>(xq + m * padded, padded, weight + n * K, K, sums);
      for (int r = 0; r < R; ++r) out.set(m + r, n, static_cast<float>(sums[r]) * scales[m + r]);
    }
  }
};

void int8_linear(const Rows& x, const int8_t* weight, int64_t N, const Output& out) {
  const int64_t K = x.width, padded = (K + 15) / 16 * 16;
#pragma omp parallel
  {
    int16_t* xq = scratch<int16_t>(x.count * padded);
    float* scales = scratch<float>(x.count);
    round_rows(x, padded, xq, scales);
    int64_t begin, end;
    thread_range(N, &begin, &end);
    passes<Int8Pass>(x.count, xq, padded, scales, weight, K, begin, end, out);
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

#ifdef KIMBHO_AVX2
constexpr bool kVectors = true;
#else
constexpr bool kVectors = false;
#endif

// The rows as fp32 (M, padded), each 16 columns in `Sixteen<W>::column` order, the tail in order.
template <typename W>
void order_rows(const Rows& x, int64_t padded, float* xs) {
  const int64_t vectors = kVectors ? x.width / 16 * 16 : 0;
  for (int64_t m = 0; m < x.count; ++m) {
    float* row = xs + m * padded;
    for (int64_t k = 0; k < vectors; k += 16) {
      for (int64_t j = 0; j < 16; ++j) row[k + j] = x.at(m, k + Sixteen<W>::column(j));
    }
    for (int64_t k = vectors; k < x.width; ++k) row[k] = x.at(m, k);
  }
}

// Sums of R fp32 rows times weight row `w` (K values of type W).
template <typename W, int R>
void float_dot(const float* xs, int64_t padded, const W* w, int64_t K, float sums[R]) {
  for (int r = 0; r < R; ++r) sums[r] = 0.f;
  int64_t col = 0;
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
    __m256 first, second;
    Sixteen<W>::load(w + col, &first, &second);
    for (int r = 0; r < R; ++r) {
      acc[r][0] = _mm256_fmadd_ps(first, _mm256_loadu_ps(xs + r * padded + col), acc[r][0]);
      acc[r][C - 1] = _mm256_fmadd_ps(second, _mm256_loadu_ps(xs + r * padded + col + 8), acc[r][C - 1]);
    }
  }
  for (int r = 0; r < R; ++r) sums[r] = sum_lanes(C == 2 ? _mm256_add_ps(acc[r][0], acc[r][C - 1]) : acc[r][0]);
#endif
  for (; col < K; ++col) {
    for (int r = 0; r < R; ++r) sums[r] += Sixteen<W>::value(w[col]) * xs[r * padded + col];
  }
}

template <typename W>
struct FloatPasses {
  template <int R>
  struct Pass {
    // Rows [m, m + R) times the weight rows [begin, end).
    static void run(int64_t m, const float* xs, int64_t padded, const W* weight, int64_t K, int64_t begin,
                    int64_t end, const Output& out) {
      float sums[R];
      for (int64_t n = begin; n < end; ++n) {
        float_dot<W, R>(xs + m * padded, padded, weight + n * K, K, sums);
        for (int r = 0; r < R; ++r) out.set(m + r, n, sums[r]);
      }
    }
  };
};

template <typename W>
void float_linear(const Rows& x, const W* weight, int64_t N, const Output& out) {
  const int64_t K = x.width, padded = (K + 15) / 16 * 16;
#pragma omp parallel
  {
    float* xs = scratch<float>(x.count * padded);
    order_rows<W>(x, padded, xs);
    int64_t begin, end;
    thread_range(N, &begin, &end);
    passes<FloatPasses<W>::template Pass>(x.count, xs, padded, weight, K, begin, end, out);
  }
}

// ---- the C shims -----------------------------------------------------------------------------

#define KIMBHO_CHECK(call)                                       \
  do {                                                           \
    if ((call) != AOTI_TORCH_SUCCESS) return AOTI_TORCH_FAILURE; \
  } while (0)

// x (M, K) @ weight (N, K).T into a new (M, N) tensor of x's dtype (fp32 or bf16), by the
// kernel of the weights' dtype: int8 (`int8`) or fp32 and bf16.
AOTITorchError product(AtenTensorHandle x, AtenTensorHandle weight, AtenTensorHandle* out, bool int8) {
  int64_t dim, *sizes, *strides, *w_sizes;
  int32_t dtype, w_dtype;
  void *data, *w, *out_data;
  KIMBHO_CHECK(aoti_torch_get_dim(x, &dim));
  KIMBHO_CHECK(aoti_torch_get_sizes(x, &sizes));
  KIMBHO_CHECK(aoti_torch_get_strides(x, &strides));
  KIMBHO_CHECK(aoti_torch_get_dtype(x, &dtype));
  KIMBHO_CHECK(aoti_torch_get_data_ptr(x, &data));
  KIMBHO_CHECK(aoti_torch_get_sizes(weight, &w_sizes));
  KIMBHO_CHECK(aoti_torch_get_dtype(weight, &w_dtype));
  KIMBHO_CHECK(aoti_torch_get_data_ptr(weight, &w));
  const bool bf16 = dtype == aoti_torch_dtype_bfloat16();
  if (dim != 2 || !(bf16 || dtype == aoti_torch_dtype_float32()) || w_sizes[1] != sizes[1] ||
      int8 != (w_dtype == aoti_torch_dtype_int8())) {
    return AOTI_TORCH_FAILURE;
  }
  const int64_t N = w_sizes[0], out_sizes[2] = {sizes[0], N}, out_strides[2] = {N, 1};
  KIMBHO_CHECK(aoti_torch_empty_strided(2, out_sizes, out_strides, dtype, aoti_torch_device_type_cpu(), 0, out));
  KIMBHO_CHECK(aoti_torch_get_data_ptr(*out, &out_data));
  const Rows rows{data, bf16, sizes[0], sizes[1], strides[0], strides[1]};
  const Output output{out_data, bf16, N};
  if (int8) {
    int8_linear(rows, static_cast<const int8_t*>(w), N, output);
  } else if (w_dtype == aoti_torch_dtype_bfloat16()) {
    float_linear(rows, static_cast<const uint16_t*>(w), N, output);
  } else if (w_dtype == aoti_torch_dtype_float32()) {
    float_linear(rows, static_cast<const float*>(w), N, output);
  } else {
    return AOTI_TORCH_FAILURE;
  }
  return AOTI_TORCH_SUCCESS;
}

}  // namespace

extern "C" {

// kimbho::int8_linear(x, weight): x (M, K) @ weight (N, K).T, weight in int8
AOTITorchError aoti_torch_cpu_int8_linear(AtenTensorHandle x, AtenTensorHandle weight, AtenTensorHandle* ret0) {
  return product(x, weight, ret0, true);
}

// kimbho::linear(x, weight): x (M, K) @ weight (N, K).T, weight in fp32 or bf16
AOTITorchError aoti_torch_cpu_linear(AtenTensorHandle x, AtenTensorHandle weight, AtenTensorHandle* ret0) {
  return product(x, weight, ret0, false);
}

}  // extern "C"

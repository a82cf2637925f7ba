"""C++ source of the CPU kernels (built, loaded and dispatched by kernels.py).

The source lives in a Python string (not a .cpp file) because Hugging Face remote code only copies
.py files that are imported relatively; kernels.py writes it into the torch extensions dir and
compiles it once per source/CPU/flags.

Ops (registered as torch.ops.chatglm_quant.*):
  linear(x[*, K] f32/bf16/f16, qweight int8 [N, K*bits/8], scale [N], bias [N]?, bits, integer) -> [*, N] in x's
      dtype; integer=1 quantizes x to int8 per block of activation_block() (128) values and uses integer dot
      products (AVX512-VNNI, or AVX2) where the build has them and K is a multiple of that block; integer=2 adds a
      second int8 pass of the first one's rounding error (kernels.ACTIVATION_PASSES); else (and with integer=0)
      weights are decoded to fp32 for fp32 FMAs
  bf16_linear(x [*, K], weight bf16 [N, K], bias [N]?) -> [*, N] in x's dtype, fp32 accumulation
  decode_attention(q [B, nh, L, hd], k, v [B, nh, T, hd] (views of a longer cache allowed), bias?, scale) -> bf16
      softmax(q k^T * scale + bias) v for a few query rows, in fp32, reading the cache in place
  paged_attention(q [N, nh, hd], key_cache, value_cache [blocks, nh, block_size, hd], block_tables [S, max_blocks],
      rows [N], visible [N]) -> [N, nh, hd]: each query attends to the first visible[i] keys of its sequence's
      blocks (block_tables[rows[i]]), read in place; fp32 or bf16
  dequantize(qweight int8 [N, K*bits/8], scale [N], bits) -> float32 [N, K]
  has_integer_path() -> whether this build has the integer path; has_bf16_dot() -> whether bf16 products use bf16
      dot-product instructions (else they widen to fp32); simd() -> the SIMD paths of this build
  peak_macs(kind "int8" | "bf16" | "fp32", iterations) -> multiply-accumulates per second on all threads in a tight
      loop of the build's instruction for that kind (the compute peak a GEMM is measured against)

The SIMD paths are chosen when compiling (-march=native, or the flags of CHATGLM_CPU_ISA in kernels.py):
AVX-512, AVX2 or plain scalar code, each with the same results up to the order of fp32 sums.

Weight format (ChatGLM-6B checkpoints): w[n, k] ~= q[n, k] * scale[n]; for int4, byte j of a row holds
q[2j] in its high nibble and q[2j+1] in its low nibble, both two's complement.
"""

CPP_SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <memory>
#include <vector>

// ---------------------------------------------------------------------------------------------
// A minimal vector layer: V fp32 lanes. -march=native picks AVX-512 or AVX2; else plain scalars.
// ---------------------------------------------------------------------------------------------
// The operations both vector widths spell alike, written once: W is the intrinsics' width (512 or 256).
#define CHATGLM_VECTOR_OPS(W)                                                                   \
  static inline vf vzero() { return _mm##W##_setzero_ps(); }                                    \
  static inline vf vload(const float* p) { return _mm##W##_loadu_ps(p); }                        \
  static inline void vstore(float* p, vf a) { _mm##W##_storeu_ps(p, a); }                        \
  static inline vf vset1(float a) { return _mm##W##_set1_ps(a); }                                \
  static inline vf vfma(vf a, vf b, vf c) { return _mm##W##_fmadd_ps(a, b, c); }                 \
  static inline vf vcvt(vi a) { return _mm##W##_cvtepi32_ps(a); }
#if defined(__AVX512F__)
constexpr int V = 16;
using vf = __m512;
using vi = __m512i;
CHATGLM_VECTOR_OPS(512)
static inline float vsum(vf a) { return _mm512_reduce_add_ps(a); }
static inline vi vbytes(const int8_t* p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)); }
// Nibble -> float in one vpermps: it only reads the low 4 bits of each index lane, so a 16-entry
// table of the two's complement values replaces shift/shift/convert (the int4 kernel is ALU bound).
static inline vf nib_table() { return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1); }
static inline vf nib_hi_f(vi b, vf t) { return _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), t); }
static inline vf nib_lo_f(vi b, vf t) { return _mm512_permutexvar_ps(b, t); }
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int V = 8;
using vf = __m256;
using vi = __m256i;
CHATGLM_VECTOR_OPS(256)
static inline float vsum(vf a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}
static inline vi vbytes(const int8_t* p) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)); }
static inline vf nib_table() { return vzero(); }  // unused: shifts + convert instead
static inline vf nib_hi_f(vi b, vf) { return vcvt(_mm256_srai_epi32(b, 4)); }
static inline vf nib_lo_f(vi b, vf) { return vcvt(_mm256_srai_epi32(_mm256_slli_epi32(b, 28), 28)); }
#else
constexpr int V = 1;
using vf = float;
using vi = int32_t;
static inline vf vzero() { return 0.f; }
static inline vf vload(const float* p) { return *p; }
static inline void vstore(float* p, vf a) { *p = a; }
static inline vf vset1(float a) { return a; }
static inline vf vfma(vf a, vf b, vf c) { return a * b + c; }
static inline float vsum(vf a) { return a; }
static inline vi vbytes(const int8_t* p) { return *p; }
static inline vf vcvt(vi a) { return (float)a; }
static inline vf nib_table() { return 0.f; }
static inline vf nib_hi_f(vi b, vf) { return (float)(b >> 4); }
static inline vf nib_lo_f(vi b, vf) { return (float)((int32_t)((uint32_t)b << 28) >> 28); }
#endif

// bf16 (the top half of an fp32) widened: one value, and V values
static inline float bf16_to_float(uint16_t h) {
  const uint32_t u = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
#if defined(__AVX512F__)
static inline vf vbf16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
#elif defined(__AVX2__) && defined(__FMA__)
static inline vf vbf16(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
#else
static inline vf vbf16(const uint16_t* p) { return bf16_to_float(*p); }
#endif
// Rows of fp32 or bf16 (as uint16_t) read alike
static inline vf vload_elem(const float* p) { return vload(p); }
static inline vf vload_elem(const uint16_t* p) { return vbf16(p); }
static inline float elem_to_float(float x) { return x; }
static inline float elem_to_float(uint16_t x) { return bf16_to_float(x); }

// Scalar nibble decode for tails (same arithmetic-shift semantics as the vector code).
static inline int hi4(int8_t b) { return b >> 4; }
static inline int lo4(int8_t b) { return (int8_t)((uint8_t)b << 4) >> 4; }

constexpr int R = 4;   // weight rows per tile: x is loaded once per R rows
constexpr int MB = 4;  // input rows per tile: a decoded weight vector feeds MB FMAs (16 accumulators)

// out[m, r] = scale[r] * sum_k x[m, k] * q[r, k] + bias[r]   for an (mb x rows) tile.
// x: fp32 rows with leading dim ldx (for int4: each full 2V block is de-interleaved: V even k, then V odd k)
// w: int8 rows with leading dim ldw bytes. Accumulation is fp32; weights are decoded in registers only.
// pf: start of the next tile's weight bytes (or nullptr). One cache line of it is prefetched per k step,
// which covers exactly the next R-row tile (R*ldw bytes = 64 * K / KB for V = 16): rows are only a few
// KB long, too short for the hardware stream prefetcher to ramp up, so DRAM latency would otherwise
// cap the int4 kernel at about half the memory bandwidth.
template <int BITS, int ROWS, int M>
static void tile(const float* x, int64_t ldx, const int8_t* w, int64_t ldw, int64_t K,
                 const float* scale, const float* bias, float* out, int64_t ldo, const int8_t* pf) {
  constexpr int KB = BITS == 8 ? V : 2 * V;  // k values consumed per step
  const int64_t Kv = K / KB * KB;
  const vf table = nib_table();
  vf acc[M][ROWS];
  for (int m = 0; m < M; m++)
    for (int r = 0; r < ROWS; r++) acc[m][r] = vzero();
  const int64_t pf_end = pf ? ROWS * ldw : 0;
  for (int64_t k = 0; k < Kv; k += KB) {
    if (k / KB * 64 < pf_end) __builtin_prefetch(pf + k / KB * 64, 0, 2);  // into L2 (prefetcht1)
    if constexpr (BITS == 8) {
      vf wv[ROWS];
      for (int r = 0; r < ROWS; r++) wv[r] = vcvt(vbytes(w + r * ldw + k));
      for (int m = 0; m < M; m++) {
        vf xv = vload(x + m * ldx + k);
        for (int r = 0; r < ROWS; r++) acc[m][r] = vfma(wv[r], xv, acc[m][r]);
      }
    } else {
      vf wh[ROWS], wl[ROWS];  // wh: q[k + 2i], wl: q[k + 2i + 1], i < V
      for (int r = 0; r < ROWS; r++) {
        vi b = vbytes(w + r * ldw + k / 2);
        wh[r] = nib_hi_f(b, table);
        wl[r] = nib_lo_f(b, table);
      }
      for (int m = 0; m < M; m++) {
        vf xe = vload(x + m * ldx + k), xo = vload(x + m * ldx + k + V);
        for (int r = 0; r < ROWS; r++) acc[m][r] = vfma(wl[r], xo, vfma(wh[r], xe, acc[m][r]));
      }
    }
  }
  for (int m = 0; m < M; m++) {
    for (int r = 0; r < ROWS; r++) {
      float s = vsum(acc[m][r]);
      const float* xm = x + m * ldx;
      const int8_t* wr = w + r * ldw;
      if constexpr (BITS == 8) {
        for (int64_t k = Kv; k < K; k++) s += xm[k] * wr[k];
      } else {  // tail is not de-interleaved
        for (int64_t k = Kv; k < K; k += 2) s += xm[k] * hi4(wr[k / 2]) + xm[k + 1] * lo4(wr[k / 2]);
      }
      out[m * ldo + r] = s * scale[r] + (bias ? bias[r] : 0.f);
    }
  }
}

// All M input rows against weight rows [n, n + ROWS): the weight tile (ROWS*K bytes) stays in L1/L2
// while the input rows are swept in blocks of MB.
template <int BITS, int ROWS>
static void rows_all_m(const float* x, int64_t M, int64_t K, const int8_t* w, int64_t ldw, int64_t n,
                       const float* scale, const float* bias, float* out, int64_t N, bool prefetch) {
  const int8_t* wn = w + n * ldw;
  const float* bn = bias ? bias + n : nullptr;
  for (int64_t m = 0; m < M; m += MB) {
    const float* xm = x + m * K;
    float* om = out + m * N + n;
    const int8_t* pf = prefetch && m == 0 ? wn + ROWS * ldw : nullptr;  // first sweep reads from DRAM
    switch (std::min<int64_t>(MB, M - m)) {
      case 4: tile<BITS, ROWS, 4>(xm, K, wn, ldw, K, scale + n, bn, om, N, pf); break;
      case 3: tile<BITS, ROWS, 3>(xm, K, wn, ldw, K, scale + n, bn, om, N, pf); break;
      case 2: tile<BITS, ROWS, 2>(xm, K, wn, ldw, K, scale + n, bn, om, N, pf); break;
      default: tile<BITS, ROWS, 1>(xm, K, wn, ldw, K, scale + n, bn, om, N, pf); break;
    }
  }
}

// The N output rows in tiles of R, over torch's threads: at::parallel_for runs on torch's OpenMP pool, so it
// honours torch.set_num_threads(); each thread gets one contiguous range of output rows and streams that part of
// the weight once. rows(n, std::integral_constant<int, ROWS>, prefetch) computes rows [n, n + ROWS) for every
// input row; prefetch: another full tile of this thread follows (the last tile's rows go one at a time).
template <typename Rows>
static void over_row_tiles(int64_t N, Rows rows) {
  const int64_t tiles = (N + R - 1) / R;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++) {
      const int64_t n = t * R;
      if (n + R <= N) rows(n, std::integral_constant<int, R>{}, n + 2 * R <= N && t + 1 < t1);
      else for (int64_t i = n; i < N; i++) rows(i, std::integral_constant<int, 1>{}, false);
    }
  });
}

template <int BITS>
static void gemv_like(const float* x, int64_t M, int64_t K, const int8_t* w, int64_t N,
                      const float* scale, const float* bias, float* out) {
  const int64_t ldw = K * BITS / 8;
  over_row_tiles(N, [&](int64_t n, auto rows, bool prefetch) {
    rows_all_m<BITS, decltype(rows)::value>(x, M, K, w, ldw, n, scale, bias, out, N, prefetch);
  });
}

// x [M, K] -> same shape with each full 2V-block of a row reordered as (V even k, V odd k),
// matching the (high nibble, low nibble) vectors the int4 tile decodes. Tails stay in place.
static at::Tensor deinterleave(const at::Tensor& x) {
  if (V == 1) return x;
  auto y = at::empty_like(x);
  const int64_t M = x.size(0), K = x.size(1), Kv = K / (2 * V) * (2 * V);
  const float* src = x.data_ptr<float>();
  float* dst = y.data_ptr<float>();
  for (int64_t m = 0; m < M; m++) {
    const float* s = src + m * K;
    float* d = dst + m * K;
    for (int64_t k = 0; k < Kv; k += 2 * V)
      for (int i = 0; i < V; i++) { d[k + i] = s[k + 2 * i]; d[k + V + i] = s[k + 2 * i + 1]; }
    for (int64_t k = Kv; k < K; k++) d[k] = s[k];
  }
  return y;
}

// ---------------------------------------------------------------------------------------------
// Integer path: activations quantized on the fly to int8 per block of QB = 128 values of a row (scale =
// absmax / 127), in one pass, or in two: the second holds the first's rounding error at 1/256 of its scale
// (about 15 bits a value, less error than bf16's 8), for twice the products. Then integer dot products.
//
// Tiling: the outer-product form of BLIS and oneDNN int8 GEMMs. An accumulator vector holds kLanes output
// rows, one per lane, and one instruction multiplies 4 weights of each of those rows by the same 4 activations
// (a broadcast dword). For each block of QB k, the weights of a tile of kTile rows are transposed from the
// checkpoint's row-major bytes in registers and decoded to unsigned bytes into a 4 KB buffer (L1), once for all
// input rows; then every input row sweeps it, kGroups products per broadcast. A block's products are exact int32
// sums that meet the float scales once per block, in block order: a row's result is the same in any batch and
// any tiling.
//   AVX512-VNNI: vpdpbusd (64 byte pairs). Weights unsigned: q + 8 for int4 (the nibble with its top bit
//     flipped), q + 128 for int8; dot(q + off, x) = dot(q, x) + off * sum(x) is taken back per block in int32.
//   AVX2: vpmaddubsw + vpmaddwd. int4 uses the same q + 8 offset (pair sums <= 15 * 127 * 2); int8 multiplies
//     |q| by x with q's sign moved onto x (no offset; pair sums <= 32512).
// Byte j of an int4 row holds q[2j] (high nibble) and q[2j + 1] (low), so each block of int4 activations is stored
// as its 64 even k, then its 64 odd k: the order in which the high and the low nibbles of a run of bytes come.
// Used whenever K is a multiple of QB, for every number of rows. The scalar build has no integer path.
// ---------------------------------------------------------------------------------------------
// Where the results go: [M, N] fp32, or bf16 for a bf16 input (rounded to nearest even, as torch converts). Both
// tilings end a row's sum the same way (explicitly fused, so that the compiler's contraction cannot differ).
struct Output {
  void* data;
  bool bf16;
  int64_t N;
  const float* scale;
  const float* bias;
  void put(int64_t m, int64_t n, float sum) const {
    const float y = std::fma(sum, scale[n], bias ? bias[n] : 0.f);
    if (bf16) static_cast<at::BFloat16*>(data)[m * N + n] = at::BFloat16(y);
    else static_cast<float*>(data)[m * N + n] = y;
  }
};

constexpr int64_t QB = 128;
constexpr int kSteps = QB / 4;  // 4-byte k steps per block
constexpr int kGroups = 2;      // accumulator vectors per input row and pass
// The integer operations both widths spell alike, written once (as CHATGLM_VECTOR_OPS); the dword/qword interleaves
// that transpose and sum4 start with work within 128-bit lanes, the same at both widths.
#define CHATGLM_INTEGER_OPS(W)                                                                      \
  static inline ivec iload(const void* p) { return _mm##W##_loadu_si##W((const ivec*)p); }         \
  static inline ivec izero() { return _mm##W##_setzero_si##W(); }                                   \
  static inline ivec iset1(int32_t a) { return _mm##W##_set1_epi32(a); }                            \
  static inline ivec iadd(ivec a, ivec b) { return _mm##W##_add_epi32(a, b); }                      \
  static inline ivec isub(ivec a, ivec b) { return _mm##W##_sub_epi32(a, b); }                      \
  static inline ivec ishl8(ivec a) { return _mm##W##_slli_epi32(a, 8); }                            \
  static inline ivec iunpacklo32(ivec a, ivec b) { return _mm##W##_unpacklo_epi32(a, b); }          \
  static inline ivec iunpackhi32(ivec a, ivec b) { return _mm##W##_unpackhi_epi32(a, b); }          \
  static inline ivec iunpacklo64(ivec a, ivec b) { return _mm##W##_unpacklo_epi64(a, b); }          \
  static inline ivec iunpackhi64(ivec a, ivec b) { return _mm##W##_unpackhi_epi64(a, b); }          \
  /* a broadcast dword of 4 activation bytes */                                                     \
  static inline ivec ibroadcast(const int8_t* p) {                                                  \
    int32_t v;                                                                                      \
    std::memcpy(&v, p, 4);                                                                          \
    return iset1(v);                                                                                \
  }

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define CHATGLM_INTEGER_ISA "AVX512-VNNI"
constexpr int kInt8Offset = 128;
constexpr int kLanes = 16;
// Input rows per sweep, by passes: their float sums and int32 products (kGroups vectors each) and the weights fit
// the 32 registers.
constexpr int kMaxRows[2] = {6, 4};
using ivec = __m512i;
CHATGLM_INTEGER_OPS(512)
// In inline assembly: with the intrinsic, GCC copies every accumulator to a fresh register (and spills some) on each
// step of the sweep, half the instructions of the loop.
template <int BITS>
static inline ivec idot(ivec acc, ivec w, ivec x) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(x));
  return acc;
}
// The transpose's last stage: u[q + c], 128-bit lane L, holds dword 4L + c of rows q..q+3 (transpose_quads);
// r[4L + c] gathers lane L of u[c], u[4 + c], u[8 + c], u[12 + c].
static inline void transpose_lanes(const ivec u[kLanes], ivec r[kLanes]) {
  for (int c = 0; c < 4; c++) {
    const ivec s0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44), s1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);
    const ivec s2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
    const ivec s3 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
    r[c] = _mm512_shuffle_i32x4(s0, s2, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(s0, s2, 0xDD);
    r[8 + c] = _mm512_shuffle_i32x4(s1, s3, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(s1, s3, 0xDD);
  }
}
// The 128-bit lanes of u added together
static inline __m128i sum_lanes(ivec u) {
  const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(u), _mm512_extracti64x4_epi64(u, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}
// 4 int4 bytes of each row -> their high nibbles (even k) and low nibbles (odd k) as q + 8
static inline void decode4(ivec v, ivec& even, ivec& odd) {
  const ivec low4 = _mm512_set1_epi8(0x0F);
  v = _mm512_xor_si512(v, _mm512_set1_epi8((char)0x88));
  even = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
  odd = _mm512_and_si512(v, low4);
}
static inline ivec decode8(ivec v) { return _mm512_xor_si512(v, _mm512_set1_epi8((char)0x80)); }
// Quantizing activations: |x| maxima, and rounding to the nearest integer (ties to even, as std::nearbyint)
static inline vf vabsmax(vf m, vf x) { return _mm512_max_ps(m, _mm512_abs_ps(x)); }
static inline float vmax_lanes(vf m) { return _mm512_reduce_max_ps(m); }
static inline vf vround(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vf vclamp127(vf a) { return _mm512_min_ps(_mm512_max_ps(a, vset1(-127.f)), vset1(127.f)); }
static inline void vstore_i32(int32_t* p, vf a) { _mm512_storeu_si512(p, _mm512_cvtps_epi32(a)); }
#elif defined(__AVX2__) && defined(__FMA__)
#define CHATGLM_INTEGER_ISA "AVX2"
constexpr int kInt8Offset = 0;
constexpr int kLanes = 8;
constexpr int kMaxRows[2] = {2, 1};  // the same in 16 registers
using ivec = __m256i;
CHATGLM_INTEGER_OPS(256)
template <int BITS>
static inline ivec idot(ivec acc, ivec w, ivec x) {
  const ivec ones = _mm256_set1_epi16(1);
  if constexpr (BITS == 4) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones));
  } else {
    const ivec pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, ones));
  }
}
static inline void transpose_lanes(const ivec u[kLanes], ivec r[kLanes]) {  // r[4L + c] = lane L of u[c], u[4 + c]
  for (int c = 0; c < 4; c++) {
    r[c] = _mm256_permute2x128_si256(u[c], u[4 + c], 0x20);
    r[4 + c] = _mm256_permute2x128_si256(u[c], u[4 + c], 0x31);
  }
}
static inline __m128i sum_lanes(ivec u) {
  return _mm_add_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
}
static inline void decode4(ivec v, ivec& even, ivec& odd) {
  const ivec low4 = _mm256_set1_epi8(0x0F);
  v = _mm256_xor_si256(v, _mm256_set1_epi8((char)0x88));
  even = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
  odd = _mm256_and_si256(v, low4);
}
static inline ivec decode8(ivec v) { return v; }  // signed: idot<8> takes |q| and moves the sign
static inline vf vabsmax(vf m, vf x) { return _mm256_max_ps(m, _mm256_andnot_ps(_mm256_set1_ps(-0.f), x)); }
static inline float vmax_lanes(vf m) {
  __m128 a = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  a = _mm_max_ps(a, _mm_movehl_ps(a, a));
  return _mm_cvtss_f32(_mm_max_ss(a, _mm_shuffle_ps(a, a, 1)));
}
static inline vf vround(vf a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vf vclamp127(vf a) { return _mm256_min_ps(_mm256_max_ps(a, vset1(-127.f)), vset1(127.f)); }
static inline void vstore_i32(int32_t* p, vf a) { _mm256_storeu_si256((__m256i*)p, _mm256_cvtps_epi32(a)); }
#endif

#ifdef CHATGLM_INTEGER_ISA
constexpr bool kIntegerPath = true;

// r[j] lane i <- r[i] lane j (kLanes x kLanes dwords): pairs, then quads within 128-bit lanes, then the lanes.
static inline void transpose(ivec r[kLanes]) {
  ivec t[kLanes], u[kLanes];
  for (int i = 0; i < kLanes; i += 2) {
    t[i] = iunpacklo32(r[i], r[i + 1]);
    t[i + 1] = iunpackhi32(r[i], r[i + 1]);
  }
  for (int q = 0; q < kLanes; q += 4) {  // u[q + c], 128-bit lane L: dword 4L + c of rows q..q+3
    u[q] = iunpacklo64(t[q], t[q + 2]);
    u[q + 1] = iunpackhi64(t[q], t[q + 2]);
    u[q + 2] = iunpacklo64(t[q + 1], t[q + 3]);
    u[q + 3] = iunpackhi64(t[q + 1], t[q + 3]);
  }
  transpose_lanes(u, r);
}

// The lane sums of d[0..3], as 4 int32: pairs, then quads within 128-bit lanes, then across the lanes.
static inline __m128i sum4(const ivec d[4]) {
  const ivec t0 = iadd(iunpacklo32(d[0], d[1]), iunpackhi32(d[0], d[1]));
  const ivec t1 = iadd(iunpacklo32(d[2], d[3]), iunpackhi32(d[2], d[3]));
  return sum_lanes(iadd(iunpacklo64(t0, t1), iunpackhi64(t0, t1)));
}
constexpr int kTile = kGroups * kLanes;  // weight rows per tile
static_assert(kLanes == V, "the float accumulators use the vector layer's width");

// Input rows (fp32, or bf16 read as they are) quantized for the integer path: q [passes][nb][M][QB] int8
// (block-major: one block of every row is contiguous, for the sweep of a block), each block in the kernel's k
// order. A block's products of pass p, S_p, are taken together as S = S_0 (one pass) or 256 S_0 + S_1 (two:
// |256 S_0| < 2^31 for int8 weights too), exact in int32; the float sum takes S - offset[m][nb] (the weight offset's
// share, the same combination of the blocks' sums of q) times scale[m][nb] (absmax / 127, over 256 with two
// passes), once per block.
struct Activations {
  int64_t M, nb;
  std::vector<int8_t> q;
  std::vector<float> scale;
  std::vector<int32_t> offset;

  template <typename X>
  Activations(const X* x, int64_t M_, int64_t K, int bits, int passes)
      : M(M_), nb(K / QB), q(passes * M_ * K), scale(M_ * nb), offset(M_ * nb) {
    const int off = bits == 4 ? 8 : kInt8Offset;
    at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
      alignas(64) int32_t rounded[2][QB];
      for (int64_t m = m0; m < m1; m++)
        for (int64_t b = 0; b < nb; b++) {
          const X* xb = x + m * K + b * QB;
          vf most = vzero();
          for (int64_t i = 0; i < QB; i += V) most = vabsmax(most, vload_elem(xb + i));
          const float amax = vmax_lanes(most), inv = amax > 0.f ? 127.f / amax : 0.f;
          for (int64_t i = 0; i < QB; i += V) {
            const vf v = vset1(inv) * vload_elem(xb + i), q0 = vround(v);
            vstore_i32(rounded[0] + i, q0);
            if (passes == 2) vstore_i32(rounded[1] + i, vclamp127(vround((v - q0) * vset1(256.f))));
          }
          int32_t sums = 0;
          for (int p = 0; p < passes; p++) {
            int8_t* qb = q.data() + ((p * nb + b) * M + m) * QB;
            int32_t sum = 0;
            for (int64_t i = 0; i < QB; i++) {
              qb[bits == 4 ? (i & 1) * (QB / 2) + i / 2 : i] = (int8_t)rounded[p][i];
              sum += rounded[p][i];
            }
            sums = sums * 256 + sum;
          }
          offset[m * nb + b] = off * sums;
          scale[m * nb + b] = amax / 127.f / (passes == 2 ? 256.f : 1.f);
        }
    });
  }
  // the 4 bytes of pass p, row m, block b at k step s
  const int8_t* at(int p, int64_t m, int64_t b, int s) const { return q.data() + ((p * nb + b) * M + m) * QB + 4 * s; }
  int32_t block_offset(int64_t m, int64_t b) const { return offset[m * nb + b]; }
  float block_scale(int64_t m, int64_t b) const { return scale[m * nb + b]; }
};


// The decoded weights of one block of a tile: wbuf[s * kGroups + g] = rows [g * kLanes, (g + 1) * kLanes), k step s.
// row[i]: the tile's row i at block 0; step[i]: its bytes per block (0 for the zero rows that pad the last tile).
template <int BITS>
static void pack_block(const int8_t* const row[kTile], const int64_t step[kTile], int64_t b, ivec* wbuf) {
  constexpr int kChunks = QB * BITS / 32 / kLanes;  // kLanes dwords of each row per transpose
  for (int g = 0; g < kGroups; g++)
    for (int c = 0; c < kChunks; c++) {
      ivec r[kLanes];
      for (int i = 0; i < kLanes; i++) r[i] = iload(row[g * kLanes + i] + b * step[g * kLanes + i] + c * kLanes * 4);
      transpose(r);
      for (int j = 0; j < kLanes; j++) {
        const int d = c * kLanes + j;  // dword of the block: k 8d..8d+7 (int4), 4d..4d+3 (int8)
        if constexpr (BITS == 4) decode4(r[j], wbuf[d * kGroups + g], wbuf[(kSteps / 2 + d) * kGroups + g]);
        else wbuf[d * kGroups + g] = decode8(r[j]);
      }
    }
}

// The next tile's weights brought into the L2 while this tile's products run: its bytes in address order (a tile's
// rows are one run of memory), `lines` cache lines with each block a sweep takes, so that they come in over all of
// the tile's sweeps. (Fetched in the pack instead, a tile's weights kept the pack waiting on DRAM while the sweeps
// left the memory idle: at 8 rows the pack took a third of the time.)
struct Prefetch {
  const int8_t* next;
  const int8_t* end;
  int64_t lines;
  void some() {
    for (int64_t i = 0; i < lines && next < end; i++, next += 64) __builtin_prefetch(next, 0, 2);
  }
};

// Output rows [n, n + kTile) of input rows m0..m0+ROWS, one block of decoded weights (as pack_block lays it out)
// at a time: each block's exact S (see Activations) meets the float scale once, in block order. ROWS == 1 splits
// each product over two chains (even and odd k steps): a lone row is bound by the instruction's latency, not its
// throughput. Integer sums are exact, so the split does not change the result.
template <int BITS, int PASSES, int ROWS>
struct Sweep {
  static constexpr int kChains = ROWS == 1 ? 2 : 1;
  const Activations& x;
  const int64_t m0;
  float* const carry;  // [ROWS][kTile]: the sums between two segments of the blocks
  vf acc[ROWS][kGroups];

  Sweep(const Activations& x_, int64_t m0_, float* carry_, bool first) : x(x_), m0(m0_), carry(carry_) {
    for (int m = 0; m < ROWS; m++)
      for (int g = 0; g < kGroups; g++) acc[m][g] = first ? vzero() : vload(carry + m * kTile + g * kLanes);
  }

  void save() const {
    for (int m = 0; m < ROWS; m++)
      for (int g = 0; g < kGroups; g++) vstore(carry + m * kTile + g * kLanes, acc[m][g]);
  }

  void block(const ivec* wb, int64_t b, Prefetch& prefetch) {
    prefetch.some();
    ivec dot[PASSES][ROWS][kGroups][kChains];
    for (auto& p : dot)
      for (auto& m : p)
        for (auto& g : m)
          for (auto& c : g) c = izero();
    for (int s0 = 0; s0 < kSteps; s0 += kChains)
      for (int c = 0; c < kChains; c++) {  // a constant index once unrolled: the chains stay in registers
        const int s = s0 + c;
        ivec w[kGroups];
        for (int g = 0; g < kGroups; g++) w[g] = wb[s * kGroups + g];
        for (int p = 0; p < PASSES; p++)
          for (int m = 0; m < ROWS; m++) {
            const ivec xv = ibroadcast(x.at(p, m0 + m, b, s));
            for (int g = 0; g < kGroups; g++) dot[p][m][g][c] = idot<BITS>(dot[p][m][g][c], w[g], xv);
          }
      }
    for (int m = 0; m < ROWS; m++) {
      const vf sb = vset1(x.block_scale(m0 + m, b));
      const ivec off = iset1(x.block_offset(m0 + m, b));
      for (int g = 0; g < kGroups; g++) {
        ivec sum[PASSES];
        for (int p = 0; p < PASSES; p++)
          sum[p] = kChains == 2 ? iadd(dot[p][m][g][0], dot[p][m][g][kChains - 1]) : dot[p][m][g][0];
        const ivec exact = PASSES == 2 ? iadd(ishl8(sum[0]), sum[PASSES - 1]) : sum[0];
        acc[m][g] = vfma(vcvt(isub(exact, off)), sb, acc[m][g]);
      }
    }
  }

  void finish(int64_t n, const Output& out) const {
    const int64_t rows = std::min<int64_t>(kTile, out.N - n);
    for (int m = 0; m < ROWS; m++) {
      alignas(64) float sums[kTile];
      for (int g = 0; g < kGroups; g++) vstore(sums + g * kLanes, acc[m][g]);
      for (int64_t i = 0; i < rows; i++) out.put(m0 + m, n + i, sums[i]);
    }
  }
};

// A few input rows (decoding) read the weights once and each weight is used by at most 4 rows: transposing them
// would cost more than it saves. Those rows take the checkpoint's row-major layout as it is: ROWS (<= R) weight rows
// at a time, each row's block decoded into vectors (k along the lanes) and multiplied with the activation block as
// stored; the lanes of the 4 rows' products are summed per block (exact int32), and the sums meet the scales as in
// Sweep, in the same order: a row gives the same result here as in a larger batch. prefetch: the next ROWS rows (or
// nullptr), a 1 / nb share with each block.
template <int BITS, int PASSES, int MROWS, int ROWS>
static void few_rows(const Activations& x, const int8_t* w, int64_t ldw, int64_t n, const Output& out,
                     const int8_t* prefetch) {
  static_assert(ROWS <= 4, "sum4 takes 4 rows");
  constexpr int kChunks = QB * BITS / 32 / kLanes;        // vectors of a row's block bytes
  constexpr int64_t kBlockBytes = QB * BITS / 8, kLines = ROWS * kBlockBytes / 64;
  __m128 acc[MROWS];
  for (auto& a : acc) a = _mm_setzero_ps();
  for (int64_t b = 0; b < x.nb; b++) {
    if (prefetch)
      for (int64_t j = 0; j < kLines; j++) __builtin_prefetch(prefetch + (b * kLines + j) * 64, 0, 2);
    ivec wv[ROWS][BITS == 4 ? 2 * kChunks : kChunks];  // int4: chunk c's even k at c, its odd k at kChunks + c
    for (int r = 0; r < ROWS; r++)
      for (int c = 0; c < kChunks; c++) {
        const ivec v = iload(w + r * ldw + b * kBlockBytes + c * kLanes * 4);
        if constexpr (BITS == 4) decode4(v, wv[r][c], wv[r][kChunks + c]);
        else wv[r][c] = decode8(v);
      }
    for (int m = 0; m < MROWS; m++) {
      ivec dot[4] = {izero(), izero(), izero(), izero()};
      for (int p = 0; p < PASSES; p++) {
        const int8_t* xb = x.at(p, m, b, 0);
        if (p) for (int r = 0; r < ROWS; r++) dot[r] = ishl8(dot[r]);  // 256 S_0 + S_1, lane by lane
        for (int c = 0; c < (BITS == 4 ? 2 * kChunks : kChunks); c++) {
          const ivec xv = iload(xb + c * kLanes * 4);
          for (int r = 0; r < ROWS; r++) dot[r] = idot<BITS>(dot[r], wv[r][c], xv);
        }
      }
      const __m128i exact = _mm_sub_epi32(sum4(dot), _mm_set1_epi32(x.block_offset(m, b)));
      acc[m] = _mm_fmadd_ps(_mm_cvtepi32_ps(exact), _mm_set1_ps(x.block_scale(m, b)), acc[m]);
    }
  }
  for (int m = 0; m < MROWS; m++) {
    alignas(16) float sums[4];
    _mm_store_ps(sums, acc[m]);
    for (int r = 0; r < ROWS; r++) out.put(m, n + r, sums[r]);
  }
}
constexpr int64_t kFewRows = 4;  // input rows up to which few_rows is used
constexpr int64_t kChunkBytes = 4 << 20;  // activation bytes of the input rows one sweep of the tiles takes

// Output rows [n, n + kTile) (fewer in the last tile) for input rows [m_begin, m_end): the tile's weights are decoded
// once into panel, kSegmentBlocks blocks at a time (kTile x 4096 bytes: it stays in the L2 with the next tile's
// prefetched weights), and each segment is swept by the input rows, kMaxRows at a time; carry holds their sums
// between segments. next: the following tile's first row, or nullptr, prefetched during the sweeps (Prefetch).
constexpr int64_t kSegmentBlocks = 32;
template <int BITS, int PASSES>
static void integer_tile(const Activations& x, int64_t m_begin, int64_t m_end, const int8_t* w, int64_t ldw, int64_t n,
                         const Output& out, ivec* panel, float* carry, const int8_t* next) {
  const int64_t N = out.N;
  static const int8_t zeros[QB] = {};
  constexpr int64_t kBlockBytes = QB * BITS / 8;
  const int8_t* row[kTile];
  int64_t step[kTile];
  for (int i = 0; i < kTile; i++) {
    row[i] = n + i < N ? w + (n + i) * ldw : zeros;
    step[i] = n + i < N ? kBlockBytes : 0;
  }
  constexpr int kMost = kMaxRows[PASSES - 1];
  // the sweeps below: of kMost rows, then one each of 4, 2 and 1 rows as the remainder's bits say
  const int64_t rows = m_end - m_begin, sweeps = rows / kMost + __builtin_popcountll(rows % kMost);
  const int64_t lines = next ? kTile * ldw / 64 : 0;
  Prefetch prefetch{next, next + lines * 64, (lines + sweeps * x.nb - 1) / (sweeps * x.nb)};
  for (int64_t b0 = 0; b0 < x.nb; b0 += kSegmentBlocks) {
    const int64_t b1 = std::min(x.nb, b0 + kSegmentBlocks);
    for (int64_t b = b0; b < b1; b++) pack_block<BITS>(row, step, b, panel + (b - b0) * kSteps * kGroups);
    auto sweep = [&](auto rows, int64_t m0) {
      Sweep<BITS, PASSES, decltype(rows)::value> rows_sweep(x, m0, carry + (m0 - m_begin) * kTile, b0 == 0);
      for (int64_t b = b0; b < b1; b++) rows_sweep.block(panel + (b - b0) * kSteps * kGroups, b, prefetch);
      if (b1 == x.nb) rows_sweep.finish(n, out);
      else rows_sweep.save();
    };
    int64_t m = m_begin;
    for (; m + kMost <= m_end; m += kMost) sweep(std::integral_constant<int, kMost>{}, m);
    if constexpr (kMost > 4) if (m + 4 <= m_end) { sweep(std::integral_constant<int, 4>{}, m); m += 4; }
    if constexpr (kMost > 2) if (m + 2 <= m_end) { sweep(std::integral_constant<int, 2>{}, m); m += 2; }
    if constexpr (kMost > 1) if (m + 1 <= m_end) { sweep(std::integral_constant<int, 1>{}, m); m += 1; }
  }
}

// x: [M, K] contiguous fp32 or bf16 rows; out: [M, N]
template <int BITS>
static void integer_linear(const at::Tensor& x, const int8_t* w, const Output& out, int passes) {
  const int64_t M = x.size(0), K = x.size(1), N = out.N, ldw = K * BITS / 8, tiles = (N + kTile - 1) / kTile;
  const Activations xa = x.scalar_type() == at::kBFloat16
      ? Activations(reinterpret_cast<const uint16_t*>(x.data_ptr()), M, K, BITS, passes)
      : Activations(x.data_ptr<float>(), M, K, BITS, passes);
  if (M <= kFewRows) {
    over_row_tiles(N, [&](int64_t n, auto rows, bool prefetch) {
      constexpr int kRows = decltype(rows)::value;
      const int8_t* next = prefetch ? w + (n + kRows) * ldw : nullptr;
      auto run = [&](auto pass_count) {
        constexpr int P = decltype(pass_count)::value;
        if (M == 1) few_rows<BITS, P, 1, kRows>(xa, w + n * ldw, ldw, n, out, next);
        else if (M == 2) few_rows<BITS, P, 2, kRows>(xa, w + n * ldw, ldw, n, out, next);
        else if (M == 3) few_rows<BITS, P, 3, kRows>(xa, w + n * ldw, ldw, n, out, next);
        else few_rows<BITS, P, 4, kRows>(xa, w + n * ldw, ldw, n, out, next);
      };
      if (passes == 2) run(std::integral_constant<int, 2>{});
      else run(std::integral_constant<int, 1>{});
    });
    return;
  }
  // Input rows in chunks whose activations stay in the L3 while every tile sweeps them (a tile's weights are read
  // and decoded again for each chunk: a few per cent of the products' time).
  const int64_t chunk = std::max<int64_t>(kMaxRows[passes - 1], kChunkBytes / (passes * K));
  for (int64_t m0 = 0; m0 < M; m0 += chunk) {
    const int64_t m1 = std::min(M, m0 + chunk);
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      std::unique_ptr<ivec[]> panel(new ivec[kSegmentBlocks * kSteps * kGroups]);  // not zeroed: written first
      std::vector<float> carry((m1 - m0) * kTile);
      for (int64_t t = t0; t < t1; t++) {
        const int8_t* next = t + 1 < t1 && (t + 2) * kTile <= N ? w + (t + 1) * kTile * ldw : nullptr;
        if (passes == 2)
          integer_tile<BITS, 2>(xa, m0, m1, w, ldw, t * kTile, out, panel.get(), carry.data(), next);
        else integer_tile<BITS, 1>(xa, m0, m1, w, ldw, t * kTile, out, panel.get(), carry.data(), next);
      }
    });
  }
}
#else
#define CHATGLM_INTEGER_ISA ""
constexpr bool kIntegerPath = false;
template <int BITS>
static void integer_linear(const at::Tensor&, const int8_t*, const Output&, int) {}
#endif

// ---------------------------------------------------------------------------------------------
// bf16 weights (the tied lm_head / word embedding, whole bf16 models): out[m, n] = sum_k x[m, k] w[n, k] + b[n]
// with fp32 accumulation, tiled as the quantized kernels are. x is rounded to bf16 (as torch's bf16 matmul
// takes it). With AVX512-BF16, vdpbf16ps multiplies 32 bf16 pairs per instruction; else each weight vector is
// widened to fp32 (a 16-bit shift) for fp32 FMAs. torch's bf16 matmul reads a few-row product's weight at
// about half the memory bandwidth here; this streams it once, prefetching the next tile.
// ---------------------------------------------------------------------------------------------

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define CHATGLM_BF16_ISA "AVX512-BF16"
constexpr int64_t BK = 32;  // k per step: one vdpbf16ps
template <int ROWS, int M>
static void bf16_tile(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t K, const float* bias, float* out,
                      int64_t ldo, const uint16_t* pf) {
  const int64_t Kv = K / BK * BK;
  __m512 acc[M][ROWS];
  for (int m = 0; m < M; m++)
    for (int r = 0; r < ROWS; r++) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < Kv; k += BK) {
    if (pf)  // the next tile: ROWS rows of 2K bytes, ROWS cache lines per step
      for (int j = 0; j < ROWS; j++) __builtin_prefetch(pf + k * ROWS + j * 32, 0, 2);
    __m512bh wv[ROWS];
    for (int r = 0; r < ROWS; r++) wv[r] = (__m512bh)_mm512_loadu_si512(w + r * K + k);
    for (int m = 0; m < M; m++) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * ldx + k);
      for (int r = 0; r < ROWS; r++) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], wv[r], xv);
    }
  }
  for (int m = 0; m < M; m++)
    for (int r = 0; r < ROWS; r++) {
      float s = _mm512_reduce_add_ps(acc[m][r]);
      for (int64_t k = Kv; k < K; k++) s += bf16_to_float(x[m * ldx + k]) * bf16_to_float(w[r * K + k]);
      out[m * ldo + r] = s + (bias ? bias[r] : 0.f);
    }
}
#else
#define CHATGLM_BF16_ISA "fp32 FMA"
constexpr int64_t BK = V;
// x: fp32 rows (the bf16 input widened once)
template <int ROWS, int M>
static void bf16_tile(const float* x, int64_t ldx, const uint16_t* w, int64_t K, const float* bias, float* out,
                      int64_t ldo, const uint16_t* pf) {
  const int64_t Kv = K / BK * BK;
  constexpr int kLines = ROWS * BK * 2 / 64;  // cache lines of the next tile per step (0 for scalars)
  vf acc[M][ROWS];
  for (int m = 0; m < M; m++)
    for (int r = 0; r < ROWS; r++) acc[m][r] = vzero();
  for (int64_t k = 0; k < Kv; k += BK) {
    if (pf)
      for (int j = 0; j < kLines; j++) __builtin_prefetch(pf + k * ROWS + j * 32, 0, 2);
    vf wv[ROWS];
    for (int r = 0; r < ROWS; r++) wv[r] = vbf16(w + r * K + k);
    for (int m = 0; m < M; m++) {
      const vf xv = vload(x + m * ldx + k);
      for (int r = 0; r < ROWS; r++) acc[m][r] = vfma(wv[r], xv, acc[m][r]);
    }
  }
  for (int m = 0; m < M; m++)
    for (int r = 0; r < ROWS; r++) {
      float s = vsum(acc[m][r]);
      for (int64_t k = Kv; k < K; k++) s += x[m * ldx + k] * bf16_to_float(w[r * K + k]);
      out[m * ldo + r] = s + (bias ? bias[r] : 0.f);
    }
}
#endif

template <typename X, int ROWS>
static void bf16_rows(const X* x, int64_t M, int64_t K, const uint16_t* w, int64_t n, const float* bias, float* out,
                      int64_t N, bool prefetch) {
  const uint16_t* wn = w + n * K;
  const float* bn = bias ? bias + n : nullptr;
  for (int64_t m = 0; m < M; m += MB) {
    const uint16_t* pf = prefetch && m == 0 ? wn + ROWS * K : nullptr;
    switch (std::min<int64_t>(MB, M - m)) {
      case 4: bf16_tile<ROWS, 4>(x + m * K, K, wn, K, bn, out + m * N + n, N, pf); break;
      case 3: bf16_tile<ROWS, 3>(x + m * K, K, wn, K, bn, out + m * N + n, N, pf); break;
      case 2: bf16_tile<ROWS, 2>(x + m * K, K, wn, K, bn, out + m * N + n, N, pf); break;
      default: bf16_tile<ROWS, 1>(x + m * K, K, wn, K, bn, out + m * N + n, N, pf); break;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The two halves of one query's attention over a cache, shared by decode_attention (generate()) and
// paged_attention (the serving engine), so that both score and weight in the same arithmetic.
// ---------------------------------------------------------------------------------------------

// q . k for one key row: bf16 pairs with vdpbf16ps (exact products, fp32 sums) where the build has it and q is bf16,
// else fp32 FMAs. Two chains of sums: one would wait on each instruction's latency.
template <typename E>
static inline float key_dot(const E* k, const float* qf, const uint16_t* qb, int64_t D) {
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  if constexpr (std::is_same<E, uint16_t>::value) {
    if (qb && D % 64 == 0) {
      __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 64) {
        s0 = _mm512_dpbf16_ps(s0, (__m512bh)_mm512_loadu_si512(k + d), (__m512bh)_mm512_loadu_si512(qb + d));
        s1 = _mm512_dpbf16_ps(s1, (__m512bh)_mm512_loadu_si512(k + d + 32), (__m512bh)_mm512_loadu_si512(qb + d + 32));
      }
      return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
    }
  }
#endif
  const int64_t Dv = D / (2 * V) * (2 * V);
  vf s0 = vzero(), s1 = vzero();
  for (int64_t d = 0; d < Dv; d += 2 * V) {
    s0 = vfma(vload_elem(k + d), vload(qf + d), s0);
    s1 = vfma(vload_elem(k + d + V), vload(qf + d + V), s1);
  }
  float st = vsum(s0) + vsum(s1);
  for (int64_t d = Dv; d < D; d++) st += elem_to_float(k[d]) * qf[d];
  return st;
}

// sums[d0 .. d0 + NV * V) += sum_t p[t] v[t, d0 ..] over `count` value rows, the sums in registers meanwhile
template <int NV, typename E, typename RowOf>
static inline void add_weighted_values(RowOf value_row, const float* p, int64_t count, int64_t d0, float* sums) {
  vf acc[NV];
  for (int c = 0; c < NV; c++) acc[c] = vload(sums + d0 + c * V);
  for (int64_t t = 0; t < count; t++) {
    const E* vt = value_row(t) + d0;
    const vf w = vset1(p[t]);
    for (int c = 0; c < NV; c++) acc[c] = vfma(vload_elem(vt + c * V), w, acc[c]);
  }
  for (int c = 0; c < NV; c++) vstore(sums + d0 + c * V, acc[c]);
}

// p[0 .. count) = exp(p - top) in place, top their maximum; returns 1 / their sum, or 0 where no key is seen or
// every one is blocked (top -inf): such a query gives zeros
static inline float softmax_weights(float* p, int64_t count, float top) {
  float total = 0.f;
  for (int64_t t = 0; t < count; t++) {
    p[t] = top == -INFINITY ? 0.f : std::exp(p[t] - top);
    total += p[t];
  }
  return total > 0.f ? 1.f / total : 0.f;
}

constexpr int kValueVectors = 8;  // value sums held in registers at a time (head_dim 128 at AVX-512's width)

// sums[0 .. D) += sum_t p[t] v[t] over `count` value rows (value_row(t)), kValueVectors vectors of d at a time. Rows
// added in several calls give the same sums as in one: each sum takes its rows in order, one multiply-add each.
template <typename E, typename RowOf>
static inline void add_weighted_rows(RowOf value_row, const float* p, int64_t count, int64_t D, float* sums) {
  const int64_t Dv = D / V * V;
  int64_t d0 = 0;
  for (; d0 + kValueVectors * V <= Dv; d0 += kValueVectors * V)
    add_weighted_values<kValueVectors, E>(value_row, p, count, d0, sums);
  for (; d0 < Dv; d0 += V) add_weighted_values<1, E>(value_row, p, count, d0, sums);
  for (int64_t d = Dv; d < D; d++) {
    float sum = sums[d];
    for (int64_t t = 0; t < count; t++) sum += p[t] * elem_to_float(value_row(t)[d]);
    sums[d] = sum;
  }
}

// ---------------------------------------------------------------------------------------------
// Attention of a few query rows (decoding) over a bf16 KV cache, read in place: keys and values may be views of
// a longer buffer (only their last dimension must be contiguous). torch's CPU matmul copies such views first,
// and its SDPA costs 0.5 ms per single-query call in bf16. Per (batch, head): scores (key_dot), softmax, then the
// values weighted (add_weighted_rows), as paged_attention takes them; the output is rounded to bf16 once.
// q [B, nh, L, hd] bf16; k, v [B, nh, T, hd] bf16; bias [B, nh, L, T] fp32 additive (broadcast strides allowed)
// ---------------------------------------------------------------------------------------------
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& bias, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "bf16 query, keys and values expected");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "[batch, heads, length, head_dim] expected");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "keys and values must be contiguous in their last dimension");
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), T = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == D && v.sizes() == k.sizes(), "shapes differ");
  auto qf = q.to(at::kFloat).contiguous();                             // [B, H, L, D] fp32
  at::Tensor bf;
  if (bias.has_value() && bias->defined()) bf = bias->to(at::kFloat).expand({B, H, L, T});
  auto out = at::empty({B, H, L, D}, q.options().dtype(at::kFloat));  // [B, H, L, D] fp32
  const uint16_t* kp = reinterpret_cast<const uint16_t*>(k.data_ptr());
  const uint16_t* vp = reinterpret_cast<const uint16_t*>(v.data_ptr());
  const auto qb = q.contiguous();  // [B, H, L, D] bf16 (vdpbf16ps's operand; qf the others')
  const uint16_t* qbp = reinterpret_cast<const uint16_t*>(qb.data_ptr());
  const float* qp = qf.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float* bp = bf.defined() ? bf.data_ptr<float>() : nullptr;
  const int64_t kt_stride = k.stride(2), vt_stride = v.stride(2);
  const int64_t bt_stride = bp ? bf.stride(3) : 0;
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> p(T);
    for (int64_t i = i0; i < i1; i++) {
      const int64_t b = i / H, h = i % H;
      const uint16_t* kb = kp + b * k.stride(0) + h * k.stride(1);
      const uint16_t* vb = vp + b * v.stride(0) + h * v.stride(1);
      auto value_row = [&](int64_t t) { return vb + t * vt_stride; };
      for (int64_t l = 0; l < L; l++) {
        const float* ql = qp + ((b * H + h) * L + l) * D;
        const float* bl = bp ? bp + b * bf.stride(0) + h * bf.stride(1) + l * bf.stride(2) : nullptr;
        const uint16_t* qbl = qbp + ((b * H + h) * L + l) * D;
        float top = -INFINITY;
        for (int64_t t = 0; t < T; t++) {
          const float st = key_dot(kb + t * kt_stride, ql, qbl, D) * (float)scale + (bl ? bl[t * bt_stride] : 0.f);
          p[t] = st;
          top = std::max(top, st);
        }
        const float inv = softmax_weights(p.data(), T, top);
        float* ol = op + ((b * H + h) * L + l) * D;
        std::fill(ol, ol + D, 0.f);
        add_weighted_rows<uint16_t>(value_row, p.data(), T, D, ol);
        for (int64_t d = 0; d < D; d++) ol[d] *= inv;
      }
    }
  });
  return out.to(at::kBFloat16);
}

// ---------------------------------------------------------------------------------------------
// Attention over a paged KV cache (the serving engine's), read in place. Every query sees a prefix of its
// sequence's keys: keys [0, visible) (GLM: a prompt token sees the whole context and the tokens up to itself, a
// generated token everything before it). Keys live in blocks of BS tokens; block_tables[row] lists a sequence's
// blocks in order. A work item is up to QT consecutive queries of one sequence (a prefill chunk's queries share
// every key read) and a group of heads: a block holds those heads' rows as one run ([heads, BS, D]: 128 KB for all
// 32 heads at bf16, head_dim 128), which the item reads block by block, the block kPrefetchBlocks on fetched
// meanwhile. The groups are as large as the threads allow (head_group). Taken head by head, a block is a 4 KB run a
// page apart from the next, and decoding at 1000 cached tokens read the cache at about 18 GB/s. Scores (bf16
// pairs by vdpbf16ps where the build has it: exact products), softmax and the weighted values are fp32, each value
// sum taking its rows in order (add_weighted_rows, block by block); the output is rounded to the cache's dtype once.
// q [N, H, D]; key_cache, value_cache [num_blocks, H, BS, D] (q's dtype: fp32 or bf16); block_tables [S, max_blocks]
// int32; rows, visible [N] int32 -> [N, H, D]
// ---------------------------------------------------------------------------------------------

constexpr int QT = 8;  // queries of one sequence sharing each key read
constexpr int64_t kPrefetchBlocks = 2;  // how far ahead an item's block runs are fetched

// Heads per work item for G query groups: all H, halved while the items would leave threads idle (fewer items than
// threads, or a few that do not divide evenly among them)
static int64_t head_group(int64_t G, int64_t H) {
  const int64_t threads = at::get_num_threads();
  int64_t heads = H;
  while (heads % 2 == 0 && heads > 1) {
    const int64_t items = G * (H / heads);
    if (items >= threads && (items % threads == 0 || items >= 4 * threads)) break;
    heads /= 2;
  }
  return heads;
}

// A run of cache bytes brought towards the cache
static inline void prefetch_bytes(const void* start, int64_t bytes) {
  const char* p = static_cast<const char*>(start);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 0, 1);
}

template <typename E>
static void paged_attention_impl(const float* q, const uint16_t* q_bf16, const E* kc, const E* vc,
                                 const int32_t* tables, int64_t max_blocks, const int32_t* rows, const int32_t* visible,
                                 int64_t N, int64_t H, int64_t BS, int64_t D, float scale, float* out) {
  std::vector<int64_t> starts;  // groups of up to QT consecutive queries of one sequence
  for (int64_t i = 0; i < N; i++)
    if (starts.empty() || rows[i] != rows[starts.back()] || i - starts.back() == QT) starts.push_back(i);
  const int64_t G = starts.size(), nh = head_group(G, H), head_groups = H / nh;  // nh heads per work item
  starts.push_back(N);
  at::parallel_for(0, G * head_groups, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> p, sums, top, inv;
    for (int64_t i = i0; i < i1; i++) {
      const int64_t g = i / head_groups, h0 = i % head_groups * nh;
      const int64_t first = starts[g], n = starts[g + 1] - first;
      const int32_t* table = tables + rows[first] * max_blocks;
      int64_t T = 0;
      for (int64_t j = 0; j < n; j++) T = std::max<int64_t>(T, visible[first + j]);
      const int64_t blocks = (T + BS - 1) / BS, run = nh * BS * D;  // a block's rows of these heads: [nh, BS, D]
      auto block_run = [&](const E* cache, int64_t b) { return cache + ((int64_t)table[b] * H + h0) * BS * D; };
      auto fetch_ahead = [&](const E* cache, int64_t b, int64_t hh) {  // head hh's rows of block b + kPrefetchBlocks
        if (b + kPrefetchBlocks < blocks) prefetch_bytes(block_run(cache, b + kPrefetchBlocks) + hh * BS * D, BS * D * sizeof(E));
      };
      for (int64_t b = 0; b < std::min(blocks, kPrefetchBlocks); b++) prefetch_bytes(block_run(kc, b), run * sizeof(E));
      // scores p[(j, hh), t] and their maxima
      p.assign(n * nh * T, 0.f);
      top.assign(n * nh, -INFINITY);
      for (int64_t b = 0; b < blocks; b++) {
        const E* keys = block_run(kc, b);
        const int64_t t0 = b * BS, count = std::min(BS, T - t0);
        for (int64_t hh = 0; hh < nh; hh++) {
          fetch_ahead(kc, b, hh);
          for (int64_t r = 0; r < count; r++) {
            const E* kt = keys + (hh * BS + r) * D;
            for (int64_t j = 0; j < n; j++) {
              if (t0 + r >= visible[first + j]) continue;
              const int64_t qi = ((first + j) * H + h0 + hh) * D, s = j * nh + hh;
              const float st = key_dot(kt, q + qi, q_bf16 ? q_bf16 + qi : nullptr, D) * scale;
              p[s * T + t0 + r] = st;
              top[s] = std::max(top[s], st);
            }
          }
        }
      }
      for (int64_t b = 0; b < std::min(blocks, kPrefetchBlocks); b++) prefetch_bytes(block_run(vc, b), run * sizeof(E));
      inv.assign(n * nh, 0.f);
      for (int64_t j = 0; j < n; j++)
        for (int64_t hh = 0; hh < nh; hh++) {
          const int64_t s = j * nh + hh;
          inv[s] = softmax_weights(p.data() + s * T, visible[first + j], top[s]);
        }
      // the weighted values, block by block
      sums.assign(n * nh * D, 0.f);
      for (int64_t b = 0; b < blocks; b++) {
        const E* values = block_run(vc, b);
        const int64_t t0 = b * BS;
        for (int64_t hh = 0; hh < nh; hh++) {
          fetch_ahead(vc, b, hh);
          auto value_row = [&](int64_t r) { return values + (hh * BS + r) * D; };
          for (int64_t j = 0; j < n; j++) {
            const int64_t s = j * nh + hh, count = std::min(BS, (int64_t)visible[first + j] - t0);
            if (count > 0) add_weighted_rows<E>(value_row, p.data() + s * T + t0, count, D, sums.data() + s * D);
          }
        }
      }
      for (int64_t j = 0; j < n; j++)
        for (int64_t hh = 0; hh < nh; hh++) {
          const int64_t s = j * nh + hh;
          float* o = out + ((first + j) * H + h0 + hh) * D;
          for (int64_t d = 0; d < D; d++) o[d] = sums[s * D + d] * inv[s];
        }
    }
  });
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                           const at::Tensor& block_tables, const at::Tensor& rows, const at::Tensor& visible,
                           double scale) {
  TORCH_CHECK(q.dim() == 3 && key_cache.dim() == 4 && value_cache.sizes() == key_cache.sizes(),
              "q [N, heads, head_dim] and caches [blocks, heads, block_size, head_dim] expected");
  TORCH_CHECK(key_cache.scalar_type() == q.scalar_type() && value_cache.scalar_type() == q.scalar_type() &&
              (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16), "fp32 or bf16 q and caches");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), "contiguous caches expected");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && rows.scalar_type() == at::kInt &&
              visible.scalar_type() == at::kInt, "int32 block tables, rows and visible counts expected");
  const int64_t N = q.size(0), H = q.size(1), D = q.size(2), BS = key_cache.size(2);
  TORCH_CHECK(key_cache.size(1) == H && key_cache.size(3) == D, "the caches' heads and head_dim differ from q's");
  TORCH_CHECK(rows.numel() == N && visible.numel() == N, "one row and one visible count per query");
  auto tables = block_tables.contiguous();
  auto r = rows.contiguous(), vis = visible.contiguous();
  const int64_t max_blocks = tables.size(1);
  const int32_t* rp = r.data_ptr<int32_t>();
  const int32_t* vp = vis.data_ptr<int32_t>();
  for (int64_t i = 0; i < N; i++)
    TORCH_CHECK(rp[i] >= 0 && rp[i] < tables.size(0) && vp[i] >= 0 && vp[i] <= max_blocks * BS,
                "query ", i, ": row or visible count out of range");
  const int32_t* tp = tables.data_ptr<int32_t>();
  for (int64_t i = 0; i < tables.numel(); i++)
    TORCH_CHECK(tp[i] >= 0 && tp[i] < key_cache.size(0), "block table entry ", tp[i], " out of range");
  auto qf = q.to(at::kFloat).contiguous();
  auto out = at::empty({N, H, D}, qf.options());
  if (N > 0) {
    if (q.scalar_type() == at::kFloat)
      paged_attention_impl<float>(qf.data_ptr<float>(), nullptr, key_cache.data_ptr<float>(),
                                  value_cache.data_ptr<float>(), tables.data_ptr<int32_t>(), max_blocks, rp, vp, N, H,
                                  BS, D, (float)scale, out.data_ptr<float>());
    else {
      auto qb = q.contiguous();
      paged_attention_impl<uint16_t>(qf.data_ptr<float>(), reinterpret_cast<const uint16_t*>(qb.data_ptr()),
                                     reinterpret_cast<const uint16_t*>(key_cache.data_ptr()),
                                     reinterpret_cast<const uint16_t*>(value_cache.data_ptr()),
                                     tables.data_ptr<int32_t>(), max_blocks, rp, vp, N, H, BS, D, (float)scale,
                                     out.data_ptr<float>());
    }
  }
  return out.to(q.scalar_type());
}

// bf16_linear(x [*, K] float, weight bf16 [N, K], bias [N]?) -> [*, N] in x's dtype
at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.dim() == 2, "weight must be 2-D bf16");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "CPU tensors expected");
  auto w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(x.size(-1) == K, "x has ", x.size(-1), " features, weight expects ", K);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "bias must have one entry per output row");
    b = bias->to(at::kFloat).contiguous();
  }
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  auto x2 = x.reshape({-1, K}).to(at::kBFloat16).contiguous();  // [M, K] bf16
  using X = uint16_t;
#else
  auto x2 = x.reshape({-1, K}).to(at::kBFloat16).to(at::kFloat).contiguous();  // [M, K] bf16 values in fp32
  using X = float;
#endif
  const int64_t M = x2.size(0);
  auto out = at::empty({M, N}, x2.options().dtype(at::kFloat));  // [M, N] fp32
  const X* xp = reinterpret_cast<const X*>(x2.data_ptr());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  if (M > 0 && N > 0) {
    over_row_tiles(N, [&](int64_t n, auto rows, bool prefetch) {
      bf16_rows<X, decltype(rows)::value>(xp, M, K, wp, n, bp, op, N, prefetch);
    });
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return out.view(shape).to(x.scalar_type());
}

// ---------------------------------------------------------------------------------------------
// The machine's compute peak for this build's instructions: kPeakChains independent accumulators (enough to hide
// each instruction's latency) updated in a tight loop on every thread. A GEMM's speed is reported as a fraction
// of it (benchmarks/bench_matmul.py). Each body returns its sums, so that the loop cannot be dropped.
// ---------------------------------------------------------------------------------------------
constexpr int kPeakChains = 8;

static float fp32_peak_loop(int64_t iterations, float seed) {
  vf acc[kPeakChains];
  for (auto& a : acc) a = vzero();
  const vf a = vset1(seed), b = vset1(1.0f - seed);
  for (int64_t i = 0; i < iterations; i++)
    for (int c = 0; c < kPeakChains; c++) acc[c] = vfma(a, b, acc[c]);
  float sum = 0.f;
  for (auto& c : acc) sum += vsum(c);
  return sum;
}

#if (defined(__AVX512VNNI__) && defined(__AVX512BW__)) || (defined(__AVX2__) && defined(__FMA__))  // an integer path
constexpr int64_t kInt8PeakMacs = kLanes * 4;  // one idot: 4 byte pairs a lane (vpdpbusd; AVX2's maddubs chain)
static float int8_peak_loop(int64_t iterations, float seed) {
  ivec acc[kPeakChains];
  for (auto& a : acc) a = izero();
  const ivec a = iset1((int8_t)(seed * 3) * 0x01010101), b = iset1((int8_t)(seed * 5) * 0x01010101);
  for (int64_t i = 0; i < iterations; i++)
    for (int c = 0; c < kPeakChains; c++) acc[c] = idot<4>(acc[c], a, b);
  alignas(64) int32_t lanes[kLanes];
  int64_t sum = 0;
  for (auto& c : acc) {
    std::memcpy(lanes, &c, sizeof lanes);
    for (int32_t lane : lanes) sum += lane;
  }
  return (float)sum;
}
#else
constexpr int64_t kInt8PeakMacs = 0;  // no integer path
static float int8_peak_loop(int64_t, float) { return 0.f; }
#endif

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
constexpr int64_t kBf16PeakMacs = 32;  // vdpbf16ps zmm: 16 lanes x 2 pairs
static float bf16_peak_loop(int64_t iterations, float seed) {
  __m512 acc[kPeakChains];
  for (auto& a : acc) a = _mm512_setzero_ps();
  const __m512bh a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(seed), _mm512_set1_ps(seed));
  const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1.0f - seed), _mm512_set1_ps(1.0f - seed));
  for (int64_t i = 0; i < iterations; i++)
    for (int c = 0; c < kPeakChains; c++) acc[c] = _mm512_dpbf16_ps(acc[c], a, b);
  float sum = 0.f;
  for (auto& c : acc) sum += _mm512_reduce_add_ps(c);
  return sum;
}
#else
constexpr int64_t kBf16PeakMacs = V;  // bf16 widened to fp32: the fp32 FMA's rate
static float bf16_peak_loop(int64_t iterations, float seed) { return fp32_peak_loop(iterations, seed); }
#endif

// Multiply-accumulates per second on all of torch's threads for kind "int8" (the integer path's instruction; 0
// on a build without one), "bf16" (vdpbf16ps, or fp32 FMAs where bf16 is widened) or "fp32" (FMA).
double peak_macs(std::string kind, int64_t iterations) {
  TORCH_CHECK(kind == "int8" || kind == "bf16" || kind == "fp32", "kind must be int8, bf16 or fp32");
  TORCH_CHECK(iterations > 0, "iterations must be positive");
  const auto loop = kind == "int8" ? int8_peak_loop : kind == "bf16" ? bf16_peak_loop : fp32_peak_loop;
  const int64_t macs = kind == "int8" ? kInt8PeakMacs : kind == "bf16" ? kBf16PeakMacs : V;
  if (macs == 0) return 0.0;
  const int64_t threads = at::get_num_threads();
  std::vector<float> sums(threads, 0.f);
  const auto start = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++) sums[t] = loop(iterations, 0.5f + 0.01f * (float)t);
  });
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  volatile float sink = 0.f;
  for (float sum : sums) sink = sink + sum;
  return (double)threads * iterations * kPeakChains * macs / seconds;
}

// The SIMD paths of this build, e.g. "AVX-512, int8 activations with AVX512-VNNI, bf16 weights with AVX512-BF16".
std::string simd() {
  const std::string base = V == 16 ? "AVX-512" : V == 8 ? "AVX2" : "scalar";
  const std::string integer = kIntegerPath ? std::string(", int8 activations with ") + CHATGLM_INTEGER_ISA
                                           : std::string(", fp32 activations (no integer path)");
  return base + integer + ", bf16 weights with " + CHATGLM_BF16_ISA;
}

bool has_integer_path() { return kIntegerPath; }
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
bool has_bf16_dot() { return true; }
#else
bool has_bf16_dot() { return false; }
#endif
int64_t activation_block() { return QB; }

at::Tensor dequantize(const at::Tensor& qweight, const at::Tensor& scale, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 2, "qweight must be 2-D int8");
  auto q = qweight.contiguous();
  auto s = scale.to(at::kFloat).contiguous();
  const int64_t N = q.size(0), B = q.size(1), K = B * 8 / bits;
  auto out = at::empty({N, K}, q.options().dtype(at::kFloat));
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = s.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++) {
      const int8_t* qr = qp + n * B;
      float* o = op + n * K;
      const float sc = sp[n];
      if (bits == 8) {
        for (int64_t k = 0; k < K; k++) o[k] = qr[k] * sc;
      } else {
        for (int64_t j = 0; j < B; j++) { o[2 * j] = hi4(qr[j]) * sc; o[2 * j + 1] = lo4(qr[j]) * sc; }
      }
    }
  });
  return out;
}

// Above this many input rows the problem is compute bound: dequantize a block of weight rows
// (a transient, cache-sized fp32 buffer) and let the BLAS sgemm do the flops.
constexpr int64_t kGemmRows = 64;
constexpr int64_t kBlockBytes = 8 << 20;

// integer: 1 takes the integer path in one pass, 2 in two, where this build has it and K is a multiple of QB; 0
// (and any other case) the fp32 path.
at::Tensor linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                  const c10::optional<at::Tensor>& bias, int64_t bits, int64_t integer) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 2, "qweight must be 2-D int8");
  TORCH_CHECK(x.device().is_cpu() && qweight.device().is_cpu(), "CPU tensors expected");
  auto q = qweight.contiguous();
  const int64_t N = q.size(0), K = q.size(1) * 8 / bits;
  TORCH_CHECK(x.size(-1) == K, "x has ", x.size(-1), " features, weight expects ", K);
  TORCH_CHECK(scale.numel() == N, "scale must have one entry per output row");
  auto s = scale.to(at::kFloat).contiguous();                 // [N]
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "bias must have one entry per output row");
    b = bias->to(at::kFloat).contiguous();
  }
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  const int64_t M = x.numel() / std::max<int64_t>(K, 1);

  if (integer && kIntegerPath && K % QB == 0 && M > 0 && N > 0) {
    // A bf16 input is quantized as it is and the output written in bf16: no converted copies of either
    const bool bf16 = x.scalar_type() == at::kBFloat16;
    auto x2 = bf16 ? x.reshape({-1, K}).contiguous() : x.reshape({-1, K}).to(at::kFloat).contiguous();  // [M, K]
    auto out = at::empty({M, N}, x2.options());                                                      // [M, N]
    const Output o{out.data_ptr(), bf16, N, s.data_ptr<float>(), bp};
    const int passes = integer >= 2 ? 2 : 1;
    if (bits == 8) integer_linear<8>(x2, q.data_ptr<int8_t>(), o, passes);
    else integer_linear<4>(x2, q.data_ptr<int8_t>(), o, passes);
    return out.view(shape).to(x.scalar_type());
  }
  auto x2 = x.reshape({-1, K}).to(at::kFloat).contiguous();  // [M, K] fp32
  auto out = at::empty({M, N}, x2.options());                   // [M, N] fp32
  if (M > kGemmRows) {
    const int64_t rows = std::max<int64_t>(R, kBlockBytes / (4 * K));
    for (int64_t n0 = 0; n0 < N; n0 += rows) {
      const int64_t nb = std::min(rows, N - n0);
      auto wf = dequantize(q.narrow(0, n0, nb), s.narrow(0, n0, nb), bits);  // [nb, K] fp32
      auto o = out.narrow(1, n0, nb);                                          // [M, nb], row stride N
      if (b.defined()) at::addmm_out(o, b.narrow(0, n0, nb), x2, wf.t());
      else at::mm_out(o, x2, wf.t());
    }
  } else if (M > 0 && N > 0) {
    if (bits == 8) {
      gemv_like<8>(x2.data_ptr<float>(), M, K, q.data_ptr<int8_t>(), N, s.data_ptr<float>(), bp,
                   out.data_ptr<float>());
    } else {
      auto xd = deinterleave(x2);
      gemv_like<4>(xd.data_ptr<float>(), M, K, q.data_ptr<int8_t>(), N, s.data_ptr<float>(), bp,
                   out.data_ptr<float>());
    }
  }
  return out.view(shape).to(x.scalar_type());
}

TORCH_LIBRARY(chatglm_quant, m) {
  m.def("linear(Tensor x, Tensor qweight, Tensor scale, Tensor? bias, int bits, int integer) -> Tensor");
  m.def("bf16_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? bias, float scale) -> Tensor");
  m.def("paged_attention(Tensor q, Tensor key_cache, Tensor value_cache, Tensor block_tables, Tensor rows, "
        "Tensor visible, float scale) -> Tensor");
  m.def("has_integer_path() -> bool", &has_integer_path);
  m.def("has_bf16_dot() -> bool", &has_bf16_dot);
  m.def("activation_block() -> int", &activation_block);
  m.def("simd() -> str", &simd);
  m.def("peak_macs(str kind, int iterations) -> float", &peak_macs);
  m.def("dequantize(Tensor qweight, Tensor scale, int bits) -> Tensor");
}

TORCH_LIBRARY_IMPL(chatglm_quant, CPU, m) {
  m.impl("linear", &linear);
  m.impl("dequantize", &dequantize);
  m.impl("bf16_linear", &bf16_linear);
  m.impl("decode_attention", &decode_attention);
  m.impl("paged_attention", &paged_attention);
}
"""

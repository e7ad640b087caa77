// CPU kernels of the Head-wise Memory Layer (see midus_surgery/model/hml.py and docs/hml.md).
//
// The pure-torch path of hml.py spends its time in three places stock CPU ops do badly
// (profile in docs/hml.md): torch.topk on 256-wide rows (serial, ~5 us a row), the embedding-bag
// per-sample-weight backward (a serial gather-dot loop) and the dense bank gradient.  These
// kernels do the same math with the same tie rule, parallel over rows with ATen's thread pool:
//
//   midus_hml::topk2(a [P,Q,n], b [P,Q,n], k) -> (scores [P,Q,k], i [P,Q,k], j [P,Q,k])
//       exact top-k of the n*n sums a[..,i] + b[..,j], ranked by (score desc, i*n+j asc).
//   midus_hml::score_topk2(q [T,H,d_h], keys [H,2,n,d_h/2], k) -> (scores [H,T,k], slots [H,T,k] = i*n+j)
//       the half scores q . keys and topk2's selection of them (float32: row by row, in one pass, the same bits at any T)
//   midus_hml::lookup_backward(dsel [H,T,k], q [T,H,d_h], keys [H,2,n,d_h/2], slots, need_q, need_keys)
//       -> (dq, dkeys): the scoring bmm's backward restricted to the chosen sub-keys
//   midus_hml::bag_forward(table [N,d], idx [B,k], w [B,k]) -> z [B,d]
//       z[b] = sum_i w[b,i] * table[idx[b,i]]
//   midus_hml::bag_backward(dz [B,d], table [N,d], idx [B,k], w [B,k], need_w, need_table)
//       -> (dw [B,k], dtable [N,d])   (an empty tensor for a gradient not asked for)
//   midus_hml::read(q [T,H,d_h], keys, table, proj?, k, head_rows) -> (m [H,T,d_h], w [H,T,k], slots [H,T,k])
//       the whole forward read in one call, for reads that record no gradient (decode)
//   midus_hml::rms_norm_backward(g [T,H,d], x [T,H,d], weight [H,d], eps, need_x, need_weight) -> (dx, dweight)
//       the query norm's backward (y = x * rsqrt(mean(x^2) + eps) * weight) in one pass
//
// Accumulation is in the "opmath" type (float for float/bfloat16/half tables, double for double);
// z and dw come back in that type, dtable in the table's (each row rounded once, when stored).  Results do not depend on the number of threads:
// every output element is written by one thread, in a fixed order.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

// Top-k selection by threshold and rank, branch-free and vectorised where it matters (a
// sorted-insertion list measured ~3x slower on 256-wide rows: its branches mispredict):
//   1. a threshold `th` with at least k entries >= th, and few more: a short bisection between
//      a known lower bound and the maximum, each step one vectorised count;
//   2. keep the entries >= th (branch-free compaction);
//   3. each kept entry's rank = the number of kept entries that beat it under (value desc,
//      id asc), a total order, so ranks are distinct and the first k land in out[0:k].
// The pairwise loop runs "for y: for x" so the inner loop is a plain vector compare-add.
// NaN scores never pass a comparison: the row then comes back partly NaN-filled, never with
// uninitialised memory (a model producing NaN scores has diverged anyway).

constexpr int64_t kPad = 8;        // lanes of the min / max scan
constexpr int64_t kLanes = 16;     // room past the end for a whole vector store
constexpr int kMaxBisections = 12;  // each halves the threshold's uncertainty

template <typename T>
inline int64_t count_ge(const T* v, int64_t m, T t) {
  int32_t c = 0;
  for (int64_t x = 0; x < m; ++x) c += (v[x] >= t);
  return c;
}

#if defined(__AVX512F__)
// 16 entries a step into lane counters, one horizontal sum at the end (the compiler's loop for the
// template above widens and reduces per step: ~10% slower at 256 entries).
template <>
inline int64_t count_ge<float>(const float* v, int64_t m, float t) {
  const __m512 tv = _mm512_set1_ps(t);
  const __m512i one = _mm512_set1_epi32(1);
  __m512i lanes = _mm512_setzero_si512();
  int64_t j = 0;
  for (; j + 16 <= m; j += 16)
    lanes = _mm512_mask_add_epi32(lanes, _mm512_cmp_ps_mask(_mm512_loadu_ps(v + j), tv, _CMP_GE_OQ), lanes, one);
  int64_t c = _mm512_reduce_add_epi32(lanes);
  for (; j < m; ++j) c += (v[j] >= t);
  return c;
}
#endif

// Raise `lo` (a value with count_ge(v, m, lo) >= k) towards the k-th largest of v[0:m], stopping
// once at most k + k/8 entries pass; `hi` is at least the maximum.
template <typename T>
inline T tighten(const T* v, int64_t m, int64_t k, T lo, T hi) {
  const int64_t enough = k + k / 8;
  for (int it = 0; it < kMaxBisections; ++it) {
    const T mid = lo + (hi - lo) / 2;
    const int64_t c = count_ge(v, m, mid);
    if (c >= k) {
      lo = mid;
      if (c <= enough) break;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// The entries of v[0:m] >= th (values and ids, in order) into buf_v / buf_id, which have room for
// m + kLanes entries; returns how many.  Branch-free: every entry is written, the count advances
// only past the kept ones.
template <typename T>
inline int64_t compact_scalar(const T* v, const int32_t* id, int64_t m, T th, T* buf_v, int32_t* buf_id) {
  int64_t c = 0;
  for (int64_t j = 0; j < m; ++j) {
    buf_v[c] = v[j];
    buf_id[c] = id[j];
    c += (v[j] >= th);
  }
  return c;
}

template <typename T>
inline int64_t compact(const T* v, const int32_t* id, int64_t m, T th, T* buf_v, int32_t* buf_id) {
  return compact_scalar(v, id, m, th, buf_v, buf_id);
}

#if defined(__AVX512F__)
// 16 entries a step: the kept lanes compressed in a register, then one plain store of all 16 (a
// compress straight to memory is microcoded and slow on AMD Zen 4); the next store starts where the
// kept ones end.  The same entries in the same order as the scalar loop (NaN is never kept by either).
template <>
inline int64_t compact<float>(const float* v, const int32_t* id, int64_t m, float th, float* buf_v, int32_t* buf_id) {
  const __m512 t = _mm512_set1_ps(th);
  int64_t c = 0, j = 0;
  for (; j + 16 <= m; j += 16) {
    const __m512 x = _mm512_loadu_ps(v + j);
    const __mmask16 keep = _mm512_cmp_ps_mask(x, t, _CMP_GE_OQ);
    _mm512_storeu_ps(buf_v + c, _mm512_maskz_compress_ps(keep, x));
    _mm512_storeu_si512(buf_id + c, _mm512_maskz_compress_epi32(keep, _mm512_loadu_si512(id + j)));
    c += __builtin_popcount(keep);
  }
  return c + compact_scalar(v + j, id + j, m - j, th, buf_v + c, buf_id + c);  // the last m % lanes entries
}
#elif defined(__AVX2__)
// AVX2 has no compress: 8 entries a step, the kept lanes moved to the front by one permute whose
// indices come from a table of the 256 keep-masks, then one plain store of all 8; the next store
// starts where the kept ones end.  The same entries in the same order as the scalar loop.
struct LeftPack {
  alignas(32) int32_t idx[256][8];
  LeftPack() {
    for (int mask = 0; mask < 256; ++mask) {
      int c = 0;
      for (int lane = 0; lane < 8; ++lane)
        if (mask >> lane & 1) idx[mask][c++] = lane;
      for (; c < 8; ++c) idx[mask][c] = 0;  // lanes past the kept ones: overwritten by the next store
    }
  }
};
const LeftPack kLeftPack;

template <>
inline int64_t compact<float>(const float* v, const int32_t* id, int64_t m, float th, float* buf_v, int32_t* buf_id) {
  const __m256 t = _mm256_set1_ps(th);
  int64_t c = 0, j = 0;
  for (; j + 8 <= m; j += 8) {
    const __m256 x = _mm256_loadu_ps(v + j);
    const int keep = _mm256_movemask_ps(_mm256_cmp_ps(x, t, _CMP_GE_OQ));
    const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kLeftPack.idx[keep]));
    _mm256_storeu_ps(buf_v + c, _mm256_permutevar8x32_ps(x, perm));
    const __m256i ids = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(id + j));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(buf_id + c), _mm256_permutevar8x32_epi32(ids, perm));
    c += __builtin_popcount(keep);
  }
  return c + compact_scalar(v + j, id + j, m - j, th, buf_v + c, buf_id + c);  // the last m % lanes entries
}
#endif

// rank[x] for x < cp = how many of the c kept entries beat entry x under (value desc, id asc).
template <typename T>
inline void rank_kept_loop(const T* v, const int32_t* id, int64_t c, int64_t cp, int32_t* rank) {
  for (int64_t x = 0; x < cp; ++x) rank[x] = 0;
  for (int64_t y = 0; y < c; ++y) {
    const T vy = v[y];
    const int32_t iy = id[y];
    for (int64_t x = 0; x < cp; ++x) rank[x] += (vy > v[x]) | ((vy == v[x]) & (iy < id[x]));
  }
}

template <typename T>
inline void rank_kept(const T* v, const int32_t* id, int64_t c, int64_t cp, int32_t* rank) {
  rank_kept_loop(v, id, c, cp, rank);
}

#if defined(__AVX512F__)
// NV vectors of 16 entries held in registers for the whole pairwise loop: the plain loop above
// loads and stores every rank once per entry y, a chain through memory that took a third of topk2.
template <int NV>
inline void rank_kept_registers(const float* v, const int32_t* id, int64_t c, int32_t* rank) {
  __m512 V[NV];
  __m512i I[NV], R[NV];
  for (int i = 0; i < NV; ++i) {
    V[i] = _mm512_loadu_ps(v + 16 * i);
    I[i] = _mm512_loadu_si512(id + 16 * i);
    R[i] = _mm512_setzero_si512();
  }
  const __m512i one = _mm512_set1_epi32(1);
  for (int64_t y = 0; y < c; ++y) {
    const __m512 vy = _mm512_set1_ps(v[y]);
    const __m512i iy = _mm512_set1_epi32(id[y]);
    for (int i = 0; i < NV; ++i) {
      const __mmask16 beats = _mm512_cmp_ps_mask(vy, V[i], _CMP_GT_OQ) |
                              (_mm512_cmp_ps_mask(vy, V[i], _CMP_EQ_OQ) & _mm512_cmplt_epi32_mask(iy, I[i]));
      R[i] = _mm512_mask_add_epi32(R[i], beats, R[i], one);
    }
  }
  for (int i = 0; i < NV; ++i) _mm512_storeu_si512(rank + 16 * i, R[i]);
}

template <>
inline void rank_kept<float>(const float* v, const int32_t* id, int64_t c, int64_t cp, int32_t* rank) {
  switch (cp / 16) {  // cp is a multiple of kLanes (16) here
    case 1: return rank_kept_registers<1>(v, id, c, rank);
    case 2: return rank_kept_registers<2>(v, id, c, rank);
    case 3: return rank_kept_registers<3>(v, id, c, rank);
    case 4: return rank_kept_registers<4>(v, id, c, rank);
    default: return rank_kept_loop(v, id, c, cp, rank);  // more than 64 kept (k > 56)
  }
}
#endif

// Keep the entries of v[0:m] >= th, then rank them; out gets the best k in order.
template <typename T>
inline void keep_and_rank(const T* v, const int32_t* id, int64_t m, T th, int64_t k, T* buf_v, int32_t* buf_id,
                          int32_t* rank, T* out_v, int32_t* out_id) {
  const int64_t c = compact(v, id, m, th, buf_v, buf_id);
  const int64_t cp = (c + kLanes - 1) / kLanes * kLanes;  // whole vectors (the buffers have kLanes of room)
  for (int64_t x = c; x < cp; ++x) {  // padding: loses to every kept entry, never written out
    buf_v[x] = -std::numeric_limits<T>::infinity();
    buf_id[x] = std::numeric_limits<int32_t>::max();
  }
  for (int64_t x = 0; x < k; ++x) {
    out_v[x] = std::numeric_limits<T>::quiet_NaN();
    out_id[x] = 0;
  }
  rank_kept(buf_v, buf_id, c, cp, rank);
  for (int64_t x = 0; x < c; ++x)
    if (rank[x] < k) {
      out_v[rank[x]] = buf_v[x];
      out_id[rank[x]] = buf_id[x];
    }
}

// Scratch space of one thread for one row.
template <typename T>
struct Scratch {
  std::vector<T> va, vb, cand_v, buf_v;
  std::vector<int32_t> ia, ib, ic, iota, cand_id, buf_id, rank;
  Scratch(int64_t n, int64_t k, int64_t C)
      : va(std::max<int64_t>(k, 32)), vb(std::max<int64_t>(k, 32)), cand_v(C + kLanes), buf_v(std::max(n, C) + kLanes + kPad),
        ia(std::max<int64_t>(k, 32)), ib(std::max<int64_t>(k, 32)), ic(k), iota(n), cand_id(C + kLanes),
        buf_id(std::max(n, C) + kLanes + kPad), rank(std::max(n, C) + kLanes + kPad) {
    for (int64_t j = 0; j < n; ++j) iota[j] = static_cast<int32_t>(j);
  }
};

// The bisection's start for the k-th largest of r[0:n]: lo with at least k entries >= lo (the minimum),
// hi >= every entry (the maximum).
template <typename T>
inline void topk_bracket_scalar(const T* r, int64_t n, T& lo, T& hi) {
  T lanes_lo[kPad], lanes_hi[kPad];  // lane-wise min / max: vectorises without fast-math
  for (int64_t l = 0; l < kPad; ++l) lanes_lo[l] = lanes_hi[l] = r[0];
  int64_t j = 0;
  for (; j + kPad <= n; j += kPad)
    for (int64_t l = 0; l < kPad; ++l) {
      lanes_lo[l] = std::min(lanes_lo[l], r[j + l]);
      lanes_hi[l] = std::max(lanes_hi[l], r[j + l]);
    }
  lo = lanes_lo[0], hi = lanes_hi[0];
  for (int64_t l = 1; l < kPad; ++l) lo = std::min(lo, lanes_lo[l]), hi = std::max(hi, lanes_hi[l]);
  for (; j < n; ++j) lo = std::min(lo, r[j]), hi = std::max(hi, r[j]);
}

template <typename T>
inline void topk_bracket(const T* r, int64_t n, int64_t k, T& lo, T& hi) {
  topk_bracket_scalar(r, n, lo, hi);
}

#if defined(__AVX512F__)
// For k <= 32 and rows of whole 32-entry blocks: the lane-wise maxima of the row's two halves are the
// maxima of 32 disjoint groups, so at least 32 >= k entries reach the smallest of them; a start far
// above the row's minimum (one bisection step fewer on average), from one pass of two max chains.
template <>
inline void topk_bracket<float>(const float* r, int64_t n, int64_t k, float& lo, float& hi) {
  if (k > 32 || n % 32 != 0) return topk_bracket_scalar(r, n, lo, hi);
  const float* second = r + n / 2;
  __m512 a = _mm512_loadu_ps(r), b = _mm512_loadu_ps(second);
  for (int64_t j = 16; j < n / 2; j += 16) {
    a = _mm512_max_ps(a, _mm512_loadu_ps(r + j));
    b = _mm512_max_ps(b, _mm512_loadu_ps(second + j));
  }
  lo = _mm512_reduce_min_ps(_mm512_min_ps(a, b));
  hi = _mm512_reduce_max_ps(_mm512_max_ps(a, b));
}
#endif

// Top-k of one half-score row: values and sub-key ids, sorted by (value desc, id asc).
template <typename T>
inline void half_topk(const T* r, int64_t n, int64_t k, T* out_v, int32_t* out_id, Scratch<T>& w) {
  T lo, hi;
  topk_bracket(r, n, k, lo, hi);
  const T th = tighten(r, n, k, lo, hi);
  keep_and_rank(r, w.iota.data(), n, th, k, w.buf_v.data(), w.buf_id.data(), w.rank.data(), out_v, out_id);
}

// log2(x) when x is a power of two (below 2^31), else -1: ids and entries then decode by shifts.
inline int exact_log2(int64_t x) {
  for (int b = 0; b < 31; ++b)
    if ((int64_t(1) << b) == x) return b;
  return -1;
}

// Rank pairs (r, s) with (r+1)(s+1) <= k: the only ones that can reach the final top k (both
// stage-1 lists are sorted; see candidate_pairs in hml.py).
std::vector<std::pair<int64_t, int64_t>> candidate_pairs(int64_t k) {
  std::vector<std::pair<int64_t, int64_t>> pairs;
  for (int64_t r = 0; r < k; ++r)
    for (int64_t s = 0; s < k && (r + 1) * (s + 1) <= k; ++s) pairs.emplace_back(r, s);
  return pairs;
}

// Outer corners (r, m/(r+1) - 1) of the smallest staircase {(r+1)(s+1) <= m} holding >= k pairs.
std::vector<std::pair<int64_t, int64_t>> staircase_corners(int64_t k) {
  auto size = [](int64_t m) {
    int64_t total = 0;
    for (int64_t i = 1; i <= m; ++i) total += m / i;
    return total;
  };
  int64_t m = 1;
  while (size(m) < k) ++m;  // m <= k, since size(k) >= k
  std::vector<std::pair<int64_t, int64_t>> corners;
  for (int64_t r = 0; r < m; ++r) corners.emplace_back(r, m / (r + 1) - 1);
  return corners;
}

// The pair lists of stage 2, computed once per call.
struct Stage2Plan {
  std::vector<std::pair<int64_t, int64_t>> pairs, corners;
  std::vector<int32_t> r, s;  // the pairs' ranks, padded with (0, 0) to whole vectors
  std::vector<int64_t> rect;   // rect[x - 1] = ceil(k / x) - 1: the x-by-ceil(k/x) rectangles' far corners
  int shift;  // log2(n) when n is a power of two (ids decode with shifts), else -1
  Stage2Plan(int64_t n, int64_t k) : pairs(candidate_pairs(k)), corners(staircase_corners(k)), shift(exact_log2(n)) {
    for (int64_t x = 1; x <= k; ++x) rect.push_back((k + x - 1) / x - 1);
    const int64_t padded = (static_cast<int64_t>(pairs.size()) + kLanes - 1) / kLanes * kLanes;
    r.assign(padded, 0);
    s.assign(padded, 0);
    for (size_t p = 0; p < pairs.size(); ++p) r[p] = static_cast<int32_t>(pairs[p].first), s[p] = static_cast<int32_t>(pairs[p].second);
  }
};

// The candidate sums va[r] + vb[s] and their slot ids ia[r] * n + ib[s], for every pair of the plan.
template <typename T>
inline void candidates_scalar(const Stage2Plan& plan, int64_t n, Scratch<T>& w) {
  const int64_t m = static_cast<int64_t>(plan.pairs.size());
  for (int64_t p = 0; p < m; ++p) {
    const auto& rs = plan.pairs[p];
    w.cand_v[p] = w.va[rs.first] + w.vb[rs.second];
    w.cand_id[p] = w.ia[rs.first] * static_cast<int32_t>(n) + w.ib[rs.second];  // n*n < 2^31 (HMLConfig)
  }
}

template <typename T>
inline void candidates(const Stage2Plan& plan, int64_t n, int64_t k, Scratch<T>& w) {
  candidates_scalar(plan, n, w);
}

#if defined(__AVX512F__)
// k <= 32: both lists fit in two registers each, and 16 candidates a step are looked up in them
// (a two-register permute) instead of loaded one by one; the same float adds as the scalar loop.
template <>
inline void candidates<float>(const Stage2Plan& plan, int64_t n, int64_t k, Scratch<float>& w) {
  if (k > 32) {
    candidates_scalar(plan, n, w);
    return;
  }
  const __m512 va0 = _mm512_loadu_ps(w.va.data()), va1 = _mm512_loadu_ps(w.va.data() + 16);
  const __m512 vb0 = _mm512_loadu_ps(w.vb.data()), vb1 = _mm512_loadu_ps(w.vb.data() + 16);
  const __m512i ia0 = _mm512_loadu_si512(w.ia.data()), ia1 = _mm512_loadu_si512(w.ia.data() + 16);
  const __m512i ib0 = _mm512_loadu_si512(w.ib.data()), ib1 = _mm512_loadu_si512(w.ib.data() + 16);
  const __m512i nv = _mm512_set1_epi32(static_cast<int32_t>(n));
  for (size_t p = 0; p < plan.r.size(); p += kLanes) {
    const __m512i r = _mm512_loadu_si512(plan.r.data() + p), s = _mm512_loadu_si512(plan.s.data() + p);
    _mm512_storeu_ps(w.cand_v.data() + p,
                     _mm512_add_ps(_mm512_permutex2var_ps(va0, r, va1), _mm512_permutex2var_ps(vb0, s, vb1)));
    _mm512_storeu_si512(w.cand_id.data() + p, _mm512_add_epi32(_mm512_mullo_epi32(_mm512_permutex2var_epi32(ia0, r, ia1), nv),
                                                               _mm512_permutex2var_epi32(ib0, s, ib1)));
  }
}
#endif

// Exact top-k of the n*n sums ra[i] + rb[j] of one row, ranked by (sum desc, i*n+j asc): the sums into
// ov[0:k], their slot ids i*n+j into w.ic[0:k].
template <typename T>
inline void select_row(const T* ra, const T* rb, int64_t n, int64_t k, const Stage2Plan& plan, Scratch<T>& w, T* ov) {
  half_topk(ra, n, k, w.va.data(), w.ia.data(), w);
  half_topk(rb, n, k, w.vb.data(), w.ib.data(), w);
  // Stage 2.  Any set of >= k pairs closed under "rank down" (r' <= r, s' <= s) bounds the
  // k-th best sum of the whole n*n table from below by its smallest sum, which (sorted
  // lists) sits on one of its outer corners.  Use every rectangle x*y >= k and the
  // staircase {(r+1)(s+1) <= m} as the bisection's starting bound; the best sum is va[0] + vb[0].
  T lo = -std::numeric_limits<T>::infinity();
  for (int64_t x = 1; x <= k; ++x) lo = std::max(lo, w.va[x - 1] + w.vb[plan.rect[x - 1]]);
  T stair = std::numeric_limits<T>::infinity();
  for (const auto& rs : plan.corners) stair = std::min(stair, w.va[rs.first] + w.vb[rs.second]);
  lo = std::max(lo, stair);
  const int64_t m = static_cast<int64_t>(plan.pairs.size());
  candidates(plan, n, k, w);
  const T th = tighten(w.cand_v.data(), m, k, lo, w.va[0] + w.vb[0]);
  keep_and_rank(w.cand_v.data(), w.cand_id.data(), m, th, k, w.buf_v.data(), w.buf_id.data(), w.rank.data(), ov,
                w.ic.data());
}

template <typename T>
void topk2_rows(const at::Tensor& a, const at::Tensor& b, int64_t k, at::Tensor& scores, at::Tensor& isub,
                at::Tensor& jsub) {
  const int64_t P = a.size(0), Q = a.size(1), n = a.size(2);
  const int64_t as0 = a.stride(0), as1 = a.stride(1), bs0 = b.stride(0), bs1 = b.stride(1);
  const T* ap = a.const_data_ptr<T>();
  const T* bp = b.const_data_ptr<T>();
  T* out_v = scores.mutable_data_ptr<T>();
  int64_t* out_i = isub.mutable_data_ptr<int64_t>();
  int64_t* out_j = jsub.mutable_data_ptr<int64_t>();
  const Stage2Plan plan(n, k);
  at::parallel_for(0, P * Q, 16, [&](int64_t begin, int64_t end) {
    Scratch<T> w(n, k, static_cast<int64_t>(plan.pairs.size()));
    for (int64_t row = begin; row < end; ++row) {
      const int64_t p = row / Q, q = row % Q;
      select_row(ap + p * as0 + q * as1, bp + p * bs0 + q * bs1, n, k, plan, w, out_v + row * k);
      for (int64_t x = 0; x < k; ++x) {
        const int32_t id = w.ic[x];
        out_i[row * k + x] = plan.shift >= 0 ? id >> plan.shift : id / n;
        out_j[row * k + x] = plan.shift >= 0 ? id & ((int32_t(1) << plan.shift) - 1) : id % n;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk2(const at::Tensor& a, const at::Tensor& b, int64_t k) {
  TORCH_CHECK(a.dim() == 3 && b.sizes() == a.sizes(), "topk2: a and b must both be [P, Q, n]");
  TORCH_CHECK(a.stride(2) == 1 && b.stride(2) == 1, "topk2: the last dim must be contiguous");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "topk2: a and b must have one dtype");
  TORCH_CHECK(k >= 1 && k <= a.size(2), "topk2: need 1 <= k <= n");
  TORCH_CHECK(a.size(2) * a.size(2) < (int64_t(1) << 31), "topk2: n*n must be < 2^31");
  auto scores = at::empty({a.size(0), a.size(1), k}, a.options());
  auto idx_opts = a.options().dtype(at::kLong);
  auto isub = at::empty({a.size(0), a.size(1), k}, idx_opts);
  auto jsub = at::empty({a.size(0), a.size(1), k}, idx_opts);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "midus_hml_topk2",
                             [&] { topk2_rows<scalar_t>(a, b, k, scores, isub, jsub); });
  return {scores, isub, jsub};
}

// Scores and selection in one pass (the training-size lookup): each (head, token) row's two
// half-score rows are computed into a buffer the thread reuses, then selected as topk2 selects,
// instead of one bmm writing [2H, T, n] float32 scores to memory for topk2 to read back.
// The keys are laid out once per call as kt [H, 2, d_h/2, n_pad] (sub-key index fastest, padded
// with zeros to whole blocks), so a block of sub-keys is a few vector registers per query feature.
constexpr int64_t kScoreBlock = 64;  // sub-keys scored per pass
constexpr int64_t kTileRows = 4;     // tokens scored per pass: each key vector loaded serves four of them

// out[r * n_pad + j] for r < kTileRows, j < n_pad: the scores of query halves q[r][0:half] against one
// key table kt [half, n_pad]: sum over c = 0, 1, ... of q[r][c] * kt[c][j], one fused multiply-add per
// term in that order, which is the order and rounding of a float32 GEMM's inner loop (MKL's bmm gives
// the same bits here: tests/test_hml_kernels.py compares the two).
inline void half_scores(const float* const* q, const float* kt, int64_t half, int64_t n_pad, float* out) {
  for (int64_t j0 = 0; j0 < n_pad; j0 += kScoreBlock) {
#if defined(__AVX512F__)
    __m512 acc[kTileRows][4];  // [row][16 sub-keys]: 16 registers
    for (auto& row : acc)
      for (auto& v : row) v = _mm512_setzero_ps();
    const float* col = kt + j0;
    for (int64_t c = 0; c < half; ++c, col += n_pad) {
      const __m512 k0 = _mm512_loadu_ps(col), k1 = _mm512_loadu_ps(col + 16), k2 = _mm512_loadu_ps(col + 32),
                   k3 = _mm512_loadu_ps(col + 48);
      for (int64_t r = 0; r < kTileRows; ++r) {
        const __m512 qc = _mm512_set1_ps(q[r][c]);
        acc[r][0] = _mm512_fmadd_ps(qc, k0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(qc, k1, acc[r][1]);
        acc[r][2] = _mm512_fmadd_ps(qc, k2, acc[r][2]);
        acc[r][3] = _mm512_fmadd_ps(qc, k3, acc[r][3]);
      }
    }
    for (int64_t r = 0; r < kTileRows; ++r)
      for (int v = 0; v < 4; ++v) _mm512_storeu_ps(out + r * n_pad + j0 + 16 * v, acc[r][v]);
#else
    for (int64_t r = 0; r < kTileRows; ++r) {
      float acc[kScoreBlock] = {};
      const float* col = kt + j0;
      for (int64_t c = 0; c < half; ++c, col += n_pad)
        for (int64_t l = 0; l < kScoreBlock; ++l) acc[l] = std::fma(q[r][c], col[l], acc[l]);
      std::memcpy(out + r * n_pad + j0, acc, sizeof(acc));
    }
#endif
  }
}

// float32 queries are scored in score_topk2's own loop at every token count, so that a token's scores, and the
// slots they select, are the same bits whatever else is in the call: below 128 tokens one bmm and topk2 cost less
// (the keys' transposed copy, about 50 us at the SmolLM2 size, is then most of the call), but a bmm sums in
// another order, and a sequence read alone and in a batch chose differently at near-ties (trial105).  The read
// with and without gradients scores the same way (a checkpointed forward runs both).
std::tuple<at::Tensor, at::Tensor> score_topk2(const at::Tensor& q, const at::Tensor& keys, int64_t k) {
  TORCH_CHECK(keys.dim() == 4 && keys.size(1) == 2, "score_topk2: keys must be [H, 2, n, d_h/2]");
  const int64_t H = keys.size(0), n = keys.size(2), half = keys.size(3);
  TORCH_CHECK(q.dim() == 3 && q.size(1) == H && q.size(2) == 2 * half, "score_topk2: q must be [T, H, d_h]");
  TORCH_CHECK(q.scalar_type() == keys.scalar_type(), "score_topk2: q and keys must have one dtype");
  const int64_t T_ = q.size(0);
  if (q.scalar_type() != at::kFloat) {  // float64: the reference path, one bmm and topk2
    const at::Tensor s = at::bmm(q.reshape({T_, 2 * H, half}).transpose(0, 1),
                                 keys.reshape({2 * H, n, half}).transpose(1, 2)).view({H, 2, T_, n});  // [2H, T, n]
    auto [scores, isub, jsub] = topk2(s.select(1, 0), s.select(1, 1), k);
    return {scores, isub.mul_(n).add_(jsub)};
  }
  TORCH_CHECK(k >= 1 && k <= n, "score_topk2: need 1 <= k <= n");
  TORCH_CHECK(n * n < (int64_t(1) << 31), "score_topk2: n*n must be < 2^31");
  const int64_t n_pad = (n + kScoreBlock - 1) / kScoreBlock * kScoreBlock;
  const at::Tensor qc = q.contiguous();
  // kt[h, hf, c, j] = keys[h, hf, j, c]; the padding sub-keys score 0 and are never selected (only j < n is)
  at::Tensor kt = at::empty({H, 2, half, n_pad}, keys.options());
  kt.narrow(3, 0, n).copy_(keys.transpose(2, 3));
  if (n_pad > n) kt.narrow(3, n, n_pad - n).zero_();  // only the padding: the rest was just written
  auto scores = at::empty({H, T_, k}, q.options());
  auto slots = at::empty({H, T_, k}, q.options().dtype(at::kLong));
  const float* qp = qc.const_data_ptr<float>();
  const float* ktp = kt.const_data_ptr<float>();
  float* out_v = scores.mutable_data_ptr<float>();
  int64_t* out_slot = slots.mutable_data_ptr<int64_t>();
  const Stage2Plan plan(n, k);
  // Tiles of kTileRows tokens of one head, in (head, token) order: a thread's consecutive tiles score
  // against one head's keys, kept in cache.  A last, short tile scores copies of its last token.
  const int64_t tiles_per_head = (T_ + kTileRows - 1) / kTileRows;
  at::parallel_for(0, H * tiles_per_head, 4, [&](int64_t begin, int64_t end) {
    Scratch<float> w(n, k, static_cast<int64_t>(plan.pairs.size()));
    std::vector<float> sa(kTileRows * n_pad), sb(kTileRows * n_pad);
    const float* qa[kTileRows];
    const float* qb[kTileRows];
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t h = tile / tiles_per_head, t0 = tile % tiles_per_head * kTileRows;
      const int64_t rows = std::min(kTileRows, T_ - t0);
      for (int64_t r = 0; r < kTileRows; ++r) {
        qa[r] = qp + ((t0 + std::min(r, rows - 1)) * H + h) * 2 * half;
        qb[r] = qa[r] + half;
      }
      half_scores(qa, ktp + (h * 2) * half * n_pad, half, n_pad, sa.data());
      half_scores(qb, ktp + (h * 2 + 1) * half * n_pad, half, n_pad, sb.data());
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = h * T_ + t0 + r;
        select_row(sa.data() + r * n_pad, sb.data() + r * n_pad, n, k, plan, w, out_v + row * k);
        std::copy(w.ic.begin(), w.ic.begin() + k, out_slot + row * k);
      }
    }
  });
  return {scores, slots};
}

// y[0:d] += w * x[0:d]   (element-wise: the compiler vectorises it)
template <typename A, typename T>
inline void axpy(A* y, A w, const T* x, int64_t d) {
  for (int64_t c = 0; c < d; ++c) y[c] += w * static_cast<A>(x[c]);
}

// dot(x, y) with 8 independent partial sums, so the loop vectorises without -ffast-math and the
// result does not depend on threading.
template <typename A, typename T>
inline A dot(const A* x, const T* y, int64_t d) {
  A part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t c = 0;
  for (; c + 8 <= d; c += 8)
    for (int l = 0; l < 8; ++l) part[l] += x[c + l] * static_cast<A>(y[c + l]);
  A tail = 0;
  for (; c < d; ++c) tail += x[c] * static_cast<A>(y[c]);
  return ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7])) + tail;
}

// A table row in the accumulation type: the row itself when it already is, else converted into
// buf.  Every dtype then runs the one float (or double) dot/axpy on the same values, so a bf16
// table gives what its float copy gives, to the bit (the compiler fuses multiply-adds per loop,
// which a conversion inside the loop could change), and each row is converted once, in a loop
// that vectorises.
template <typename A, typename T>
inline const A* row_in(const T* row, A* buf, int64_t d) {
  if constexpr (std::is_same_v<A, T>) {
    return row;
  } else {
    for (int64_t c = 0; c < d; ++c) buf[c] = static_cast<A>(row[c]);
    return buf;
  }
}

// dst[0:d] = src rounded to T.  For bfloat16 the rounding of c10::BFloat16(float) (to nearest
// even; NaN -> 0x7FC0) in integer arithmetic, so the loop vectorises (the constructor does not).
template <typename T, typename A>
inline void row_out(const A* src, T* dst, int64_t d) {
  if constexpr (std::is_same_v<T, at::BFloat16> && std::is_same_v<A, float>) {
    for (int64_t c = 0; c < d; ++c) {
      uint32_t u;
      std::memcpy(&u, src + c, sizeof(u));
      const uint16_t rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
      const uint16_t bits = src[c] != src[c] ? uint16_t(0x7FC0) : rounded;
      std::memcpy(dst + c, &bits, sizeof(bits));
    }
  } else {
    for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<T>(src[c]);
  }
}

// Backward of the scoring: only the 2k chosen sub-keys of each (head, token) row get a score
// gradient, so instead of scattering into dense [H, 2, T, n] tables and running two bmm's
// (n/k times the work, plus a large zero-fill) gather and scatter those rows directly.
//   dq[t, h, half]          = sum_x dsel[h, t, x] * keys[h, half, id_half[h, t, x]]
//   dkeys[h, half, i]      += dsel[h, t, x] * q[t, h, half]     for id_half[h, t, x] == i
// where id_0 = slot / n and id_1 = slot % n (the slots score_topk2 returned).

// The sub-key ids of half hf of k slots into out: slot / n (hf 0) or slot % n (hf 1), by shifts when
// n is a power of two.
inline void half_ids(const int64_t* slot, int64_t k, int64_t n, int shift, int64_t hf, int64_t* out) {
  if (shift >= 0) {
    const int64_t mask = (int64_t(1) << shift) - 1;
    for (int64_t x = 0; x < k; ++x) out[x] = hf ? slot[x] & mask : slot[x] >> shift;
  } else {
    for (int64_t x = 0; x < k; ++x) out[x] = hf ? slot[x] % n : slot[x] / n;
  }
}

// One (head, half, token) row of the one-pass loop below at a fixed half width D: the dq half row is
// summed in registers (a row in memory makes every x wait on the last one's store) and q's half row
// is loaded once.  The same products in the same order as the axpy loop: the same bits.
template <int D, typename T>
inline void lookup_grads_row(const T* g, const int64_t* id, int64_t k, const T* table, const T* qrow, T* grad, T* out) {
  T acc[D], qv[D];
  for (int c = 0; c < D; ++c) acc[c] = T(0), qv[c] = qrow[c];
  for (int64_t x = 0; x < k; ++x) {
    const T gx = g[x];
    const T* key = table + id[x] * D;
    T* dkey = grad + id[x] * D;
    for (int c = 0; c < D; ++c) acc[c] += gx * key[c];
    for (int c = 0; c < D; ++c) dkey[c] += gx * qv[c];
  }
  for (int c = 0; c < D; ++c) out[c] = acc[c];
}

template <typename T>
void lookup_backward_impl(const at::Tensor& dsel, const at::Tensor& q, const at::Tensor& keys, const at::Tensor& slots,
                          at::Tensor& dq, at::Tensor& dkeys) {
  const int64_t H = keys.size(0), n = keys.size(2), half = keys.size(3), T_ = q.size(0), k = dsel.size(2);
  const T* gp = dsel.const_data_ptr<T>();
  const T* qp = q.const_data_ptr<T>();
  const T* kp = keys.const_data_ptr<T>();
  const int64_t* sp = slots.const_data_ptr<int64_t>();
  const int shift = exact_log2(n);
  if (dq.numel() && dkeys.numel()) {
    // Both in one pass per (head, half) task: each (t, x) entry's score gradient and sub-key id are read
    // once for the two products (separate passes read dsel and the ids twice; in a training step those
    // come from memory, not cache).  Each dq row half is summed in x order and each dkeys row in (t, x)
    // order, as in the separate loops below: the same bits.
    T* dqp = dq.mutable_data_ptr<T>();
    T* dkp = dkeys.mutable_data_ptr<T>();
    at::parallel_for(0, H * 2, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> ids(k);
      const int64_t* id = ids.data();
      for (int64_t task = begin; task < end; ++task) {
        const int64_t h = task / 2, hf = task % 2;
        const T* table = kp + task * n * half;
        T* grad = dkp + task * n * half;
        for (int64_t t = 0; t < T_; ++t) {
          const int64_t row = h * T_ + t;
          const T* g = gp + row * k;
          half_ids(sp + row * k, k, n, shift, hf, ids.data());
          const T* qrow = qp + (t * H + h) * 2 * half + hf * half;
          T* out = dqp + (t * H + h) * 2 * half + hf * half;
          if (half == 32) {
            lookup_grads_row<32>(g, id, k, table, qrow, grad, out);
          } else if (half == 64) {
            lookup_grads_row<64>(g, id, k, table, qrow, grad, out);
          } else {
            std::fill(out, out + half, T(0));
            for (int64_t x = 0; x < k; ++x) {
              axpy(out, g[x], table + id[x] * half, half);
              axpy(grad + id[x] * half, g[x], qrow, half);
            }
          }
        }
      }
    });
    return;
  }
  if (dq.numel()) {
    T* dqp = dq.mutable_data_ptr<T>();
    at::parallel_for(0, H * T_, 64, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> ids(k);
      const int64_t* id = ids.data();
      for (int64_t row = begin; row < end; ++row) {  // row = h * T + t
        const int64_t h = row / T_, t = row % T_;
        const T* g = gp + row * k;
        for (int64_t hf = 0; hf < 2; ++hf) {
          const T* table = kp + (h * 2 + hf) * n * half;
          half_ids(sp + row * k, k, n, shift, hf, ids.data());
          T* out = dqp + (t * H + h) * 2 * half + hf * half;
          std::fill(out, out + half, T(0));
          for (int64_t x = 0; x < k; ++x) axpy(out, g[x], table + id[x] * half, half);
        }
      }
    });
  }
  if (dkeys.numel()) {
    T* dkp = dkeys.mutable_data_ptr<T>();
    // One (head, half) table per task, rows accumulated in (t, x) order: deterministic.
    at::parallel_for(0, H * 2, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> ids(k);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t h = task / 2, hf = task % 2;
        T* table = dkp + task * n * half;
        for (int64_t t = 0; t < T_; ++t) {
          const int64_t row = h * T_ + t;
          const T* qrow = qp + (t * H + h) * 2 * half + hf * half;
          half_ids(sp + row * k, k, n, shift, hf, ids.data());
          for (int64_t x = 0; x < k; ++x) axpy(table + ids[x] * half, gp[row * k + x], qrow, half);
        }
      }
    });
  }
}

std::tuple<at::Tensor, at::Tensor> lookup_backward(const at::Tensor& dsel, const at::Tensor& q, const at::Tensor& keys,
                                                   const at::Tensor& slots, bool need_q, bool need_keys) {
  TORCH_CHECK(keys.dim() == 4 && keys.size(1) == 2 && keys.is_contiguous(), "lookup_backward: keys must be [H, 2, n, d_h/2]");
  const int64_t H = keys.size(0), half = keys.size(3);
  TORCH_CHECK(q.dim() == 3 && q.size(1) == H && q.size(2) == 2 * half && q.is_contiguous(),
              "lookup_backward: q must be a contiguous [T, H, d_h]");
  TORCH_CHECK(dsel.dim() == 3 && dsel.size(0) == H && dsel.size(1) == q.size(0) && dsel.is_contiguous(),
              "lookup_backward: dsel must be a contiguous [H, T, k]");
  TORCH_CHECK(slots.sizes() == dsel.sizes() && slots.is_contiguous() && slots.scalar_type() == at::kLong,
              "lookup_backward: slots must be a contiguous int64 like dsel");
  TORCH_CHECK(q.scalar_type() == keys.scalar_type() && dsel.scalar_type() == keys.scalar_type(),
              "lookup_backward: dsel, q and keys must have one dtype");
  auto dq = need_q ? at::empty(q.sizes(), q.options()) : at::empty({0}, q.options());
  auto dkeys = need_keys ? at::zeros(keys.sizes(), keys.options()) : at::empty({0}, keys.options());
  AT_DISPATCH_FLOATING_TYPES(keys.scalar_type(), "midus_hml_lookup_backward",
                             [&] { lookup_backward_impl<scalar_t>(dsel, q, keys, slots, dq, dkeys); });
  return {dq, dkeys};
}

void check_bag_args(const at::Tensor& table, const at::Tensor& idx, const at::Tensor& w) {
  TORCH_CHECK(table.dim() == 2 && table.is_contiguous(), "bag: table must be a contiguous [N, d]");
  TORCH_CHECK(idx.dim() == 2 && idx.is_contiguous() && idx.scalar_type() == at::kLong,
              "bag: idx must be a contiguous int64 [B, k]");
  TORCH_CHECK(w.sizes() == idx.sizes() && w.is_contiguous(), "bag: w must be a contiguous [B, k]");
  TORCH_CHECK(w.scalar_type() == at::toOpMathType(table.scalar_type()),
              "bag: w must have the table's accumulation dtype");
}

// Calls f(std::integral_constant<int, D>) with D = d for the row widths the layer uses (d_l, or d_h
// with HIVE off), else D = 0: a fixed width lets a row's sum live in registers across its k terms
// (a row in memory makes every term wait on the last one's store).
template <typename F>
inline void with_row_width(int64_t d, F&& f) {
  switch (d) {
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 128: f(std::integral_constant<int, 128>{}); break;
    case 256: f(std::integral_constant<int, 256>{}); break;
    default: f(std::integral_constant<int, 0>{});
  }
}

// Rows up to this wide sum in registers in bag_forward; wider ones (d_l = 256: 16 AVX-512 registers of sum
// and as many of row) ran 2x slower that way at the Llama-3.2-1B size than through the row in memory.
constexpr int kBagRowMaxRegisters = 128;

// z[0:D] = sum_i w[i] * row(idx[i]): summed in registers, terms in i order from 0 (the same bits as
// axpy into a zeroed row).
template <int D, typename A, typename T>
inline void bag_row(A* z, const A* w, const int64_t* idx, int64_t k, const T* table) {
  A acc[D];
  for (int c = 0; c < D; ++c) acc[c] = A(0);
  A buf[D];
  for (int64_t i = 0; i < k; ++i) {
    const A wi = w[i];
    const A* row = row_in(table + idx[i] * D, buf, D);
    for (int c = 0; c < D; ++c) acc[c] += wi * row[c];
  }
  for (int c = 0; c < D; ++c) z[c] = acc[c];
}

at::Tensor bag_forward(const at::Tensor& table, const at::Tensor& idx, const at::Tensor& w) {
  check_bag_args(table, idx, w);
  const int64_t B = idx.size(0), k = idx.size(1), d = table.size(1);
  auto z = at::empty({B, d}, table.options().dtype(w.scalar_type()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, table.scalar_type(), "midus_hml_bag_forward", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* tp = table.const_data_ptr<scalar_t>();
    const int64_t* ip = idx.const_data_ptr<int64_t>();
    const A* wp = w.const_data_ptr<A>();
    A* zp = z.mutable_data_ptr<A>();
    with_row_width(d, [&](auto width) {
      constexpr int D = decltype(width)::value;
      at::parallel_for(0, B, 64, [&](int64_t begin, int64_t end) {
        for (int64_t bag = begin; bag < end; ++bag) {
          // The rows are scattered over the table: ask for the next bag's rows while summing this one.
          if (bag + 1 < end)
            for (int64_t i = 0; i < k; ++i) {
              const char* row = reinterpret_cast<const char*>(tp + ip[(bag + 1) * k + i] * d);
              for (int64_t off = 0; off < d * static_cast<int64_t>(sizeof(scalar_t)); off += 64)
                __builtin_prefetch(row + off);
            }
          if constexpr (D > 0 && D <= kBagRowMaxRegisters) {
            bag_row<D>(zp + bag * d, wp + bag * k, ip + bag * k, k, tp);
          } else {
            std::fill(zp + bag * d, zp + (bag + 1) * d, A(0));
            for (int64_t i = 0; i < k; ++i) axpy(zp + bag * d, wp[bag * k + i], tp + ip[bag * k + i] * d, d);
          }
        }
      });
    });
  });
  return z;
}

constexpr int64_t kBagLookahead = 8;  // entries ahead: enough to cover a miss at a few ns an entry

std::tuple<at::Tensor, at::Tensor> bag_backward(const at::Tensor& dz, const at::Tensor& table, const at::Tensor& idx,
                                                const at::Tensor& w, bool need_w, bool need_table) {
  check_bag_args(table, idx, w);
  const int64_t B = idx.size(0), k = idx.size(1), N = table.size(0), d = table.size(1);
  TORCH_CHECK(dz.dim() == 2 && dz.size(0) == B && dz.size(1) == d && dz.is_contiguous(),
              "bag_backward: dz must be a contiguous [B, d]");
  TORCH_CHECK(dz.scalar_type() == w.scalar_type(), "bag_backward: dz must have w's dtype");
  TORCH_CHECK(B * k < (int64_t(1) << 31), "bag_backward: more than 2^31 entries");
  auto acc_opts = table.options().dtype(w.scalar_type());
  auto dw = need_w ? at::empty({B, k}, acc_opts) : at::empty({0}, acc_opts);
  // in the table's dtype: each row is summed in float and rounded once, as it is stored (a float
  // gradient cast afterwards rounds the same, but writes and reads the whole float table once more)
  auto dtable = need_table ? at::empty({N, d}, table.options()) : at::empty({0}, table.options());
  if (!need_w && !need_table) return {dw, dtable};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, table.scalar_type(), "midus_hml_bag_backward", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* tp = table.const_data_ptr<scalar_t>();
    const int64_t* ip = idx.const_data_ptr<int64_t>();
    const A* wp = w.const_data_ptr<A>();
    const A* gp = dz.const_data_ptr<A>();
    A* dwp = need_w ? dw.mutable_data_ptr<A>() : nullptr;
    if (!need_table) {  // only dw: every (bag, i) is independent
      at::parallel_for(0, B, 64, [&](int64_t begin, int64_t end) {
        std::vector<A> buf(d);
        for (int64_t bag = begin; bag < end; ++bag)
          for (int64_t i = 0; i < k; ++i) dwp[bag * k + i] = dot(gp + bag * d, row_in(tp + ip[bag * k + i] * d, buf.data(), d), d);
      });
      return;
    }
    // dtable rows are shared between bags, so walk the entries slot by slot instead: a stable
    // counting sort by slot, then each slot's table row is read once, its dtable row written
    // once (no zero-fill, no read-modify-write), and dw falls out of the same pass.  The
    // scattered reads are dz rows ([B, d], far smaller than the table).  Each slot is summed
    // in (bag, i) order by one thread: the result does not depend on the thread count.
    // The sort runs in P parts of the entry list (one per thread): each part counts its
    // entries per slot, one pass over slots turns the counts into every part's write offsets,
    // then each part places its entries.  Part p's entries of a slot go before part p+1's, so
    // the order is the serial stable sort's whatever P is.
    const int64_t total = B * k;
    const int64_t P = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total / 4096));
    const int64_t chunk = (total + P - 1) / P;
    std::vector<int32_t> offset(P * N, 0), start(N + 1, 0), order(total);
    at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        int32_t* cnt = offset.data() + p * N;
        for (int64_t e = p * chunk; e < std::min(total, (p + 1) * chunk); ++e) ++cnt[ip[e]];
      }
    });
    int32_t run = 0;
    for (int64_t s = 0; s < N; ++s) {
      start[s] = run;
      for (int64_t p = 0; p < P; ++p) {
        const int32_t c = offset[p * N + s];
        offset[p * N + s] = run;
        run += c;
      }
    }
    start[N] = run;
    at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        int32_t* fill = offset.data() + p * N;
        for (int64_t e = p * chunk; e < std::min(total, (p + 1) * chunk); ++e) order[fill[ip[e]]++] = static_cast<int32_t>(e);
      }
    });
    scalar_t* dtp = dtable.mutable_data_ptr<scalar_t>();
    const int kshift = exact_log2(k);  // an entry's bag by a shift, not a division, when it can
    // One slot: its entries' dw (dot with the slot's row, converted once) and its dtable row, summed in
    // (bag, i) order; at a fixed width D the row's sum stays in registers across the entries.
    auto slot_rows = [&](auto width, int64_t begin, int64_t end) {
      constexpr int D = decltype(width)::value;
      const int64_t dd = D > 0 ? D : d;
      std::vector<A> acc_mem(D > 0 ? 0 : d), buf(d);
      A acc_reg[D > 0 ? D : 1];
      A* acc = D > 0 ? acc_reg : acc_mem.data();
      for (int64_t slot = begin; slot < end; ++slot) {
        const A* row = dwp ? row_in(tp + slot * dd, buf.data(), dd) : nullptr;
        for (int64_t c = 0; c < dd; ++c) acc[c] = A(0);
        for (int64_t x = start[slot]; x < start[slot + 1]; ++x) {
          // The entries' dz rows, weights and dw cells are scattered: ask for those a few entries ahead
          // (order[] runs on across slots, so the lookahead crosses slot boundaries too).
          if (x + kBagLookahead < total) {
            const int64_t ahead = order[x + kBagLookahead];
            const char* grow = reinterpret_cast<const char*>(gp + (kshift >= 0 ? ahead >> kshift : ahead / k) * dd);
            for (int64_t off = 0; off < dd * static_cast<int64_t>(sizeof(A)); off += 64) __builtin_prefetch(grow + off);
            __builtin_prefetch(wp + ahead);
            if (dwp) __builtin_prefetch(dwp + ahead, 1);
          }
          const int64_t e = order[x];
          const A* g = gp + (kshift >= 0 ? e >> kshift : e / k) * dd;
          if (dwp) dwp[e] = dot(g, row, dd);
          const A we = wp[e];
          for (int64_t c = 0; c < dd; ++c) acc[c] += we * g[c];
        }
        row_out(acc, dtp + slot * dd, dd);
      }
    };
    with_row_width(d, [&](auto width) {
      at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) { slot_rows(width, begin, end); });
    });
  });
  return {dw, dtable};
}

// Backward of the query norm y = x * rsqrt(mean(x^2) + eps) * weight over each (token, head) row of d
// features, in one pass (the composite's autograd runs ~12 elementwise ops over [T, H, d], each a
// pass through memory).  Per row, with r = rsqrt(mean(x^2) + eps), xh = x * r and gw = g * weight:
//   dx      = r * (gw - xh * sum(gw * xh) / d)        (rounded once to x's dtype)
//   dweight += g * xh                                  (summed over tokens)
// Tasks are (head, block of kNormTokenBlock tokens): each block's dweight part is summed in token
// order, then the parts in block order: the same bits whatever the thread count.
constexpr int64_t kNormTokenBlock = 128;

template <typename A, typename T>
void rms_norm_backward_impl(const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight, double eps,
                            at::Tensor& dx, at::Tensor& dweight) {
  const int64_t T_ = x.size(0), H = x.size(1), d = x.size(2);
  const int64_t blocks = (T_ + kNormTokenBlock - 1) / kNormTokenBlock;
  const A* gp = g.const_data_ptr<A>();
  const T* xp = x.const_data_ptr<T>();
  const A* wp = weight.const_data_ptr<A>();
  T* dxp = dx.numel() ? dx.mutable_data_ptr<T>() : nullptr;
  std::vector<A> parts(dweight.numel() ? H * blocks * d : 0, A(0));
  with_row_width(d, [&](auto width) {
    constexpr int D = decltype(width)::value;  // 0: d at run time
    const int64_t dd = D > 0 ? D : d;
    at::parallel_for(0, H * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> xbuf(dd), out(dd);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t h = task / blocks, b = task % blocks;
        const A* w = wp + h * dd;
        A* part = parts.empty() ? nullptr : parts.data() + task * dd;
        for (int64_t t = b * kNormTokenBlock; t < std::min(T_, (b + 1) * kNormTokenBlock); ++t) {
          const int64_t at = (t * H + h) * dd;
          const A* xr = row_in(xp + at, xbuf.data(), dd);
          const A* gr = gp + at;
          const A r = A(1) / std::sqrt(dot(xr, xr, dd) / A(dd) + A(eps));
          if (dxp) {
            for (int64_t c = 0; c < dd; ++c) out[c] = gr[c] * w[c];  // gw
            const A scale = dot(out.data(), xr, dd) * r * r / A(dd);  // sum(gw * xh) / d, times r once more for xh = x * r
            for (int64_t c = 0; c < dd; ++c) out[c] = r * (out[c] - xr[c] * scale);
            row_out(out.data(), dxp + at, dd);
          }
          if (part)
            for (int64_t c = 0; c < dd; ++c) part[c] += gr[c] * (xr[c] * r);
        }
      }
    });
  });
  if (!parts.empty()) {
    A* dwp = dweight.mutable_data_ptr<A>();
    for (int64_t h = 0; h < H; ++h)
      for (int64_t c = 0; c < d; ++c) {
        A sum = 0;
        for (int64_t b = 0; b < blocks; ++b) sum += parts[(h * blocks + b) * d + c];
        dwp[h * d + c] = sum;
      }
  }
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight,
                                                     double eps, bool need_x, bool need_weight) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "rms_norm_backward: x must be a contiguous [T, H, d]");
  TORCH_CHECK(g.sizes() == x.sizes() && g.is_contiguous(), "rms_norm_backward: g must be a contiguous tensor like x");
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == x.size(1) && weight.size(1) == x.size(2) && weight.is_contiguous(),
              "rms_norm_backward: weight must be a contiguous [H, d]");
  TORCH_CHECK(g.scalar_type() == at::toOpMathType(x.scalar_type()) && weight.scalar_type() == g.scalar_type(),
              "rms_norm_backward: g and weight must have x's accumulation dtype");
  auto dx = need_x ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  auto dweight = need_weight ? at::empty(weight.sizes(), weight.options()) : at::empty({0}, weight.options());
  if (!need_x && !need_weight) return {dx, dweight};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "midus_hml_rms_norm_backward", [&] {
    rms_norm_backward_impl<at::opmath_type<scalar_t>, scalar_t>(g, x, weight, eps, dx, dweight);
  });
  return {dx, dweight};
}

// The memory layer's whole read when no gradient is recorded (decode, evaluation): score_topk2,
// softmax, bag_forward and HIVE's projection in one call.  The same operators in the same
// order as hml.py's _lookup_forward + _pool_project_forward / _pool_forward, so the same values to
// the bit; what goes is the ~20 operator dispatches and the Python around them, which cost more
// than the work itself for the few tokens of a decode step.
//   q [T, H, d_h], keys [H, 2, n, d_h/2] (one float dtype); table [rows, d]; proj [H, d, d_h] (HIVE, in the
//   dtype the projection runs in) or none (table = per-head values; head h's slots start at row h * head_rows)
//   -> (m [H, T, d_h], w [H, T, k], slots [H, T, k] int64)
std::tuple<at::Tensor, at::Tensor, at::Tensor> memory_read(const at::Tensor& q, const at::Tensor& keys,
                                                           const at::Tensor& table, const std::optional<at::Tensor>& proj,
                                                           int64_t k, int64_t head_rows) {
  TORCH_CHECK(q.dim() == 3 && keys.dim() == 4 && keys.size(0) == q.size(1) && keys.size(1) == 2 &&
                  2 * keys.size(3) == q.size(2),
              "read: q must be [T, H, d_h] and keys [H, 2, n, d_h/2]");
  TORCH_CHECK(q.scalar_type() == keys.scalar_type(), "read: q and keys must have one dtype");
  const int64_t T_ = q.size(0), H = q.size(1);
  auto [scores, slots] = score_topk2(q, keys, k);  // [H, T, k] each
  at::Tensor w = at::softmax(scores, -1);
  at::Tensor rows = head_rows ? slots + at::arange(H, slots.options()).mul_(head_rows).view({H, 1, 1}) : slots;
  at::Tensor z = bag_forward(table, rows.reshape({H * T_, k}).contiguous(),
                             w.reshape({H * T_, k}).to(at::toOpMathType(table.scalar_type())).contiguous())
                     .view({H, T_, -1});
  if (!proj.has_value()) return {z, w, slots};
  // in proj's dtype, which the caller chose as _pool_project_forward chooses its bmm's (hml.py _matmul_dtype)
  return {at::bmm(z.to(proj->scalar_type()), *proj), w, slots};
}

}  // namespace

TORCH_LIBRARY(midus_hml, m) {
  m.def("topk2(Tensor a, Tensor b, int k) -> (Tensor, Tensor, Tensor)");
  m.def("score_topk2(Tensor q, Tensor keys, int k) -> (Tensor, Tensor)");
  m.def("lookup_backward(Tensor dsel, Tensor q, Tensor keys, Tensor slots, bool need_q, bool need_keys) -> (Tensor, Tensor)");
  m.def("bag_forward(Tensor table, Tensor idx, Tensor w) -> Tensor");
  m.def("bag_backward(Tensor dz, Tensor table, Tensor idx, Tensor w, bool need_w, bool need_table) -> (Tensor, Tensor)");
  m.def("read(Tensor q, Tensor keys, Tensor table, Tensor? proj, int k, int head_rows) -> (Tensor, Tensor, Tensor)");
  m.def("rms_norm_backward(Tensor g, Tensor x, Tensor weight, float eps, bool need_x, bool need_weight) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(midus_hml, CPU, m) {
  m.impl("topk2", &topk2);
  m.impl("score_topk2", &score_topk2);
  m.impl("lookup_backward", &lookup_backward);
  m.impl("bag_forward", &bag_forward);
  m.impl("bag_backward", &bag_backward);
  m.impl("read", &memory_read);
  m.impl("rms_norm_backward", &rms_norm_backward);
}

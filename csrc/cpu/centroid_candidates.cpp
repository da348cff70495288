// Stage 1 of the token index (fastrank/index/tokens.py) on the CPU: for each query, the documents of the
// inverted lists its tokens probe, ranked by the centroid-interaction estimate
//
//     approx(d) = sum_l max{ gain[l, p] : list probe_c[l, p] holds d }
//
// and its best `ndocs` returned, ascending. The spec is centroid_candidates_ref in
// fastrank/ops/centroid_candidates.py; this kernel returns the same documents and bit-identical estimates.
//
// Why a kernel: the PyTorch formulation materialises every probed list entry of a batch and sorts them
// (torch.unique) to deduplicate (query, document) pairs. At 100M tokens a query probes about 590,000 entries,
// so a batch of 64 queries sorted 38M keys through arrays of several GiB: 5.4 queries/s and 5.1 GiB of peak
// memory. Here the lists are walked once, a range of kRangeDocs documents at a time, and each thread keeps a
// slot per document of the range (a float32 running estimate and a uint32 stamp): O(entries) time, 256 KiB
// per thread of memory, nothing sized by the entries or the corpus.
//
// Order of the sums: a document's estimate is added to in query-token order, one float32 add per token that
// reaches it, starting from 0. Tokens that do not reach it contribute nothing, which the reference writes as
// adding 0.0f (exact), so both sides round identically. Within a token the gains of its probes arrive in
// non-increasing order (checked at the boundary), so the first probed list holding a document carries that
// token's maximum and later ones are skipped by the stamp.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#ifdef FASTRANK_WITH_OPENMP
#include <omp.h>
#endif

#include "bindings.h"
#include "common.h"
#include "maxsim_boundary.h"
#include "tensor_arg.h"

namespace fastrank {
namespace {

namespace py = pybind11;

constexpr const char* kWhere = "centroid_candidates (cpp)";

struct CandidateProblem {
  const int64_t* probe_c;   // (Tq, P) row stride probe_stride
  const float* gain;        // (Tq, P) row stride gain_stride
  int64_t probe_stride, gain_stride, P;
  const int64_t* q_offsets;  // (B + 1,)
  int64_t B;
  const int64_t* ivf_offsets;  // (C + 1,)
  const int32_t* ivf_docs;     // (E,)
  int64_t n;                   // documents
  int64_t ndocs;
  int64_t* out_docs;     // (B, ndocs), -1 past counts[b]
  float* out_approx;     // (B, ndocs), aligned with out_docs; NaN past counts[b]
  int64_t* out_counts;   // (B,)
  int threads;
};

// A document's state in a thread's scratch: its running estimate and the tag of the last query token that
// reached it. One 8-byte slot, so an entry touches one cache line, not two.
struct Slot {
  float acc;
  uint32_t tag;
};

// Documents per pass over a query's lists. The lists are read in order and the slots at random. Each list is
// ascending, so a query's lists are walked one range of documents at a time, each list resuming where the
// previous range stopped, and one range's slots (256 KiB) serve every range and every query: they stay in
// L2. Measured at 100M tokens (1.3M documents, 760,000 entries a query, 2 threads of a Zen 4): a slot per
// document of the corpus (10 MiB a thread, walked 65,536 documents at a time) took 2.75 ms a query, as a
// query reaches 29% of the corpus and each first touch came from L3 or memory; one range's slots 1.6 ms at
// 32,768 documents a range (256 KiB of slots), 1.75 at 65,536 and 1.7 at 8,192.
constexpr int64_t kRangeDocs = int64_t(1) << 15;

inline uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

struct Candidate {
  float acc;
  int32_t doc;
};

enum class Bad { None, OutOfRange, Descending };

// One query's candidates. On a list entry that does not index a document, or that is below its list's
// previous entry, returns that entry and why.
Bad query_candidates(const CandidateProblem& p, int64_t b, std::vector<Slot>& slots, uint32_t& tag,
                     std::vector<int32_t>& touched, std::vector<int64_t>& cursor, std::vector<Candidate>& ranked,
                     int64_t& bad_entry) {
  // The documents first reached in the current range: at most kRangeDocs. Every entry writes its document
  // at touched[nt] and only a first reach advances nt, so once a full range is reached the next entry writes
  // one past the last: hence the one spare.
  touched.resize(static_cast<size_t>(kRangeDocs) + 1);
  const int64_t l0 = p.q_offsets[b], L = p.q_offsets[b + 1] - l0, P = p.P;
  cursor.resize(static_cast<size_t>(2 * L * P));
  for (int64_t i = 0; i < L; ++i) {
    for (int64_t j = 0; j < P; ++j) {
      const int64_t c = p.probe_c[(l0 + i) * p.probe_stride + j];
      cursor[2 * (i * P + j)] = p.ivf_offsets[c];
      cursor[2 * (i * P + j) + 1] = p.ivf_offsets[c + 1];
    }
  }
  Slot* __restrict sl = slots.data();
  const int32_t* __restrict ivf = p.ivf_docs;
  ranked.clear();
  // Best estimate first, the lower document first among equal estimates (the reference's stable order): a
  // strict total order, so the best `ndocs` are one set however they are selected.
  auto better = [](const Candidate& x, const Candidate& y) { return x.acc > y.acc || (x.acc == y.acc && x.doc < y.doc); };
  for (int64_t lo = 0; lo < p.n; lo += kRangeDocs) {
    size_t nt = 0;
    const int64_t hi = std::min(lo + kRangeDocs, p.n);
    // Tags are per range and query token (token l0 + i has first_tag + i in this range), so a slot holding any
    // earlier range's or query's tag reads as unreached. When the tags would wrap, the slots are cleared.
    if (tag > std::numeric_limits<uint32_t>::max() - static_cast<uint32_t>(L) - 1) {
      std::fill(slots.begin(), slots.end(), Slot{0.0f, 0u});
      tag = 0;
    }
    const uint32_t first_tag = tag + 1;
    tag += static_cast<uint32_t>(L);
    for (int64_t i = 0; i < L; ++i) {
      const uint32_t t = first_tag + static_cast<uint32_t>(i);
      const float* g = p.gain + (l0 + i) * p.gain_stride;
      for (int64_t j = 0; j < P; ++j) {
        int64_t* cur = &cursor[2 * (i * P + j)];
        const int64_t e1 = cur[1];
        const float gj = g[j];
        int64_t e = cur[0], prev = lo;  // every entry of this list before e was below lo
        for (; e < e1; ++e) {
          const int64_t d = ivf[e];
          if (d >= hi) break;  // the rest of this list lies in later ranges (or past the documents)
          if (d < prev) {
            bad_entry = e;
            return d < 0 ? Bad::OutOfRange : Bad::Descending;
          }
          prev = d;
          // Branch-free: whether this token already counted d (an earlier, no worse probe) and whether the
          // query reaches d for the first time are both random per entry (at 100M tokens: 2.45 ms a query
          // with branches, 2.27 without, on 2 threads of a Zen 4). The selects are masks on the float's bits:
          // written as ternaries, gcc turned them back into branches.
          Slot& s = sl[d - lo];
          const uint32_t tg = s.tag;
          const uint32_t fresh = tg < first_tag, keep = 0u - static_cast<uint32_t>(tg == t);
          touched[nt] = static_cast<int32_t>(d);
          nt += fresh;
          const uint32_t add = float_bits(s.acc + gj), mf = 0u - fresh;
          const uint32_t acc = (float_bits(s.acc) & keep) | (((float_bits(gj) & mf) | (add & ~mf)) & ~keep);
          s.acc = bits_float(acc);
          s.tag = t;
        }
        cur[0] = e;
      }
    }
    // This range's estimates are final: read them while their slots are still in cache, into a heap of the
    // best `ndocs` so far with the worst on top: most documents lose to that worst one at a single compare,
    // and no array of every reached document (380,000 a query at 100M tokens) is kept for a final selection.
    for (size_t k = 0; k < nt; ++k) {
      const Candidate c{sl[touched[k] - lo].acc, touched[k]};
      if (static_cast<int64_t>(ranked.size()) < p.ndocs) {
        ranked.push_back(c);
        std::push_heap(ranked.begin(), ranked.end(), better);
      } else if (better(c, ranked.front())) {
        std::pop_heap(ranked.begin(), ranked.end(), better);
        ranked.back() = c;
        std::push_heap(ranked.begin(), ranked.end(), better);
      }
    }
  }
  for (int64_t k = 0; k < L * P; ++k) {
    if (cursor[2 * k] < cursor[2 * k + 1]) {  // an entry at or past n stopped this list
      bad_entry = cursor[2 * k];
      return Bad::OutOfRange;
    }
  }
  const int64_t keep = static_cast<int64_t>(ranked.size());
  std::sort(ranked.begin(), ranked.begin() + keep, [](const Candidate& x, const Candidate& y) { return x.doc < y.doc; });
  int64_t* od = p.out_docs + b * p.ndocs;
  float* oa = p.out_approx + b * p.ndocs;
  for (int64_t k = 0; k < keep; ++k) {
    od[k] = ranked[k].doc;
    oa[k] = ranked[k].acc;
  }
  p.out_counts[b] = keep;
  return Bad::None;
}

void run(const CandidateProblem& p, int64_t& bad_query, int64_t& bad_entry, Bad& why) {
  bad_query = -1;
#pragma omp parallel num_threads(p.threads) if (p.threads > 1 && p.B > 1)
  {
    std::vector<Slot> slots(static_cast<size_t>(std::min(p.n, kRangeDocs)), Slot{0.0f, 0u});
    std::vector<int32_t> touched;
    std::vector<int64_t> cursor;
    std::vector<Candidate> ranked;
    uint32_t tag = 0;
    int64_t my_bad_entry = -1, my_bad_query = -1;
    Bad my_why = Bad::None;
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < p.B; ++b) {
      if (my_bad_query >= 0) continue;
      int64_t e = -1;
      const Bad w = query_candidates(p, b, slots, tag, touched, cursor, ranked, e);
      if (w != Bad::None) {
        my_bad_query = b;
        my_bad_entry = e;
        my_why = w;
      }
    }
    if (my_bad_query >= 0) {
#pragma omp critical
      if (bad_query < 0 || my_bad_query < bad_query) {
        bad_query = my_bad_query;
        bad_entry = my_bad_entry;
        why = my_why;
      }
    }
  }
}

void centroid_candidates_cpu(py::handle probe_obj, py::handle gain_obj, py::handle q_off_obj, py::handle ivf_off_obj,
                             py::handle ivf_docs_obj, int64_t n, int64_t ndocs, py::handle docs_out_obj,
                             py::handle approx_out_obj, py::handle counts_out_obj, int threads) {
  const TensorArg probe = tensor_arg(probe_obj, "probe_c", kWhere), gain = tensor_arg(gain_obj, "gain", kWhere);
  const TensorArg q_off = tensor_arg(q_off_obj, "q_offsets", kWhere);
  const TensorArg ivf_off = tensor_arg(ivf_off_obj, "ivf_offsets", kWhere);
  const TensorArg ivf_docs = tensor_arg(ivf_docs_obj, "ivf_docs", kWhere);
  const TensorArg docs_out = tensor_arg(docs_out_obj, "out_docs", kWhere);
  const TensorArg approx_out = tensor_arg(approx_out_obj, "out_approx", kWhere);
  const TensorArg counts_out = tensor_arg(counts_out_obj, "out_counts", kWhere);
  for (const TensorArg* t : {&probe, &gain, &q_off, &ivf_off, &ivf_docs, &docs_out, &approx_out, &counts_out})
    check_device(*t, false, kWhere);
  check_threads(threads, kWhere);
  check_elem(probe, Elem::Int64, kWhere);
  FASTRANK_CHECK(probe.dim() == 2, kWhere << ": probe_c must have shape (Tq, P), got " << probe.shape_text());
  check_inner_contiguous(probe, kWhere);
  const int64_t Tq = probe.size[0], P = probe.size[1];
  check_elem(gain, Elem::Float32, kWhere);
  check_shape(gain, {Tq, P}, kWhere);
  check_inner_contiguous(gain, kWhere);
  FASTRANK_CHECK(Tq < (int64_t(1) << 31), kWhere << ": at most 2^31 - 1 query tokens a call, got " << Tq);
  check_offsets(q_off, Tq, kWhere);
  const int64_t B = q_off.size[0] - 1;
  check_elem(ivf_docs, Elem::Int32, kWhere);
  FASTRANK_CHECK(ivf_docs.dim() == 1, kWhere << ": ivf_docs must be 1-D, got " << ivf_docs.shape_text());
  check_contiguous(ivf_docs, kWhere);
  check_offsets(ivf_off, ivf_docs.size[0], kWhere);
  const int64_t C = ivf_off.size[0] - 1;
  FASTRANK_CHECK(n >= 0 && n <= (int64_t(1) << 31), kWhere << ": n must be in [0, 2^31], got " << n);
  FASTRANK_CHECK(ndocs >= 1, kWhere << ": ndocs must be >= 1, got " << ndocs);
  check_output(docs_out, Elem::Int64, {B, ndocs}, kWhere);
  check_output(approx_out, Elem::Float32, {B, ndocs}, kWhere);
  check_output(counts_out, Elem::Int64, {B}, kWhere);
  const int64_t* pc = probe.data<int64_t>();
  const float* g = gain.data<float>();
  for (int64_t l = 0; l < Tq; ++l) {
    for (int64_t j = 0; j < P; ++j) {
      const int64_t c = pc[l * probe.stride[0] + j];
      FASTRANK_CHECK(c >= 0 && c < C, kWhere << ": probe_c[" << l << ", " << j << "] = " << c << " does not index the "
                                             << C << " lists of ivf_offsets (0 .. " << C - 1 << ")");
      const float v = g[l * gain.stride[0] + j];
      FASTRANK_CHECK(v >= 0.0f, kWhere << ": gain[" << l << ", " << j << "] = " << v
                                       << ": gains must be >= 0 (not NaN)");
      FASTRANK_CHECK(j == 0 || v <= g[l * gain.stride[0] + j - 1],
                     kWhere << ": each row of gain must be non-increasing (probes best first), got gain[" << l << ", "
                            << j << "] = " << v << " > gain[" << l << ", " << j - 1 << "]");
    }
  }
  int64_t* od = docs_out.mutable_data<int64_t>();
  float* oa = approx_out.mutable_data<float>();
  std::fill(od, od + B * ndocs, int64_t(-1));
  std::fill(oa, oa + B * ndocs, std::numeric_limits<float>::quiet_NaN());
  if (B == 0) return;
  CandidateProblem p{pc, g, probe.stride[0], gain.stride[0], P, q_off.data<int64_t>(), B, ivf_off.data<int64_t>(),
                     ivf_docs.data<int32_t>(), n, ndocs, od, oa, counts_out.mutable_data<int64_t>(), threads};
  int64_t bad_query = -1, bad_entry = -1;
  Bad why = Bad::None;
  {
    py::gil_scoped_release nogil;
    run(p, bad_query, bad_entry, why);
  }
  FASTRANK_CHECK(why != Bad::OutOfRange, kWhere << ": ivf_docs[" << bad_entry << "] = "
                                               << ivf_docs.data<int32_t>()[bad_entry] << " (probed by query "
                                               << bad_query << ") does not index the " << n << " documents (0 .. "
                                               << n - 1 << ")");
  FASTRANK_CHECK(why != Bad::Descending, kWhere << ": each list of ivf_docs must be ascending, but ivf_docs["
                                               << bad_entry << "] = " << ivf_docs.data<int32_t>()[bad_entry]
                                               << " (probed by query " << bad_query
                                               << ") is below an earlier entry of its list");
}

void register_centroid_candidates(py::module_& m) {
  using py::arg;
  m.def("centroid_candidates_cpu", &centroid_candidates_cpu,
        "Stage-1 candidates of a token index on CPU: probe_c int64 (Tq, P) lists probed by each query token and gain "
        "float32 (Tq, P) their gains, each row non-increasing; q_offsets int64 (B + 1,) into the rows; ivf_offsets "
        "int64 (C + 1,) and ivf_docs int32 (E,) the inverted lists, each ascending (every probed entry checked: in "
        "[0, n) and not below its list's previous one); "
        "writes each query's best ndocs documents by the centroid-interaction estimate, ascending, into out_docs "
        "int64 (B, ndocs) (-1 padded), their estimates into out_approx float32 (B, ndocs) and their number into "
        "out_counts int64 (B,).",
        arg("probe_c"), arg("gain"), arg("q_offsets"), arg("ivf_offsets"), arg("ivf_docs"), arg("n"), arg("ndocs"),
        arg("out_docs"), arg("out_approx"), arg("out_counts"), arg("threads"));
}

}  // namespace

FASTRANK_REGISTER(register_centroid_candidates);

}  // namespace fastrank

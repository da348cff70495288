// The arithmetic-ceiling probe's entry point (csrc/cpu/peak_cpu.h): the selected ISA path's loop on every
// OpenMP thread at once, the way the kernels it is compared with run.
#include <string>

#include "bindings.h"
#include "common.h"
#include "cpu/cpu_isa.h"
#include "cpu/peak_cpu.h"

FASTRANK_DECLARE_PEAK_ISA(isa_scalar)
#ifdef FASTRANK_ISA_AVX2
FASTRANK_DECLARE_PEAK_ISA(isa_avx2)
#endif
#ifdef FASTRANK_ISA_AVX512
FASTRANK_DECLARE_PEAK_ISA(isa_avx512)
#endif
#ifdef FASTRANK_ISA_AVX512BF16
FASTRANK_DECLARE_PEAK_ISA(isa_avx512bf16)
#endif
#ifdef FASTRANK_ISA_AMX
FASTRANK_DECLARE_AMX_PEAK(isa_amx)
#endif

namespace fastrank {
namespace {

using PeakFn = double (*)(int64_t);

double no_tiles(int64_t) { return 0; }

// The unit an ISA path runs (amx: the avx512bf16 unit's vector loops, and its own tile loop).
PeakFn peak_fn(cpu::Isa isa, const std::string& kind) {
  if (kind == "amx_tile") {
#ifdef FASTRANK_ISA_AMX
    if (isa == cpu::Isa::Amx) return isa_amx::amx_tile_peak;
#endif
    return no_tiles;
  }
  const bool bf16 = kind == "bf16_dot";
  const int level = static_cast<int>(isa);
  (void)level;
#ifdef FASTRANK_ISA_AVX512BF16
  if (level >= static_cast<int>(cpu::Isa::Avx512Bf16)) return bf16 ? isa_avx512bf16::bf16_dot_peak : isa_avx512bf16::fma_peak;
#endif
#ifdef FASTRANK_ISA_AVX512
  if (level >= static_cast<int>(cpu::Isa::Avx512)) return bf16 ? isa_avx512::bf16_dot_peak : isa_avx512::fma_peak;
#endif
#ifdef FASTRANK_ISA_AVX2
  if (level >= static_cast<int>(cpu::Isa::Avx2)) return bf16 ? isa_avx2::bf16_dot_peak : isa_avx2::fma_peak;
#endif
  return bf16 ? isa_scalar::bf16_dot_peak : isa_scalar::fma_peak;
}

double run_peak(PeakFn fn, int64_t iters, int threads) {
  double total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
  total += fn(iters);
  return total;
}

namespace py = pybind11;

void register_peak(py::module_& m) {
  m.def(
      "cpu_peak_flop",
      [](const std::string& isa, const std::string& kind, int64_t iters, int threads) {
        constexpr const char* where = "cpu_peak_flop";
        const cpu::Isa path = cpu::runnable_isa(isa, where);
        FASTRANK_CHECK(kind == "fma" || kind == "bf16_dot" || kind == "amx_tile",
                       where << ": kind must be 'fma', 'bf16_dot' or 'amx_tile', got '" << kind << "'");
        FASTRANK_CHECK(iters >= 1 && iters <= (int64_t(1) << 40), where << ": iters must be in [1, 2^40], got " << iters);
        FASTRANK_CHECK(threads >= 1 && threads <= 4096, where << ": threads must be in [1, 4096], got " << threads);
        const PeakFn fn = peak_fn(path, kind);
        py::gil_scoped_release release;
        return run_peak(fn, iters, threads);
      },
      "Floating-point operations done by `threads` OpenMP threads each running `iters` rounds of the ISA path's "
      "register-only multiply-add loop (kind 'fma': float32 FMA; 'bf16_dot': vdpbf16ps; 'amx_tile': tdpbf16ps on "
      "AMX tiles; 0 where the path has none). Time the call to get the path's peak rate.",
      py::arg("isa"), py::arg("kind"), py::arg("iters"), py::arg("threads"));
}

}  // namespace

FASTRANK_REGISTER(register_peak);

}  // namespace fastrank

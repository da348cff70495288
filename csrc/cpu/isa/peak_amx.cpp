// Peak loops for the amx unit: the AVX-512 loops of peak_kernels.inc compiled again, and the tile loop.
// Compiled with this ISA's flags only (CMakeLists.txt); entered only after cpu_isa.cpp has checked the CPU
// and Linux has granted the tile state.
#define FASTRANK_ISA_NS isa_amx
#include "cpu/peak_kernels.inc"

#include <cstring>

namespace fastrank {
namespace isa_amx {
namespace {
#include "cpu/amx_tiles.inc"
}  // namespace

double amx_tile_peak(int64_t iters) {
  amx_configure();
  alignas(64) uint16_t a[512], b[512];
  for (int i = 0; i < 512; ++i) {
    a[i] = 0x3f80;  // 1.0
    b[i] = 0x3a83;  // about 1e-3: the sums stay finite for any iteration count we time
  }
  _tile_loadd(6, a, 64);
  _tile_loadd(7, b, 64);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_zero(4);
  _tile_zero(5);
  for (int64_t r = 0; r < iters; ++r) {  // six independent chains cover the instruction's latency
    _tile_dpbf16ps(0, 6, 7);
    _tile_dpbf16ps(1, 6, 7);
    _tile_dpbf16ps(2, 6, 7);
    _tile_dpbf16ps(3, 6, 7);
    _tile_dpbf16ps(4, 6, 7);
    _tile_dpbf16ps(5, 6, 7);
  }
  alignas(64) float c[256];
  _tile_stored(0, c, 64);
  compiler_barrier();
  volatile float sink = c[0];
  (void)sink;
  _tile_release();
  return 2.0 * 16 * 16 * 32 * 6 * static_cast<double>(iters);
}

}  // namespace isa_amx
}  // namespace fastrank

// Runtime CPU feature detection for the per-ISA kernels. Compiled for the baseline target, so it runs
// on any CPU; the ISA translation units are only entered after this says their instructions exist and
// the OS saves their registers.
#include "cpu/cpu_isa.h"

#include <cerrno>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define FASTRANK_X86 1
#endif
#if defined(__linux__) && defined(FASTRANK_X86)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "bindings.h"
#include "common.h"

namespace fastrank {
namespace cpu {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return "scalar";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512: return "avx512";
    case Isa::Avx512Bf16: return "avx512bf16";
    case Isa::Amx: return "amx";
  }
  return "unknown";
}

namespace {

// Which ISA translation units this build compiled (CMakeLists.txt defines these per compiler support).
bool compiled(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return true;
#ifdef FASTRANK_ISA_AVX2
    case Isa::Avx2: return true;
#endif
#ifdef FASTRANK_ISA_AVX512
    case Isa::Avx512: return true;
#endif
#ifdef FASTRANK_ISA_AVX512BF16
    case Isa::Avx512Bf16: return true;
#endif
#ifdef FASTRANK_ISA_AMX
    case Isa::Amx: return true;
#endif
    default: return false;
  }
}

#ifdef FASTRANK_X86
struct Regs { unsigned a = 0, b = 0, c = 0, d = 0; };
Regs cpuid(unsigned leaf, unsigned sub) {
  Regs r;
  if (!__get_cpuid_count(leaf, sub, &r.a, &r.b, &r.c, &r.d)) r = Regs{};
  return r;
}
unsigned long long xcr0() {
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<unsigned long long>(hi) << 32) | lo;
}
inline bool bit(unsigned v, int i) { return (v >> i) & 1u; }

// Linux keeps AMX tile data disabled until a process asks (ARCH_REQ_XCOMP_PERM); the request covers
// every thread of the process. Returns "" or why it failed.
std::string request_amx_permission() {
#if defined(__linux__)
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0)
    return std::string("the kernel refused AMX tile permission (arch_prctl ARCH_REQ_XCOMP_PERM: ") +
           std::strerror(errno) + ")";
  return "";
#else
  return "AMX permission is only requested on Linux";
#endif
}
#endif

IsaSupport detect() {
  IsaSupport s;
  for (int i = 0; i < kIsaCount; ++i) { s.ok[i] = false; s.reason[i].clear(); }
  s.ok[static_cast<int>(Isa::Scalar)] = true;
#ifdef FASTRANK_X86
  const Regs l1 = cpuid(1, 0), l7 = cpuid(7, 0), l71 = cpuid(7, 1);
  const bool osxsave = bit(l1.c, 27);
  const unsigned long long x = osxsave ? xcr0() : 0;
  const bool os_ymm = (x & 0x6) == 0x6, os_zmm = (x & 0xe6) == 0xe6, os_tile = (x & 0x60000) == 0x60000;
  struct Flag { const char* name; bool on; };
  const Flag flags[] = {
      {"fma", bit(l1.c, 12)},          {"f16c", bit(l1.c, 29)},          {"avx", bit(l1.c, 28)},
      {"avx2", bit(l7.b, 5)},          {"avx512f", bit(l7.b, 16)},       {"avx512dq", bit(l7.b, 17)},
      {"avx512bw", bit(l7.b, 30)},     {"avx512vl", bit(l7.b, 31)},      {"avx512_vnni", bit(l7.c, 11)},
      {"avx512_bf16", bit(l71.a, 5)},  {"avx_vnni", bit(l71.a, 4)},      {"avx512_fp16", bit(l7.d, 23)},
      {"amx_bf16", bit(l7.d, 22)},     {"amx_tile", bit(l7.d, 24)},      {"amx_int8", bit(l7.d, 25)},
  };
  auto has = [&](const char* name) {
    for (const Flag& f : flags)
      if (std::strcmp(f.name, name) == 0) return f.on;
    return false;
  };
  for (const Flag& f : flags)
    if (f.on) s.flags.emplace_back(f.name);
  auto missing = [&](std::initializer_list<const char*> need) {
    std::string out;
    for (const char* n : need)
      if (!has(n)) out += (out.empty() ? "" : ", ") + std::string(n);
    return out;
  };
  auto decide = [&](Isa isa, std::initializer_list<const char*> need, bool os_ok, const char* os_what) {
    const int i = static_cast<int>(isa);
    const std::string m = missing(need);
    if (!m.empty()) s.reason[i] = "the CPU lacks " + m;
    else if (!os_ok) s.reason[i] = std::string("the OS does not enable ") + os_what;
    else s.ok[i] = true;
  };
  decide(Isa::Avx2, {"avx2", "fma", "f16c"}, os_ymm, "AVX state (XCR0)");
  decide(Isa::Avx512, {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"}, os_zmm,
         "AVX-512 state (XCR0)");
  decide(Isa::Avx512Bf16, {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_vnni"},
         os_zmm, "AVX-512 state (XCR0)");
  decide(Isa::Amx,
         {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_vnni", "amx_tile",
          "amx_bf16"},
         os_zmm && os_tile, "AMX tile state (XCR0)");
  const int amx = static_cast<int>(Isa::Amx);
  if (s.ok[amx] && compiled(Isa::Amx)) {
    const std::string why = request_amx_permission();
    if (!why.empty()) { s.ok[amx] = false; s.reason[amx] = why; }
  }
#else
  for (int i = 1; i < kIsaCount; ++i) s.reason[i] = "not an x86-64 CPU";
#endif
  for (int i = 1; i < kIsaCount; ++i) {
    if (s.ok[i] && !compiled(static_cast<Isa>(i))) {
      s.ok[i] = false;
      s.reason[i] = std::string("this build has no ") + isa_name(static_cast<Isa>(i)) +
                    " kernels (the compiler lacked its flags)";
    }
  }
  return s;
}

}  // namespace

const IsaSupport& isa_support() {
  static const IsaSupport support = detect();  // thread-safe static initialisation
  return support;
}

Isa runnable_isa(const std::string& name, const char* where) {
  const IsaSupport& s = isa_support();
  for (int i = 0; i < kIsaCount; ++i) {
    if (name != isa_name(static_cast<Isa>(i))) continue;
    if (!s.ok[i]) {
      std::string flags;
      for (const auto& f : s.flags) flags += (flags.empty() ? "" : " ") + f;
      FASTRANK_CHECK(false, where << ": the CPU ISA path '" << name << "' cannot run here: " << s.reason[i]
                                  << " (CPU flags found: " << (flags.empty() ? "none" : flags) << ")");
    }
    return static_cast<Isa>(i);
  }
  FASTRANK_CHECK(false, where << ": unknown CPU ISA path '" << name
                              << "' (expected one of scalar, avx2, avx512, avx512bf16, amx)");
  return Isa::Scalar;
}


namespace {
void register_cpu_isa(pybind11::module_& m) {
  m.def("cpu_isa_support", []() {
    const IsaSupport& s = isa_support();
    pybind11::list out;
    for (int i = 0; i < kIsaCount; ++i)
      out.append(pybind11::make_tuple(isa_name(static_cast<Isa>(i)), s.ok[i], s.reason[i]));
    return out;
  }, "[(name, supported, reason)] for every CPU ISA path, lowest first");
  m.def("cpu_flags", []() { return isa_support().flags; }, "CPU features found by cpuid");
}
}  // namespace

FASTRANK_REGISTER(register_cpu_isa);

}  // namespace cpu
}  // namespace fastrank

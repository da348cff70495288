// Which instruction-set paths this CPU, this kernel (OS) and this build can run, decided once per process.
#pragma once
#include <string>
#include <vector>

#include "cpu/maxsim_cpu.h"

namespace fastrank {
namespace cpu {

struct IsaSupport {
  bool ok[kIsaCount];
  std::string reason[kIsaCount];   // why a path cannot run ("" when it can)
  std::vector<std::string> flags;  // the CPU features found, /proc/cpuinfo spelling
};

// Detected on first call (cpuid, xgetbv, and for AMX the arch_prctl permission request).
const IsaSupport& isa_support();

// The path named `name` (what FASTRANK_CPU_ISA and fastrank.cpu_isa use), checked to run here: an unknown
// name, or a path this CPU, kernel or build cannot run, is a ValueError from entry point `where` saying why.
Isa runnable_isa(const std::string& name, const char* where);

}  // namespace cpu
}  // namespace fastrank

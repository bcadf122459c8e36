// The instruction-set extensions this library was compiled to use, checked against the CPU before anything else
// of the library runs, so that a library built for a newer CPU says so instead of dying of an illegal instruction.
// The build names its level (VISIONMAMBA_ISA_LEVEL, e.g. "x86-64-v4"); the check itself is compiled for the
// x86-64 baseline, whatever the rest of the file is compiled for.
#pragma once

#include <cstdio>

#ifndef VISIONMAMBA_ISA_LEVEL
#define VISIONMAMBA_ISA_LEVEL "this machine's level"
#endif

#if defined(__GNUC__) && defined(__x86_64__)
#define VISIONMAMBA_BASELINE __attribute__((target("arch=x86-64")))
#else
#define VISIONMAMBA_BASELINE
#endif

namespace visionmamba {

// The first extension the library needs that this CPU lacks, or nullptr.
VISIONMAMBA_BASELINE inline const char* missing_isa_extension() {
#if defined(VISIONMAMBA_TEST_MISSING_ISA)  // the tests' build: as if the CPU lacked this extension
  return VISIONMAMBA_TEST_MISSING_ISA;
#elif defined(__GNUC__) && defined(__x86_64__)
  __builtin_cpu_init();
  struct Need {
    bool compiled;
    bool present;
    const char* name;
  };
  const Need needs[] = {
#if defined(__AVX512F__)
      {true, __builtin_cpu_supports("avx512f") != 0, "avx512f"},
#endif
#if defined(__AVX512BW__)
      {true, __builtin_cpu_supports("avx512bw") != 0, "avx512bw"},
#endif
#if defined(__AVX512DQ__)
      {true, __builtin_cpu_supports("avx512dq") != 0, "avx512dq"},
#endif
#if defined(__AVX512VL__)
      {true, __builtin_cpu_supports("avx512vl") != 0, "avx512vl"},
#endif
#if defined(__AVX2__)
      {true, __builtin_cpu_supports("avx2") != 0, "avx2"},
#endif
#if defined(__FMA__)
      {true, __builtin_cpu_supports("fma") != 0, "fma"},
#endif
#if defined(__BMI2__)
      {true, __builtin_cpu_supports("bmi2") != 0, "bmi2"},
#endif
      {false, true, ""},
  };
  for (const Need& need : needs)
    if (need.compiled && !need.present) return need.name;
  return nullptr;
#else
  return nullptr;
#endif
}

// The message of a library that cannot run here (written into buffer); nullptr when it can.
VISIONMAMBA_BASELINE inline const char* isa_mismatch(char* buffer, int size, const char* portable_name) {
  const char* missing = missing_isa_extension();
  if (missing == nullptr) return nullptr;
  std::snprintf(buffer, static_cast<size_t>(size),
                "visionmamba: this library was built for %s and this CPU lacks %s; load %s, the portable build "
                "beside it, instead",
                VISIONMAMBA_ISA_LEVEL, missing, portable_name);
  return buffer;
}

}  // namespace visionmamba

// backend "auto": the fastest gated variant stlm-bench timed on this machine (ENGINE/timings.json), else the
// first gated variant of the static preference for this CPU's class. The same rules as stlm_deploy/timings.py;
// docs/engine_format.md "Default backend and precision" and "Measured choice (timings.json)".
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include "spec.hpp"

namespace stlm::detail {

// "<model name> [<ISA flags>]" from /proc/cpuinfo text (the flags that decide which kernels run).
std::string machine_key(const std::string& cpuinfo);
std::string machine_key();  // of this machine

// Every flag of the first "flags" line of /proc/cpuinfo text (of this machine without an argument).
std::vector<std::string> cpu_flags(const std::string& cpuinfo);
std::vector<std::string> cpu_flags();

// "amx" | "avx512_bf16" | "vnni" | "other": the key of the static preference (timings.py cpu_class).
std::string cpu_class(const std::vector<std::string>& flags);

// Whether the export gated `label` ("openvino/bf16", ...) on `artifact` (timings.py gated).
bool gated(const EngineSpec& spec, const std::string& label, const std::string& artifact);

struct Pick {
  std::string backend;    // "" = keep the static order
  std::string precision;  // fp32 | bf16 | int8 | fp16
  std::string note;       // why (one line, goes into Detector::notes())
};

// The fastest gated, current variant recorded for this machine and thread count, among `backends`.
// A damaged file is reported in the note and ignored (the file is advisory).
Pick measured_pick(const std::filesystem::path& engine_dir, const EngineSpec& spec, int threads,
                   const std::vector<std::string>& backends);

// Without a timing: the first gated variant of the static preference for a CPU with `flags`, among `backends`.
Pick static_pick(const EngineSpec& spec, const std::vector<std::string>& backends,
                 const std::vector<std::string>& flags);

}  // namespace stlm::detail

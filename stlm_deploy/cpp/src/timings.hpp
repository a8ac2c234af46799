// backend "auto": the fastest gated variant stlm-bench timed on this machine (ENGINE/timings.json).
// The same rule as stlm_deploy/timings.py; docs/engine_format.md "Measured choice (timings.json)".
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include "spec.hpp"

namespace stlm::detail {

// "<model name> [<ISA flags>]" from /proc/cpuinfo text (the flags that decide which kernels run).
std::string machine_key(const std::string& cpuinfo);
std::string machine_key();  // of this machine

struct Pick {
  std::string backend;    // "" = keep the static order
  std::string precision;  // fp32 | bf16 | int8 | fp16
  std::string note;       // why (one line, goes into Detector::notes())
};

// The fastest gated, current variant recorded for this machine and thread count, among `backends`.
// A damaged file is reported in the note and ignored (the file is advisory).
Pick measured_pick(const std::filesystem::path& engine_dir, const EngineSpec& spec, int threads,
                   const std::vector<std::string>& backends);

}  // namespace stlm::detail

#include "timings.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>
#include <tuple>

#include <sys/utsname.h>

#include <nlohmann/json.hpp>

#include "common.hpp"

namespace stlm::detail {

namespace {

using json = nlohmann::json;

const char* const kIsaFlags[] = {"avx2", "avx512f", "avx512_vnni", "avx512_bf16",
                                 "avx512_fp16", "amx_bf16", "amx_int8", "amx_fp16"};
// Selectable variants, in the order that breaks exact ties (timings.py VARIANTS).
const std::vector<std::string> kVariants = {"openvino/int8", "openvino/bf16", "openvino/fp16", "openvino/fp32",
                                            "ort/int8", "ort/fp32", "ort/fp16"};
// timings.py STATIC_PREFERENCE: per CPU class, the variants tried in order without a timing.
const std::vector<std::pair<std::string, std::vector<std::string>>> kStaticPreference = {
    {"amx", {"openvino/bf16", "openvino/fp16", "openvino/int8", "openvino/fp32", "ort/fp32"}},
    {"avx512_bf16", {"openvino/int8", "openvino/bf16", "openvino/fp32", "ort/fp32"}},
    {"vnni", {"openvino/int8", "openvino/fp32", "ort/fp32"}},
    {"other", {"openvino/fp32", "ort/fp32"}},
};

bool has(const std::vector<std::string>& v, const std::string& x) { return std::find(v.begin(), v.end(), x) != v.end(); }

// The conventional artifact of each variant (engines without "variants" name nothing else; timings.py _ARTIFACT).
std::string conventional_artifact(const std::string& label) {
  if (label == "ort/fp32") return "model.onnx";
  if (label == "ort/fp16") return "model.fp16.onnx";
  if (label == "ort/int8") return "model.int8.onnx";
  if (label == "openvino/int8") return "openvino/model.int8.xml";
  return "openvino/model.xml";
}

std::string variant_artifact(const EngineSpec& spec, const std::string& label) {
  const VariantDesc* v = spec.variant(label);
  return v ? v->artifact : conventional_artifact(label);
}

std::string trim_collapse(const std::string& s) {
  std::istringstream in(s);
  std::string word, out;
  while (in >> word) out += (out.empty() ? "" : " ") + word;
  return out;
}

std::string ms(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f", v);
  return buf;
}

}  // namespace

namespace {

// The first "model name" and "flags" of /proc/cpuinfo text (timings.py cpu_model_and_flags).
std::pair<std::string, std::vector<std::string>> model_and_flags(const std::string& cpuinfo) {
  std::string model;
  std::vector<std::string> flags;
  bool have_flags = false;
  std::istringstream lines(cpuinfo);
  for (std::string line; std::getline(lines, line);) {
    const auto colon = line.find(':');
    if (colon == std::string::npos) continue;
    const std::string name = trim_collapse(line.substr(0, colon));
    const std::string value = line.substr(colon + 1);
    if (name == "model name" && model.empty()) {
      model = trim_collapse(value);
    } else if (name == "flags" && !have_flags) {
      have_flags = true;
      std::istringstream in(value);
      for (std::string f; in >> f;) flags.push_back(f);
    }
  }
  return {model, flags};
}

std::string this_cpuinfo() {
  try {
    return read_file("/proc/cpuinfo");
  } catch (const std::exception&) {
    return "";
  }
}

}  // namespace

std::vector<std::string> cpu_flags(const std::string& cpuinfo) { return model_and_flags(cpuinfo).second; }
std::vector<std::string> cpu_flags() { return cpu_flags(this_cpuinfo()); }

std::string cpu_class(const std::vector<std::string>& flags) {
  if (has(flags, "amx_bf16")) return "amx";
  if (has(flags, "avx512_bf16")) return "avx512_bf16";
  if (has(flags, "avx512_vnni") || has(flags, "avx_vnni")) return "vnni";
  return "other";
}

// Listed, and published by its gate: the export's "variants" verdict where the engine has one; else the older
// rule (bf16/fp16 where the IR records that inference_precision, int8/fp16 artifacts listed with that precision).
bool gated(const EngineSpec& spec, const std::string& label, const std::string& artifact) {
  const ArtifactDesc* entry = spec.artifact(artifact);
  if (!entry) return false;
  if (!spec.variants.empty()) {
    const VariantDesc* v = spec.variant(label);
    return v && v->gated && v->artifact == artifact;
  }
  const std::string backend = label.substr(0, label.find('/'));
  const std::string precision = label.substr(label.find('/') + 1);
  if (backend == "openvino" && (precision == "bf16" || precision == "fp16"))
    return artifact.size() > 4 && artifact.compare(artifact.size() - 4, 4, ".xml") == 0 &&
           entry->inference_precision.value_or("") == precision;
  if (backend == "openvino" && precision == "fp32")  // an IR's own precision is its weight storage (fp16)
    return entry->precision.value_or("") != "int8";
  if (precision == "int8" || precision == "fp16") return entry->precision.value_or("") == precision;
  return precision == "fp32" && entry->precision.value_or("fp32") == "fp32";
}

std::string machine_key(const std::string& cpuinfo) {
  auto [model, flags] = model_and_flags(cpuinfo);
  if (model.empty()) {  // e.g. ARM Linux: the machine name, as Python's platform.machine()
    struct utsname u {};
    model = uname(&u) == 0 && u.machine[0] ? u.machine : "unknown";
  }
  std::string isa;
  for (const char* f : kIsaFlags)
    if (std::find(flags.begin(), flags.end(), f) != flags.end()) isa += (isa.empty() ? "" : " ") + std::string(f);
  return model + " [" + isa + "]";
}

std::string machine_key() { return machine_key(this_cpuinfo()); }

Pick measured_pick(const std::filesystem::path& engine_dir, const EngineSpec& spec, int threads,
                   const std::vector<std::string>& backends) {
  const auto path = engine_dir / "timings.json";
  const std::string where = display_path(path);
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec))
    return {"", "", "no timings.json: static order (run stlm-bench --engine on this machine to let auto pick the "
                    "fastest variant)"};
  json data;
  try {
    data = json::parse(read_file(path));
  } catch (const std::exception& e) {
    return {"", "", where + ": not readable JSON (" + first_line(e.what()) + "); ignored, static order"};
  }
  if (!data.is_object() || !data.contains("records") || !data["records"].is_array())
    return {"", "", where + ": field 'records' must be a list; ignored, static order"};
  const std::string key = machine_key();
  const json* record = nullptr;
  for (const auto& r : data["records"]) {
    if (r.is_object() && r.contains("machine") && r["machine"] == key && r.contains("threads") &&
        r["threads"].is_number_integer() && r["threads"].get<long long>() == threads) {
      record = &r;
      break;
    }
  }
  if (!record)
    return {"", "", where + ": no timing for this machine (" + key + ", " + std::to_string(threads) +
                        " threads): static order"};
  if (!record->contains("variants") || !(*record)["variants"].is_object())
    return {"", "", where + ": field 'variants' must be an object; ignored, static order"};
  std::vector<std::tuple<double, size_t, std::string>> timed;
  std::vector<std::pair<double, std::string>> ungated;
  for (const auto& [label, v] : (*record)["variants"].items()) {
    const auto it = std::find(kVariants.begin(), kVariants.end(), label);
    const std::string backend = label.substr(0, label.find('/'));
    if (it == kVariants.end() || std::find(backends.begin(), backends.end(), backend) == backends.end() ||
        !v.is_object())
      continue;
    const bool ok = v.contains("p50_ms") && v["p50_ms"].is_number() && std::isfinite(v["p50_ms"].get<double>()) &&
                    v["p50_ms"].get<double>() > 0 && v.contains("artifact") && v["artifact"].is_string();
    if (!ok)
      return {"", "", where + ": field 'variants." + label +
                          "' must have a positive p50_ms and an artifact; ignored, static order"};
    const std::string artifact = v["artifact"].get<std::string>();
    const ArtifactDesc* entry = spec.artifact(artifact);
    const bool current = entry && v.contains("sha256") && v["sha256"].is_string() &&
                         v["sha256"].get<std::string>() == entry->sha256;
    if (!current) continue;  // re-exported (or removed) since it was timed
    if (!gated(spec, label, artifact)) {
      ungated.emplace_back(v["p50_ms"].get<double>(), label);
      continue;
    }
    timed.emplace_back(v["p50_ms"].get<double>(), static_cast<size_t>(it - kVariants.begin()), label);
  }
  if (timed.empty()) return {"", "", where + ": no gated, current variant timed on this machine: static order"};
  std::sort(timed.begin(), timed.end());
  const double best_ms = std::get<0>(timed.front());
  const std::string& best = std::get<2>(timed.front());
  std::string others;
  for (size_t i = 1; i < timed.size(); ++i)
    others += (others.empty() ? "" : ", ") + std::get<2>(timed[i]) + " " + ms(std::get<0>(timed[i]));
  std::sort(ungated.begin(), ungated.end());
  std::string faster;
  for (const auto& [t, label] : ungated)
    if (t < best_ms) faster += (faster.empty() ? "" : ", ") + label + " " + ms(t);
  return {best.substr(0, best.find('/')), best.substr(best.find('/') + 1),
          best + " is the fastest gated variant timed here (" + ms(best_ms) + " ms p50" +
              (others.empty() ? "" : "; " + others) + (faster.empty() ? "" : "; faster but not gated: " + faster) +
              "; timings.json)"};
}

Pick static_pick(const EngineSpec& spec, const std::vector<std::string>& backends,
                 const std::vector<std::string>& flags) {
  const std::string kind = cpu_class(flags);
  const std::vector<std::string>* order = nullptr;
  for (const auto& [k, v] : kStaticPreference)
    if (k == kind) order = &v;
  std::string chain;
  for (const auto& l : *order) chain += (chain.empty() ? "" : " > ") + l;
  for (const auto& label : *order) {
    const std::string backend = label.substr(0, label.find('/'));
    const std::string precision = label.substr(label.find('/') + 1);
    if (!has(backends, backend)) continue;
    if (precision == "bf16" && !has(flags, "avx512_bf16") && !has(flags, "amx_bf16")) continue;
    if (precision == "fp16" && !has(flags, "avx512_fp16") && !has(flags, "amx_fp16")) continue;
    if (!gated(spec, label, variant_artifact(spec, label))) continue;
    std::string weak;
    const VariantDesc* v = spec.variant(label);
    if (v && v->evidence_sufficient && !*v->evidence_sufficient)
      weak = "; gated on weak evidence (" + (v->evidence_images ? std::to_string(*v->evidence_images) : "?") +
             " images, see stlm.json variants)";
    return {backend, precision,
            label + " is the first gated variant of the static preference for this CPU (" + kind + ": " + chain + ")" +
                weak};
  }
  return {"", "", "no gated variant of the static preference for this CPU (" + kind + ": " + chain +
                      ") can run here: static order"};
}

}  // namespace stlm::detail

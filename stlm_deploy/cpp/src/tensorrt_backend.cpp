// TensorRT backend (TensorRT >= 10: name-based I/O, setInputShape, setTensorAddress, enqueueV3).
// Compiled only when CMake finds NvInfer.h, libnvinfer and the CUDA runtime (STLM_HAVE_TENSORRT).
//
// A plan only deserialises on the TensorRT version and GPU architecture that built it, so the runtime
// compares the plan's sidecar (model.plan.json: tensorrt_version, gpu_name, compute_capability, flags,
// onnx_sha256) with the installed TensorRT and the current GPU first, with the same rules and one-line
// messages as stlm_deploy/backends/tensorrt.py (check_plan_compatibility / check_plan_source).
// Thread-safety: one execution context + stream, calls serialised by a mutex.
#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <set>
#include <tuple>

#include <nlohmann/json.hpp>

#include "backend.hpp"
#include "common.hpp"

#if NV_TENSORRT_MAJOR < 10
#error "the STLM TensorRT backend needs TensorRT >= 10 (enqueueV3 and the name-based tensor API)"
#endif

namespace stlm::detail {

namespace {

using json = nlohmann::json;

const char* kRebuild = "rebuild the plan on this machine (stlm-export --target tensorrt) or use backend 'openvino'";

class PlanMismatch : public BackendUnavailable {
 public:
  using BackendUnavailable::BackendUnavailable;
};

// "10.3.0.26" -> {10, 3, 0, 26}; stops at the first non-numeric part ("10.8.0.post1" -> {10, 8, 0}).
std::vector<int> parse_version(const std::string& v) {
  std::vector<int> parts;
  size_t i = 0;
  while (i < v.size()) {
    size_t j = i;
    while (j < v.size() && std::isdigit(static_cast<unsigned char>(v[j]))) ++j;
    if (j == i) break;
    parts.push_back(std::stoi(v.substr(i, j - i)));
    while (j < v.size() && v[j] != '.') ++j;
    i = j + 1;
  }
  if (parts.empty()) throw std::invalid_argument("not a version: '" + v + "'");
  while (parts.size() < 3) parts.push_back(0);
  return parts;
}

std::pair<int, int> parse_cc(const std::string& cc) {
  int major = 0, minor = 0;
  char tail = 0;
  if (std::sscanf(cc.c_str(), " %d.%d %c", &major, &minor, &tail) != 2)
    throw std::invalid_argument("compute capability must look like '8.9', got '" + cc + "'");
  return {major, minor};
}

std::string v3(const std::vector<int>& v) {
  return std::to_string(v[0]) + "." + std::to_string(v[1]) + "." + std::to_string(v[2]);
}

std::set<std::string> flags_of(const json& side) {
  std::set<std::string> out;
  for (const char* key : {"flags", "builder_flags", "precision_flags"}) {
    auto it = side.find(key);
    if (it == side.end()) continue;
    auto up = [](std::string s) {
      std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::toupper(c); });
      return s;
    };
    if (it->is_array()) {
      for (const auto& x : *it) out.insert(up(x.is_string() ? x.get<std::string>() : x.dump()));
    } else if (it->is_object()) {
      for (const auto& [k, on] : it->items())
        if ((on.is_boolean() && on.get<bool>()) || (on.is_number() && on.get<double>() != 0)) out.insert(up(k));
    }
  }
  return out;
}

// Throws PlanMismatch (one line) when the plan described by `side` cannot run on this TensorRT/GPU.
void check_plan_compatibility(const json& side, const std::string& trt_version, const std::string& gpu_name,
                              const std::string& compute_capability, const std::string& where,
                              const std::string& side_where, std::vector<std::string>& notes) {
  if (!side.is_object())
    throw PlanMismatch(side_where + ": must be a JSON object describing the plan; re-export the TensorRT plan");
  for (const char* key : {"tensorrt_version", "compute_capability"}) {
    auto it = side.find(key);
    if (it == side.end() || !it->is_string() || it->get<std::string>().empty())
      throw PlanMismatch(side_where + ": field '" + key +
                         "' is missing or not a string, so the plan's compatibility cannot be checked; re-export "
                         "the TensorRT plan");
  }
  std::vector<int> built_v, here_v;
  std::pair<int, int> built_cc, here_cc;
  try {
    built_v = parse_version(side["tensorrt_version"].get<std::string>());
    here_v = parse_version(trt_version);
    built_cc = parse_cc(side["compute_capability"].get<std::string>());
    here_cc = parse_cc(compute_capability);
  } catch (const std::exception& e) {
    throw PlanMismatch(side_where + ": " + e.what());
  }
  const std::string built_name = side.contains("gpu_name") && side["gpu_name"].is_string() &&
                                         !side["gpu_name"].get<std::string>().empty()
                                     ? side["gpu_name"].get<std::string>()
                                     : std::string("an unknown GPU");
  const bool version_compatible = (side.contains("version_compatible") && side["version_compatible"].is_boolean() &&
                                   side["version_compatible"].get<bool>()) ||
                                  flags_of(side).count("VERSION_COMPATIBLE");
  const auto b3 = std::make_tuple(built_v[0], built_v[1], built_v[2]);
  const auto h3 = std::make_tuple(here_v[0], here_v[1], here_v[2]);
  if (version_compatible) {
    if (built_v[0] != here_v[0] || h3 < b3)
      throw PlanMismatch(where + ": built version-compatible with TensorRT " + v3(built_v) + ", which needs TensorRT " +
                         std::to_string(built_v[0]) + ".x >= " + v3(built_v) + ", but " + v3(here_v) +
                         " is installed; " + kRebuild);
  } else if (b3 != h3) {
    throw PlanMismatch(where + ": built with TensorRT " + v3(built_v) + " but TensorRT " + v3(here_v) +
                       " is installed; plans load only on the TensorRT version that built them: " + kRebuild +
                       ", or install TensorRT " + v3(built_v));
  }
  std::string level = "NONE";
  if (side.contains("hardware_compatibility_level") && side["hardware_compatibility_level"].is_string() &&
      !side["hardware_compatibility_level"].get<std::string>().empty()) {
    level = side["hardware_compatibility_level"].get<std::string>();
    std::transform(level.begin(), level.end(), level.begin(), [](unsigned char c) { return std::toupper(c); });
  }
  const std::string cc_b = std::to_string(built_cc.first) + "." + std::to_string(built_cc.second);
  const std::string cc_h = std::to_string(here_cc.first) + "." + std::to_string(here_cc.second);
  if (level == "AMPERE_PLUS") {
    if (here_cc < std::make_pair(8, 0))
      throw PlanMismatch(where + ": built for Ampere or newer GPUs (compute capability >= 8.0) but this GPU is " +
                         gpu_name + " (" + cc_h + "); " + kRebuild);
  } else if (built_cc != here_cc) {
    throw PlanMismatch(where + ": built for " + built_name + " (compute capability " + cc_b + ") but this GPU is " +
                       gpu_name + " (" + cc_h + "); a plan runs only on the compute capability it was built for: " +
                       kRebuild);
  } else if (built_name != "an unknown GPU" && built_name != gpu_name && level == "NONE") {
    notes.push_back(where + ": built on " + built_name + ", running on " + gpu_name + " (same compute capability " +
                    cc_h + "): it works, but tactics were tuned for the other GPU; rebuild for best latency");
  }
}

// The sidecar's "precision": "fp16" or ["fp16"] (any spelling of fp32/fp16/bf16/int8), else "".
std::string sidecar_precision(const json& side) {
  auto it = side.find("precision");
  if (it == side.end()) return "";
  const json* v = &*it;
  if (v->is_array() && v->size() == 1) v = &(*v)[0];
  if (!v->is_string()) return "";
  std::string p = v->get<std::string>();
  std::transform(p.begin(), p.end(), p.begin(), [](unsigned char c) { return std::tolower(c); });
  if (p == "f32" || p == "float32") return "fp32";
  if (p == "f16" || p == "float16" || p == "half") return "fp16";
  if (p == "bfloat16") return "bf16";
  if (p == "i8") return "int8";
  return p;
}

class Logger final : public nvinfer1::ILogger {
 public:
  void log(Severity severity, nvinfer1::AsciiChar const* msg) noexcept override {
    if (severity <= Severity::kWARNING && msg) std::fprintf(stderr, "[TensorRT] %s\n", msg);
  }
};

std::string cuda_error(cudaError_t err) { return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err); }

DType from_trt(nvinfer1::DataType t) {
  switch (t) {
    case nvinfer1::DataType::kUINT8: return DType::u8;
    case nvinfer1::DataType::kFLOAT: return DType::f32;
    case nvinfer1::DataType::kHALF: return DType::f16;
    default: return DType::other;
  }
}

size_t dtype_size(DType t) { return t == DType::u8 ? 1 : (t == DType::f16 ? 2 : 4); }

class TensorRTBackend final : public Backend {
 public:
  explicit TensorRTBackend(const BackendConfig& cfg) : where_(cfg.where) {
    name = "tensorrt";
    require_artifact(cfg, "TensorRT plan");
    std::error_code ec;
    const std::string side_where = display_path(cfg.sidecar);
    if (!std::filesystem::is_regular_file(cfg.sidecar, ec))
      throw Error(side_where + ": missing; the runtime needs the plan's sidecar to check TensorRT/GPU "
                               "compatibility; re-export the TensorRT plan");
    json side;
    try {
      side = json::parse(read_file(cfg.sidecar));
    } catch (const json::exception& e) {
      throw Error(side_where + ": unreadable (" + first_line(e.what()) + "); re-export the TensorRT plan");
    }
    if (!side.is_object()) throw Error(side_where + ": must be a JSON object; re-export the TensorRT plan");

    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess)
      throw BackendUnavailable("tensorrt: no usable NVIDIA GPU/driver (cudaGetDeviceCount: " + cuda_error(err) + ")");
    if (count <= 0 || cfg.gpu >= count)
      throw BackendUnavailable("tensorrt: CUDA device " + std::to_string(cfg.gpu) + " not found (" +
                               std::to_string(count) + " visible)");
    check(cudaSetDevice(cfg.gpu), "cudaSetDevice");
    cudaDeviceProp prop{};
    check(cudaGetDeviceProperties(&prop, cfg.gpu), "cudaGetDeviceProperties");
    const std::string gpu_name = prop.name;
    const std::string cc = std::to_string(prop.major) + "." + std::to_string(prop.minor);
    const int v = getInferLibVersion();  // (MAJOR * 100 + MINOR) * 100 + PATCH
    const std::string trt_version =
        std::to_string(v / 10000) + "." + std::to_string((v / 100) % 100) + "." + std::to_string(v % 100);
    check_plan_compatibility(side, trt_version, gpu_name, cc, where_, side_where, notes);
    // Stale plan: built from an ONNX file that is not one of this engine's.
    if (side.contains("onnx_sha256") && side["onnx_sha256"].is_string() && !cfg.onnx_sha256s.empty()) {
      const std::string built_from = side["onnx_sha256"].get<std::string>();
      if (!built_from.empty() &&
          std::find(cfg.onnx_sha256s.begin(), cfg.onnx_sha256s.end(), built_from) == cfg.onnx_sha256s.end())
        throw Error(where_ + ": built from an ONNX model (sha256 " + built_from.substr(0, 12) +
                    "...) that is not one of this engine's ONNX artifacts: the plan is stale; re-export the engine");
    }
    std::string plan_precision = cfg.artifact_precision;  // stlm.json's artifact precision wins
    if (plan_precision.empty()) plan_precision = sidecar_precision(side);
    if (!cfg.precision.empty() && cfg.precision != "device" && !plan_precision.empty() &&
        cfg.precision != plan_precision)
      throw BackendUnavailable(where_ + ": the plan was built for " + plan_precision + ", " + cfg.precision +
                               " was requested; export a plan with that precision or drop the precision option");

    runtime_.reset(nvinfer1::createInferRuntime(logger_));
    if (!runtime_) throw BackendUnavailable("tensorrt: createInferRuntime failed (see the TensorRT log above)");
    const std::string blob = read_file(cfg.path);
    engine_.reset(runtime_->deserializeCudaEngine(blob.data(), blob.size()));
    if (!engine_)
      throw Error(where_ + ": TensorRT " + trt_version +
                  " could not deserialise the plan (see the TensorRT log above); re-export it on this machine");
    context_.reset(engine_->createExecutionContext());
    if (!context_) throw Error(where_ + ": could not create a TensorRT execution context (GPU out of memory?)");
    check(cudaStreamCreate(&stream_), "cudaStreamCreate");

    std::vector<std::string> inputs;
    for (int32_t i = 0; i < engine_->getNbIOTensors(); ++i) {
      const char* tname = engine_->getIOTensorName(i);
      const DType dt = from_trt(engine_->getTensorDataType(tname));
      dtypes_[tname] = dt;
      if (engine_->getTensorIOMode(tname) == nvinfer1::TensorIOMode::kINPUT) {
        inputs.push_back(tname);
      } else {
        if (dt != DType::f32 && dt != DType::f16)
          throw Error(where_ + ": output '" + std::string(tname) + "' is not float32/float16");
        output_names.push_back(tname);
      }
    }
    if (inputs.size() != 1) throw Error(where_ + ": expected exactly one input tensor, found " +
                                        std::to_string(inputs.size()));
    input_name = inputs[0];
    input_dtype = dtypes_[input_name];
    const nvinfer1::Dims d = engine_->getTensorShape(input_name.c_str());
    for (int32_t k = 0; k < d.nbDims; ++k) input_shape.push_back(static_cast<int64_t>(d.d[k]));
    if (!input_shape.empty() && input_shape[0] == -1) {
      const nvinfer1::Dims mx =
          engine_->getProfileShape(input_name.c_str(), 0, nvinfer1::OptProfileSelector::kMAX);
      max_batch = mx.nbDims > 0 ? static_cast<int>(mx.d[0]) : 0;
    } else if (!input_shape.empty()) {
      max_batch = static_cast<int>(input_shape[0]);
    }
    precision = plan_precision.empty() ? "fp32" : plan_precision;
    device = "cuda:" + std::to_string(cfg.gpu);
    gpu_ = cfg.gpu;
  }

  ~TensorRTBackend() override {
    for (auto& [n, buf] : buffers_)
      if (buf.ptr) cudaFree(buf.ptr);
    if (stream_) cudaStreamDestroy(stream_);
    context_.reset();  // release order: context -> engine -> runtime
    engine_.reset();
    runtime_.reset();
  }

  std::map<std::string, HostOutput> infer(const InputView& in) override {
    std::lock_guard<std::mutex> lock(mu_);
    check(cudaSetDevice(gpu_), "cudaSetDevice");
    if (max_batch > 0 && !in.shape.empty() && in.shape[0] > max_batch)
      throw Error(where_ + ": batch " + std::to_string(in.shape[0]) + " exceeds the plan's maximum " +
                  std::to_string(max_batch));
    nvinfer1::Dims dims{};
    dims.nbDims = static_cast<int32_t>(in.shape.size());
    size_t in_elems = 1;
    for (size_t k = 0; k < in.shape.size(); ++k) {
      dims.d[k] = in.shape[k];
      in_elems *= static_cast<size_t>(in.shape[k]);
    }
    if (!context_->setInputShape(input_name.c_str(), dims))
      throw Error(where_ + ": TensorRT rejected input shape (see the TensorRT log above)");
    const size_t in_bytes = in_elems * dtype_size(input_dtype);
    void* d_in = ensure(input_name, in_bytes);
    context_->setTensorAddress(input_name.c_str(), d_in);
    std::map<std::string, std::vector<int64_t>> shapes;
    for (const auto& out : output_names) {
      const nvinfer1::Dims od = context_->getTensorShape(out.c_str());
      std::vector<int64_t> s;
      size_t n = 1;
      for (int32_t k = 0; k < od.nbDims; ++k) {
        s.push_back(static_cast<int64_t>(od.d[k]));
        n *= static_cast<size_t>(std::max<int64_t>(od.d[k], 0));
      }
      shapes[out] = s;
      context_->setTensorAddress(out.c_str(), ensure(out, std::max<size_t>(n * dtype_size(dtypes_[out]), 1)));
    }
    check(cudaMemcpyAsync(d_in, in.data, in_bytes, cudaMemcpyHostToDevice, stream_), "cudaMemcpyAsync (input)");
    if (!context_->enqueueV3(stream_))
      throw Error(where_ + ": TensorRT enqueueV3 failed (see the TensorRT log above)");
    std::map<std::string, HostOutput> result;
    std::vector<uint16_t> half;
    for (const auto& out : output_names) {
      HostOutput h;
      h.shape = shapes[out];
      size_t n = 1;
      for (auto x : h.shape) n *= static_cast<size_t>(std::max<int64_t>(x, 0));
      h.data.resize(n);
      if (dtypes_[out] == DType::f32) {
        check(cudaMemcpyAsync(h.data.data(), buffers_[out].ptr, n * 4, cudaMemcpyDeviceToHost, stream_),
              "cudaMemcpyAsync (" + out + ")");
        check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
      } else {
        half.resize(n);
        check(cudaMemcpyAsync(half.data(), buffers_[out].ptr, n * 2, cudaMemcpyDeviceToHost, stream_),
              "cudaMemcpyAsync (" + out + ")");
        check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
        for (size_t k = 0; k < n; ++k) h.data[k] = half_to_float(half[k]);
      }
      result[out] = std::move(h);
    }
    return result;
  }

 private:
  struct Buffer {
    void* ptr = nullptr;
    size_t bytes = 0;
  };

  void check(cudaError_t err, const std::string& what) const {
    if (err != cudaSuccess) throw Error("tensorrt: CUDA " + what + " failed (" + cuda_error(err) + ")");
  }

  void* ensure(const std::string& name, size_t bytes) {
    Buffer& b = buffers_[name];
    if (b.bytes >= bytes) return b.ptr;
    if (b.ptr) check(cudaFree(b.ptr), "cudaFree");
    b.ptr = nullptr;
    b.bytes = 0;
    check(cudaMalloc(&b.ptr, bytes), "cudaMalloc(" + std::to_string(bytes) + ") for '" + name + "'");
    b.bytes = bytes;
    return b.ptr;
  }

  std::string where_;
  int gpu_ = 0;
  Logger logger_;
  std::unique_ptr<nvinfer1::IRuntime> runtime_;
  std::unique_ptr<nvinfer1::ICudaEngine> engine_;
  std::unique_ptr<nvinfer1::IExecutionContext> context_;
  cudaStream_t stream_ = nullptr;
  std::map<std::string, DType> dtypes_;
  std::map<std::string, Buffer> buffers_;
  std::mutex mu_;
};

}  // namespace

std::unique_ptr<Backend> make_tensorrt_backend(const BackendConfig& config) {
  return std::make_unique<TensorRTBackend>(config);
}

}  // namespace stlm::detail

// OpenVINO backend (CPU edge engine; reads openvino/model.xml + .bin, or model.onnx directly).
//
// Compiled like the Python runtime's backend: PERFORMANCE_HINT=LATENCY, INFERENCE_NUM_THREADS (CPU),
// INFERENCE_PRECISION_HINT. Difference on purpose: with no precision requested the C++ runtime asks for
// f32 explicitly (the CPU plugin would otherwise silently run bf16 on AMX CPUs); precision "device"
// keeps the device default. bf16/f16 are requested only when OPTIMIZATION_CAPABILITIES lists them.
// Thread-safety: a pool of InferRequests created from the shared CompiledModel; a request is used by
// one thread at a time and no lock is held during inference.
#include <algorithm>
#include <cstring>
#include <mutex>

#include <openvino/openvino.hpp>

#include "backend.hpp"
#include "common.hpp"

namespace stlm::detail {

namespace {

DType from_ov(const ov::element::Type& t) {
  if (t == ov::element::u8) return DType::u8;
  if (t == ov::element::f32) return DType::f32;
  if (t == ov::element::f16) return DType::f16;
  return DType::other;
}

ov::element::Type to_ov(DType t) {
  switch (t) {
    case DType::u8: return ov::element::u8;
    case DType::f32: return ov::element::f32;
    case DType::f16: return ov::element::f16;
    default: throw Error("openvino: unsupported input dtype");
  }
}

std::string precision_name(const std::string& ov_name) {
  std::string n = ov_name;
  std::transform(n.begin(), n.end(), n.begin(), [](unsigned char c) { return std::tolower(c); });
  if (n == "f32" || n == "float32") return "fp32";
  if (n == "f16" || n == "float16") return "fp16";
  if (n == "bf16" || n == "bfloat16") return "bf16";
  if (n == "i8" || n == "u8") return "int8";
  return n;
}

class OpenVinoBackend final : public Backend {
 public:
  explicit OpenVinoBackend(const BackendConfig& cfg) : where_(cfg.where) {
    name = "openvino";
    require_artifact(cfg, "OpenVINO model");
    const std::string dev = cfg.device.empty() ? "CPU" : cfg.device;
    std::vector<std::string> caps;
    try {
      caps = core_.get_property(dev, ov::device::capabilities);
    } catch (const std::exception& e) {
      std::string devices;
      for (const auto& d : core_.get_available_devices()) devices += (devices.empty() ? "" : ", ") + d;
      throw BackendUnavailable("openvino: device '" + dev + "' is not available (devices: " + devices + "; " +
                               first_line(e.what()) + ")");
    }
    // Requested precision -> hint (empty: none = device default).
    std::string req = cfg.precision;
    std::transform(req.begin(), req.end(), req.begin(), [](unsigned char c) { return std::tolower(c); });
    // An INT8 IR: its float remainder runs at the precision its export gate passed at (as in Python).
    if ((req.empty() || req == "int8") && cfg.artifact_precision == "int8")
      req = cfg.artifact_inference_precision.empty() ? "fp32" : cfg.artifact_inference_precision;
    std::string hint;
    if (req.empty() || req == "fp32" || req == "f32" || req == "float32") {
      hint = "f32";
    } else if (req == "bf16" || req == "bfloat16" || req == "fp16" || req == "f16" || req == "float16") {
      const bool bf = req[0] == 'b';
      const std::string need = bf ? "BF16" : "FP16";
      if (std::find(caps.begin(), caps.end(), need) != caps.end()) {
        hint = bf ? "bf16" : "f16";
      } else {
        hint = "f32";
        std::string have;
        for (const auto& c : caps) have += (have.empty() ? "" : ", ") + c;
        notes.push_back(std::string(bf ? "bf16" : "fp16") + " requested but OpenVINO " + dev + " reports no " + need +
                        " support (OPTIMIZATION_CAPABILITIES: " + (have.empty() ? "none" : have) + "); using f32");
      }
    } else if (req != "device" && req != "default" && req != "auto" && req != "int8") {
      throw Error("precision: expected one of fp32, bf16, fp16, int8, device (or empty), got '" + cfg.precision + "'");
    }
    ov::AnyMap config{ov::hint::performance_mode(ov::hint::PerformanceMode::LATENCY)};
    if (dev.rfind("CPU", 0) == 0)
      config.insert(ov::inference_num_threads(cfg.threads > 0 ? cfg.threads : default_threads()));
    if (hint == "f32") config.insert(ov::hint::inference_precision(ov::element::f32));
    if (hint == "bf16") config.insert(ov::hint::inference_precision(ov::element::bf16));
    if (hint == "f16") config.insert(ov::hint::inference_precision(ov::element::f16));
    try {
      std::shared_ptr<ov::Model> model = core_.read_model(cfg.path.string());
      compiled_ = core_.compile_model(model, dev, config);
    } catch (const std::exception& e) {
      throw Error(where_ + ": OpenVINO cannot compile the model for " + dev + " (" + first_line(e.what()) + ")");
    }
    try {
      precision = precision_name(compiled_.get_property(ov::hint::inference_precision).to_string());
    } catch (const std::exception&) {  // some devices do not expose the property
      precision = precision_name(hint);
    }
    if (cfg.artifact_precision == "int8") precision = "int8";
    device = dev;
    std::transform(device.begin(), device.end(), device.begin(), [](unsigned char c) { return std::tolower(c); });
    const auto inputs = compiled_.inputs();
    if (inputs.size() != 1) {
      std::string names;
      for (const auto& p : inputs) names += (names.empty() ? "" : ", ") + p.get_any_name();
      throw Error(where_ + ": expected exactly one graph input, found [" + names + "]");
    }
    input_name = inputs[0].get_any_name();
    input_dtype = from_ov(inputs[0].get_element_type());
    const ov::PartialShape ps = inputs[0].get_partial_shape();
    if (ps.rank().is_static())
      for (const auto& d : ps) input_shape.push_back(d.is_static() ? d.get_length() : -1);
    for (const auto& p : compiled_.outputs()) output_names.push_back(p.get_any_name());
    max_batch = (!input_shape.empty() && input_shape[0] > 0) ? static_cast<int>(input_shape[0]) : 0;
  }

  std::map<std::string, HostOutput> infer(const InputView& in) override {
    ov::InferRequest req = acquire();
    struct Return {
      OpenVinoBackend* self;
      ov::InferRequest* req;
      ~Return() { self->release(std::move(*req)); }
    } give_back{this, &req};
    std::map<std::string, HostOutput> out;
    try {
      ov::Shape shape(in.shape.begin(), in.shape.end());
      ov::Tensor tensor(to_ov(in.dtype), shape, const_cast<void*>(in.data));
      req.set_input_tensor(tensor);
      req.infer();
      for (size_t i = 0; i < output_names.size(); ++i) {
        const ov::Tensor t = req.get_output_tensor(i);
        HostOutput h;
        for (size_t d : t.get_shape()) h.shape.push_back(static_cast<int64_t>(d));
        const size_t n = t.get_size();
        h.data.resize(n);
        const auto et = t.get_element_type();
        if (et == ov::element::f32) {
          std::memcpy(h.data.data(), t.data(), n * sizeof(float));
        } else if (et == ov::element::f16) {
          const auto* src = static_cast<const uint16_t*>(t.data());
          for (size_t k = 0; k < n; ++k) h.data[k] = half_to_float(src[k]);
        } else {
          throw Error(where_ + ": output '" + output_names[i] + "' has element type " + et.to_string() +
                      ", expected f32");
        }
        out[output_names[i]] = std::move(h);
      }
    } catch (const Error&) {
      throw;
    } catch (const std::exception& e) {
      throw Error(where_ + ": OpenVINO inference failed on input " + input_str(in) + " (" + first_line(e.what()) +
                  ")");
    }
    return out;
  }

 private:
  ov::InferRequest acquire() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!idle_.empty()) {
        ov::InferRequest r = std::move(idle_.back());
        idle_.pop_back();
        return r;
      }
    }
    return compiled_.create_infer_request();  // thread-safe on a CompiledModel
  }

  void release(ov::InferRequest&& r) {
    std::lock_guard<std::mutex> lock(mu_);
    idle_.push_back(std::move(r));
  }

  std::string where_;
  ov::Core core_;
  ov::CompiledModel compiled_;
  std::mutex mu_;
  std::vector<ov::InferRequest> idle_;
};

}  // namespace

std::unique_ptr<Backend> make_openvino_backend(const BackendConfig& config) {
  return std::make_unique<OpenVinoBackend>(config);
}

}  // namespace stlm::detail

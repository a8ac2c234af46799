// OpenVINO backend (CPU edge engine; reads openvino/model.xml + .bin, or model.onnx directly).
//
// Compiled like the Python runtime's backend: PERFORMANCE_HINT=LATENCY, INFERENCE_NUM_THREADS (CPU),
// INFERENCE_PRECISION_HINT. Difference on purpose: with no precision requested the C++ runtime asks for
// f32 explicitly (the CPU plugin would otherwise silently run bf16 on AMX CPUs); precision "device"
// keeps the device default. bf16/f16 are requested only when OPTIMIZATION_CAPABILITIES lists them.
// Static batch 1 (as the Python backend, openvino.py): a dynamic-batch IR is compiled reshaped to batch 1 for
// single-image calls (5-12 % faster on the CPU plugin, which otherwise runs every layer with dynamic shapes)
// and, on the first call with another batch size, once more as it is; input_shape stays the IR's own. Not for
// an IR stored with fp16 weights (older engines): its static compilation is less exact than the gated one.
// Thread-safety: a pool of InferRequests per CompiledModel; a request is used by one thread at a time and
// no lock is held during inference.
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
    std::shared_ptr<ov::Model> model;
    try {
      model = core_.read_model(cfg.path.string());
    } catch (const std::exception& e) {
      throw Error(where_ + ": OpenVINO cannot read the model (" + first_line(e.what()) + ")");
    }
    const auto inputs = model->inputs();
    if (inputs.size() != 1) {
      std::string names;
      for (const auto& p : inputs) names += (names.empty() ? "" : ", ") + p.get_any_name();
      throw Error(where_ + ": expected exactly one graph input, found [" + names + "]");
    }
    const ov::PartialShape ps = inputs[0].get_partial_shape();
    // fp16-stored weights (engines exported before issue 24) stay on the dynamic compilation they were gated on
    bool single = cfg.artifact_precision != "fp16" && ps.rank().is_static() && ps.size() > 1 && ps[0].is_dynamic();
    for (size_t i = 1; single && i < ps.size(); ++i) single = ps[i].is_static();
    device_name_ = dev;
    config_ = config;
    std::shared_ptr<ov::Model> target = model;
    if (single) {
      target = model->clone();
      ov::PartialShape one = ps;
      one[0] = 1;
      target->reshape({{inputs[0].get_any_name(), one}});
      dynamic_model_ = model;  // compiled on the first call with another batch size
    }
    ov::CompiledModel compiled = compile(target);
    (single ? batch1_ : general_) = std::make_unique<Pool>(compiled);
    try {
      precision = precision_name(compiled.get_property(ov::hint::inference_precision).to_string());
    } catch (const std::exception&) {  // some devices do not expose the property
      precision = precision_name(hint);
    }
    if (cfg.artifact_precision == "int8") precision = "int8";
    device = dev;
    std::transform(device.begin(), device.end(), device.begin(), [](unsigned char c) { return std::tolower(c); });
    input_name = inputs[0].get_any_name();
    input_dtype = from_ov(inputs[0].get_element_type());
    if (ps.rank().is_static())  // the IR's own shape, not the batch-1 specialisation
      for (const auto& d : ps) input_shape.push_back(d.is_static() ? d.get_length() : -1);
    for (const auto& p : compiled.outputs()) output_names.push_back(p.get_any_name());
    max_batch = (!input_shape.empty() && input_shape[0] > 0) ? static_cast<int>(input_shape[0]) : 0;
  }

  std::map<std::string, HostOutput> infer(const InputView& in) override {
    Pool& pool = pool_for(in.shape.empty() ? 1 : in.shape[0]);
    ov::InferRequest req = pool.acquire();
    struct Return {
      Pool* pool;
      ov::InferRequest* req;
      ~Return() { pool->release(std::move(*req)); }
    } give_back{&pool, &req};
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
  // The InferRequests of one CompiledModel, created on demand and handed back after each call.
  struct Pool {
    explicit Pool(ov::CompiledModel c) : compiled(std::move(c)) {}
    ov::InferRequest acquire() {
      {
        std::lock_guard<std::mutex> lock(mu);
        if (!idle.empty()) {
          ov::InferRequest r = std::move(idle.back());
          idle.pop_back();
          return r;
        }
      }
      return compiled.create_infer_request();  // thread-safe on a CompiledModel
    }
    void release(ov::InferRequest&& r) {
      std::lock_guard<std::mutex> lock(mu);
      idle.push_back(std::move(r));
    }
    ov::CompiledModel compiled;
    std::mutex mu;
    std::vector<ov::InferRequest> idle;
  };

  ov::CompiledModel compile(const std::shared_ptr<ov::Model>& model) {
    try {
      return core_.compile_model(model, device_name_, config_);
    } catch (const std::exception& e) {
      throw Error(where_ + ": OpenVINO cannot compile the model for " + device_name_ + " (" + first_line(e.what()) +
                  ")");
    }
  }

  // The batch-1 model for one image, else the model as it is (a dynamic IR: compiled on its first use).
  Pool& pool_for(int64_t batch) {
    if (batch1_ && batch == 1) return *batch1_;
    std::lock_guard<std::mutex> lock(lazy_);
    if (!general_) general_ = std::make_unique<Pool>(compile(dynamic_model_));
    return *general_;
  }

  std::string where_;
  ov::Core core_;
  std::string device_name_;
  ov::AnyMap config_;
  std::shared_ptr<ov::Model> dynamic_model_;
  std::unique_ptr<Pool> batch1_, general_;
  std::mutex lazy_;
};

}  // namespace

std::unique_ptr<Backend> make_openvino_backend(const BackendConfig& config) {
  return std::make_unique<OpenVinoBackend>(config);
}

}  // namespace stlm::detail

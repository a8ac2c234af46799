// ONNX Runtime backend (CPU execution provider) for model.onnx / model.fp16.onnx.
// Compiled only when CMake finds onnxruntime_cxx_api.h and libonnxruntime (STLM_HAVE_ORT); the PyPI
// wheel has no C++ headers, use an official release archive (-DONNXRUNTIME_ROOT=onnxruntime-linux-x64-1.xx).
// Session options as the Python backend: ORT_ENABLE_ALL, intra-op threads = threads.
// Thread-safety: Ort::Session::Run is thread-safe; one session serves all threads, no lock.
#include <onnxruntime_cxx_api.h>

#include <cstring>

#include "backend.hpp"
#include "common.hpp"

namespace stlm::detail {

namespace {

DType from_ort(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return DType::u8;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return DType::f32;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return DType::f16;
    default: return DType::other;
  }
}

ONNXTensorElementDataType to_ort(DType t) {
  switch (t) {
    case DType::u8: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
    case DType::f32: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    case DType::f16: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    default: throw Error("ort: unsupported input dtype");
  }
}

size_t dtype_size(DType t) { return t == DType::u8 ? 1 : (t == DType::f16 ? 2 : 4); }

Ort::Env& shared_env() {
  static Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "stlm");
  return env;
}

class OrtBackend final : public Backend {
 public:
  explicit OrtBackend(const BackendConfig& cfg) : where_(cfg.where) {
    name = "ort";
    require_artifact(cfg, "ONNX model");
    try {
      Ort::SessionOptions so;
      so.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
      so.SetIntraOpNumThreads(cfg.threads > 0 ? cfg.threads : default_threads());
      session_ = std::make_unique<Ort::Session>(shared_env(), cfg.path.c_str(), so);
      Ort::AllocatorWithDefaultOptions alloc;
      if (session_->GetInputCount() != 1)
        throw Error(where_ + ": expected exactly one graph input, found " + std::to_string(session_->GetInputCount()));
      input_name = input_name_at(0, alloc);
      {
        Ort::TypeInfo ti = session_->GetInputTypeInfo(0);
        auto info = ti.GetTensorTypeAndShapeInfo();
        input_dtype = from_ort(info.GetElementType());
        input_shape = info.GetShape();
      }
      for (size_t i = 0; i < session_->GetOutputCount(); ++i) {
        output_names.push_back(output_name_at(i, alloc));
        Ort::TypeInfo ti = session_->GetOutputTypeInfo(i);
        out_types_.push_back(from_ort(ti.GetTensorTypeAndShapeInfo().GetElementType()));
      }
    } catch (const Ort::Exception& e) {
      throw Error(where_ + ": ONNX Runtime cannot load the model (" + first_line(e.what()) + ")");
    }
    for (auto& d : input_shape)
      if (d <= 0) d = -1;
    max_batch = (!input_shape.empty() && input_shape[0] > 0) ? static_cast<int>(input_shape[0]) : 0;
    precision = cfg.artifact_precision.empty() ? "fp32" : cfg.artifact_precision;
    device = "cpu";
  }

  std::map<std::string, HostOutput> infer(const InputView& in) override {
    std::map<std::string, HostOutput> result;
    try {
      size_t elems = 1;
      for (auto d : in.shape) elems *= static_cast<size_t>(d);
      Ort::MemoryInfo mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
      Ort::Value x = Ort::Value::CreateTensor(mem, const_cast<void*>(in.data), elems * dtype_size(in.dtype),
                                              in.shape.data(), in.shape.size(), to_ort(in.dtype));
      const char* in_names[] = {input_name.c_str()};
      std::vector<const char*> out_names;
      for (const auto& n : output_names) out_names.push_back(n.c_str());
      std::vector<Ort::Value> outs =
          session_->Run(Ort::RunOptions{nullptr}, in_names, &x, 1, out_names.data(), out_names.size());
      for (size_t i = 0; i < outs.size(); ++i) {
        auto info = outs[i].GetTensorTypeAndShapeInfo();
        HostOutput h;
        h.shape = info.GetShape();
        const size_t n = info.GetElementCount();
        h.data.resize(n);
        if (out_types_[i] == DType::f32) {
          std::memcpy(h.data.data(), outs[i].GetTensorData<float>(), n * sizeof(float));
        } else if (out_types_[i] == DType::f16) {
          const auto* src = outs[i].GetTensorData<uint16_t>();
          for (size_t k = 0; k < n; ++k) h.data[k] = half_to_float(src[k]);
        } else {
          continue;  // not a float output: never one the runtime reads
        }
        result[output_names[i]] = std::move(h);
      }
    } catch (const Ort::Exception& e) {
      throw Error(where_ + ": ONNX Runtime inference failed on input " + input_str(in) + " (" + first_line(e.what()) +
                  ")");
    }
    return result;
  }

 private:
#if ORT_API_VERSION >= 13  // *NameAllocated since 1.13; the raw-pointer getters were removed in 1.16
  std::string input_name_at(size_t i, Ort::AllocatorWithDefaultOptions& a) {
    return session_->GetInputNameAllocated(i, a).get();
  }
  std::string output_name_at(size_t i, Ort::AllocatorWithDefaultOptions& a) {
    return session_->GetOutputNameAllocated(i, a).get();
  }
#else
  std::string input_name_at(size_t i, Ort::AllocatorWithDefaultOptions& a) {
    char* n = session_->GetInputName(i, a);
    std::string s(n);
    a.Free(n);
    return s;
  }
  std::string output_name_at(size_t i, Ort::AllocatorWithDefaultOptions& a) {
    char* n = session_->GetOutputName(i, a);
    std::string s(n);
    a.Free(n);
    return s;
  }
#endif

  std::string where_;
  std::unique_ptr<Ort::Session> session_;
  std::vector<DType> out_types_;
};

}  // namespace

std::unique_ptr<Backend> make_ort_backend(const BackendConfig& config) { return std::make_unique<OrtBackend>(config); }

}  // namespace stlm::detail

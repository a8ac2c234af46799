// The one small interface every inference backend implements (like the Python runtime's Backend):
// construct = activate (throws BackendUnavailable when it cannot run here), infer(feed) -> outputs.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace stlm::detail {

enum class DType { u8, f32, f16, other };

const char* dtype_name(DType t);

// A host tensor the caller owns (contiguous, row-major).
struct InputView {
  const void* data = nullptr;
  DType dtype = DType::u8;
  std::vector<int64_t> shape;
};

// "uint8 (1, 256, 256, 3)": how inference errors name the input they failed on.
std::string input_str(const InputView& input);

// An output copied to host memory, converted to float32.
struct HostOutput {
  std::vector<int64_t> shape;
  std::vector<float> data;
};

struct BackendConfig {
  std::filesystem::path path;         // the artifact to run (.xml / .onnx / .plan)
  std::string where;                  // how to name it in messages (display path)
  std::string precision;              // requested precision ("" = backend default)
  std::string artifact_precision;     // stlm.json precision of the artifact ("" = unknown)
  std::string artifact_inference_precision;  // OpenVINO: stlm.json inference_precision of the IR ("" = none)
  int threads = 0;                    // CPU threads (0 = default_threads())
  std::string device = "CPU";         // OpenVINO device
  int gpu = 0;                        // CUDA device id
  std::filesystem::path sidecar;      // TensorRT: <plan>.json
  std::vector<std::string> onnx_sha256s;  // TensorRT: the engine's ONNX checksums (stale-plan check)
};

// Throws stlm::Error "<where>: <what> not found" unless config.path is a regular file.
void require_artifact(const BackendConfig& config, const char* what);

class Backend {
 public:
  virtual ~Backend() = default;

  std::string name;                    // "openvino" | "ort" | "tensorrt"
  std::string precision;               // precision actually used
  std::string device = "cpu";
  std::string input_name;
  DType input_dtype = DType::u8;
  std::vector<int64_t> input_shape;    // -1 = dynamic
  std::vector<std::string> output_names;
  int max_batch = 0;                   // 0 = no limit
  std::vector<std::string> notes;      // precision downgrades, warnings

  // Run one batch; must be safe to call from several threads at once.
  virtual std::map<std::string, HostOutput> infer(const InputView& input) = 0;
};

std::unique_ptr<Backend> make_openvino_backend(const BackendConfig& config);
#ifdef STLM_HAVE_ORT
std::unique_ptr<Backend> make_ort_backend(const BackendConfig& config);
#endif
#ifdef STLM_HAVE_TENSORRT
std::unique_ptr<Backend> make_tensorrt_backend(const BackendConfig& config);
#endif

}  // namespace stlm::detail

// stlm.json (format "stlm-engine", format_version 1, or 2 for tiled engines): parsing and validation with the same rules and
// one-line messages as the Python runtime (stlm_deploy/spec.py), artifact checksums, --engine resolution.
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "tiling.hpp"

namespace stlm::detail {

namespace fs = std::filesystem;

inline constexpr const char* kFormat = "stlm-engine";
inline constexpr int kFormatVersion = 2;  // newest stlm.json version this runtime understands
inline constexpr int kTiledVersion = 2;   // tiled engines (preprocessing.work_size) need at least this
inline constexpr double kMaxTileOverlap = 0.9;  // stlm_deploy/tiling.py MAX_TILE_OVERLAP
inline constexpr const char* kSpecFilename = "stlm.json";
inline constexpr int kImgSizeMultiple = 64;

struct TensorDesc {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;  // -1 = dynamic
};

struct InputDesc {
  std::string name = "image";
  std::string dtype = "uint8";  // "uint8" (fused, NHWC) | "float32"/"float16" (unfused, NCHW, normalised)
  std::vector<int64_t> shape;
  std::string layout = "NHWC";
  std::string channel_order = "RGB";
  bool fused_preprocessing = true;
};

struct ArtifactDesc {
  std::string sha256;
  std::string kind;                      // onnx | openvino | tensorrt | json
  std::optional<std::string> precision;  // fp32 | fp16 | bf16 | int8 | null
  int64_t bytes = 0;
  // OpenVINO IR: the inference precision the export's parity gate passed at (the default at load time)
  std::optional<std::string> inference_precision;
};

// One entry of stlm.json "variants" (label "<backend>/<precision>"): whether the export gated it, and why.
// backend "auto" runs gated variants only; engines without "variants" use the older per-artifact rule.
struct VariantDesc {
  std::string artifact;
  bool gated = false;
  std::string why;
  std::optional<bool> evidence_sufficient;  // evidence.sufficient of a task gate, when recorded
  std::optional<int64_t> evidence_images;   // evidence.n_images
};

struct EngineSpec {
  int format_version = kFormatVersion;
  std::string model_family;
  std::string name;
  int img_size = 0;
  InputDesc input;
  std::vector<TensorDesc> outputs;
  std::string resize = "bilinear";  // preprocessing.resize: "area" | "bilinear" (see preprocess.py)
  std::array<double, 3> mean{};
  std::array<double, 3> std{};
  std::optional<Tiling> tiling;     // preprocessing.work_size / tile_overlap / tile_blend (tiled engines)
  int top_k = 100;
  std::optional<double> threshold_image;
  std::optional<double> threshold_pixel;
  std::string threshold_method;
  std::optional<double> score_min;  // thresholds.score_min/score_max: calibration range (normalized score)
  std::optional<double> score_max;
  std::vector<std::pair<std::string, ArtifactDesc>> artifacts;  // in listing order
  int batch = 0;                                                // 0 = "dynamic"
  int opset = 0;
  std::vector<std::pair<std::string, VariantDesc>> variants;    // empty for engines written before the field

  const ArtifactDesc* artifact(const std::string& relpath) const;
  const VariantDesc* variant(const std::string& label) const;
  const TensorDesc* output(const std::string& name) const;
};

// Parse + validate the text of stlm.json; `where` names the file in error messages.
EngineSpec parse_spec(const std::string& text, const std::string& where);

// Read engine_dir/stlm.json and parse it.
EngineSpec load_spec(const fs::path& engine_dir);

// `--engine` accepts the directory or a file inside it: (engine_dir, preferred artifact relpath or "").
std::pair<fs::path, std::string> resolve_engine(const fs::path& path);

// Check the sha256 of each relpath against stlm.json (one-line stlm::Error naming the file on mismatch).
void verify_artifacts(const fs::path& engine_dir, const EngineSpec& spec, const std::vector<std::string>& names);

}  // namespace stlm::detail

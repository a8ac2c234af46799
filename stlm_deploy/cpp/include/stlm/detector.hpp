// stlm/detector.hpp - the C++ runtime for STLM engine directories (engines/<name>/ from stlm-export).
//
//   auto det = stlm::Detector::load("engines/bottle");          // reads stlm.json, checks sha256s
//   stlm::Prediction p = det.predict(cv::imread("x.png"));      // BGR by default (OpenCV frames)
//   p.score; p.anomaly_map /* CV_32FC1, image size */; p.is_anomalous /* nullopt: no threshold */
//
// The numbers match the Python runtime (stlm_deploy.Detector) within 1e-4: same resize of the RGB uint8
// image to img_size (stlm.json preprocessing.resize: area or bilinear), same graph, same bilinear resize of the map back to the image size,
// same decision (score > thresholds.image). Tiled engines (stlm.json format_version 2, preprocessing.work_size)
// are cut into overlapping tiles exactly as stlm_deploy/tiling.py does: same work image, tile positions, mean
// blend and top-k score of the stitched map. Backends: "openvino" (always built, CPU), "tensorrt" and
// "ort" (built only where their SDKs were found at configure time; see compiled_backends()).
// Every error is a stlm::Error whose what() is ONE line naming the file/field/argument at fault.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <opencv2/core.hpp>

namespace stlm {

// A one-line, user-facing error (bad engine directory, tampered artifact, wrong image, backend failure).
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message);
};

// A backend cannot run here (SDK not built in, no GPU, plan built for another TensorRT/GPU).
// backend "auto" skips candidates that throw this; integrity errors (checksums, bad stlm.json) are plain
// stlm::Error and are never skipped.
class BackendUnavailable : public Error {
 public:
  using Error::Error;
};

// The backend returned NaN or +-Infinity (e.g. an fp16 overflow): the result is refused, never reported as a
// score (a NaN score compares false with every threshold: a silent "normal"). Names the engine, the artifact,
// the backend and the precision.
class NonFiniteOutput : public Error {
 public:
  using Error::Error;
};

struct Prediction {
  float score = 0.f;                       // image score (mean of the top_k map pixels, from the graph)
  cv::Mat anomaly_map;                     // CV_32FC1 at the original image size, values in [0, 1]
  std::optional<bool> is_anomalous;        // score > thresholds.image; nullopt when not calibrated
  cv::Mat mask;                            // CV_8UC1 255 where anomaly_map > thresholds.pixel; empty if none
  // clip((score - thresholds.image) / (score_max - score_min) + 0.5, 0, 1): the threshold maps to 0.5
  // (span 1 when stlm.json has no score_min/score_max); nullopt when not calibrated. Same as Python.
  std::optional<float> normalized_score;
  std::map<std::string, cv::Mat> extra_maps;  // other [N,S,S] outputs (e.g. "tlm_map"), image size
  std::string backend;                     // what ran: "openvino", "ort" or "tensorrt"
  std::string precision;                   // and at which precision ("fp32", "bf16", "fp16", "int8")
  int n_tiles = 1;                         // tiles the image was cut into (tiled engines; 1 otherwise)
};

struct Thresholds {
  std::optional<double> image;  // decision threshold on Prediction::score
  std::optional<double> pixel;  // threshold on anomaly_map pixels (defect outline / mask)
  std::string method;           // how export chose them ("none" when not calibrated)
  std::optional<double> score_min;  // calibration score range (normalized score); nullopt in older engines
  std::optional<double> score_max;
};

struct LoadOptions {
  std::string backend = "auto";  // "auto" (tensorrt, openvino, ort: first that works), "openvino", "ort", "tensorrt"
  int threads = 0;               // CPU threads for openvino/ort; 0 = all CPUs this process may use
  // "" = the engine's default, the same rule as the Python runtime (docs/engine_format.md, "Default backend
  // and precision"): openvino the IR's recorded inference_precision (what the export's parity gate passed),
  // else f32; ort model.onnx; tensorrt the plan's. "fp32"/"bf16"/"fp16" = openvino inference precision hint
  // (downgraded to f32 with a note if the device lacks it) / ort ONNX artifact precision.
  // "device" = openvino device default (may be bf16 on AMX CPUs). "int8" = the int8 IR/ONNX/plan.
  std::string precision;
  std::string device = "CPU";    // OpenVINO device
  int gpu = 0;                   // CUDA device for tensorrt
  bool verify = true;            // check the sha256 of the artifact(s) used against stlm.json
  std::string artifact;          // relative path of the artifact to run (default: chosen per backend)
  // Images per backend call in predict(std::vector) on a dynamic-batch engine (0 = kDefaultChunk = 8, capped by
  // the backend's limit); a fixed-batch engine always runs its exported batch. Bounded memory for long lists.
  int batch_size = 0;
};

inline constexpr int kDefaultChunk = 8;

class Detector {
 public:
  // engine: the engine directory, or an artifact file inside it (e.g. engines/x/openvino/model.xml).
  static Detector load(const std::string& engine, const std::string& backend = "auto", int threads = 0);
  static Detector load(const std::string& engine, const LoadOptions& options);

  Detector(Detector&&) noexcept;
  Detector& operator=(Detector&&) noexcept;
  ~Detector();

  // One image of any size: CV_8UC3 (BGR when bgr, else RGB), CV_8UC1 (gray) or CV_8UC4 (BGRA/RGBA).
  // Thread-safe: several threads may call predict on one Detector.
  Prediction predict(const cv::Mat& image, bool bgr = true) const;
  // Several images at once, run in chunks of chunk_size() (converted and resized chunk by chunk; a tiled engine:
  // image by image, its tiles chunk_size() at a time).
  std::vector<Prediction> predict(const std::vector<cv::Mat>& images, bool bgr = true) const;
  // Packed RGB uint8 pixels, `stride` bytes per row (0 = width * 3).
  Prediction predict_rgb(const uint8_t* data, int height, int width, size_t stride = 0) const;

  std::string backend_name() const;  // "openvino", "ort" or "tensorrt"
  std::string precision() const;     // precision actually used ("fp32", "bf16", "fp16", "int8", ...)
  std::string device() const;        // "cpu", "cuda:0", ...
  std::string artifact() const;      // relative path of the artifact running (e.g. "openvino/model.xml")
  std::string engine_dir() const;
  std::string name() const;          // stlm.json name
  int img_size() const;              // the graph's input side (the tile of a tiled engine)
  int work_size() const;             // long side of the work image of a tiled engine; 0 = untiled
  double tile_overlap() const;       // a tiled engine's minimum tile overlap (fraction of a tile)
  int top_k() const;
  int chunk_size() const;            // images per backend call: the fixed batch, else batch_size (default 8)
  Thresholds thresholds() const;
  std::vector<std::string> notes() const;  // why auto skipped candidates, precision downgrades

  // Backends compiled into this library ("openvino" always; "tensorrt", "ort" when found at build time).
  static std::vector<std::string> compiled_backends();

 private:
  struct Impl;
  explicit Detector(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Heat map (JET, fixed 0..1 scale) blended on the image (alpha = heat-map weight) plus the white outline
// of anomaly_map > threshold when given; what stlm-infer / stlm_infer_cpp write as overlays.
// image: CV_8UC3 in the channel order of your choice (the result has the same order; bgr tells which it
// is so the colours are right), anomaly_map: CV_32FC1, resized to the image if needed.
cv::Mat overlay(const cv::Mat& image, const cv::Mat& anomaly_map, std::optional<double> threshold = std::nullopt,
                bool bgr = true, double alpha = 0.5);

}  // namespace stlm

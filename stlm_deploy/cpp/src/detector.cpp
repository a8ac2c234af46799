// stlm::Detector: engine resolution, backend choice, checksums, and the host-side pre/post-processing
// that must match the Python runtime (stlm_deploy/preprocess.py + detector.py) number for number.
#include <algorithm>
#include <cmath>
#include <cstring>

#include <opencv2/imgproc.hpp>

#include "backend.hpp"
#include "common.hpp"
#include "spec.hpp"
#include "stlm/detector.hpp"
#include "tiling.hpp"
#include "timings.hpp"

namespace stlm {

using namespace detail;

namespace detail {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::u8: return "uint8";
    case DType::f32: return "float32";
    case DType::f16: return "float16";
    default: return "unsupported";
  }
}

std::string input_str(const InputView& input) {
  return std::string(dtype_name(input.dtype)) + " " + shape_str(input.shape, "(", ")");
}

void require_artifact(const BackendConfig& config, const char* what) {
  std::error_code ec;
  if (!fs::is_regular_file(config.path, ec)) throw Error(config.where + ": " + what + " not found");
}

}  // namespace detail

namespace {

// stlm_deploy/decision.py: span = score_max - score_min (1 when not recorded), computed in double.
float normalized_score(float score, const EngineSpec& spec) {
  const double span = (spec.score_min && spec.score_max && *spec.score_max > *spec.score_min)
                          ? *spec.score_max - *spec.score_min
                          : 1.0;
  const double v = (static_cast<double>(score) - *spec.threshold_image) / span + 0.5;
  return static_cast<float>(std::min(1.0, std::max(0.0, v)));
}

const char* kOnnxByPrecision(const std::string& p) {
  if (p == "fp16") return "model.fp16.onnx";
  if (p == "int8") return "model.int8.onnx";
  if (p == "bf16") return "model.bf16.onnx";
  return "model.onnx";
}

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

// The spellings users and tools use -> "", fp32, fp16, bf16, int8 or "device".
std::string normalize_precision(const std::string& value) {
  const std::string k = lower(value);
  if (k.empty() || k == "auto" || k == "default" || k == "none") return "";
  if (k == "fp32" || k == "f32" || k == "float32") return "fp32";
  if (k == "fp16" || k == "f16" || k == "float16" || k == "half") return "fp16";
  if (k == "bf16" || k == "bfloat16") return "bf16";
  if (k == "int8" || k == "i8" || k == "u8") return "int8";
  if (k == "device") return "device";
  throw Error("precision: expected one of fp32, fp16, bf16, int8, device (or f32/f16), got '" + value + "'");
}

std::string suffix_of(const std::string& rel) {
  auto pos = rel.find_last_of('.');
  auto slash = rel.find_last_of('/');
  if (pos == std::string::npos || (slash != std::string::npos && pos < slash)) return "";
  return rel.substr(pos);
}

std::string backend_for_suffix(const std::string& suffix) {
  if (suffix == ".onnx") return "ort";
  if (suffix == ".xml") return "openvino";
  if (suffix == ".plan" || suffix == ".engine") return "tensorrt";
  return "";
}

bool compiled(const std::string& backend) {
  if (backend == "openvino") return true;
#ifdef STLM_HAVE_ORT
  if (backend == "ort") return true;
#endif
#ifdef STLM_HAVE_TENSORRT
  if (backend == "tensorrt") return true;
#endif
  return false;
}

std::string not_compiled_message(const std::string& backend) {
  if (backend == "tensorrt")
    return "backend 'tensorrt' is not compiled into this build of the C++ runtime (NvInfer.h/libnvinfer or the "
           "CUDA runtime were not found at configure time; reconfigure with -DTENSORRT_ROOT=...)";
  return "backend 'ort' is not compiled into this build of the C++ runtime (onnxruntime headers/library were not "
         "found at configure time; reconfigure with -DONNXRUNTIME_ROOT=...)";
}

// Maps (backend, precision, artifact hint) to the artifact to run for one engine directory.
class Planner {
 public:
  Planner(const fs::path& dir, const EngineSpec& spec, std::string precision)
      : dir_(dir), spec_(spec), precision_(std::move(precision)), where_(display_path(dir)) {}

  std::string artifact(const std::string& backend, const std::string& hint) const {
    if (!hint.empty()) return hint;
    if (backend == "ort") return onnx(precision_ == "device" ? "" : precision_);
    if (backend == "openvino") return openvino();
    return tensorrt();
  }

  // The artifact plus the files it cannot run without (IR weights, plan sidecar).
  std::vector<std::string> with_sidecars(const std::string& rel) const {
    std::vector<std::string> out{rel};
    std::string extra;
    const std::string suf = suffix_of(rel);
    if (suf == ".xml") extra = rel.substr(0, rel.size() - 4) + ".bin";
    if (suf == ".plan" || suf == ".engine") extra = rel + ".json";
    std::error_code ec;
    if (!extra.empty() && (spec_.artifact(extra) || (spec_.artifacts.empty() && fs::exists(dir_ / extra, ec))))
      out.push_back(extra);
    return out;
  }

 private:
  // Listed artifacts of `kind` whose precision (null read as `dflt`) equals `precision` ("" = any).
  std::vector<std::string> listed(const std::string& kind, const std::string& precision,
                                  const std::string& dflt = "fp32") const {
    std::vector<std::string> out;
    for (const auto& [k, a] : spec_.artifacts)
      if (a.kind == kind && (precision.empty() || a.precision.value_or(dflt) == precision)) out.push_back(k);
    return out;
  }

  static std::string pick(const std::vector<std::string>& names, const std::string& preferred) {
    return std::find(names.begin(), names.end(), preferred) != names.end() ? preferred : names.front();
  }

  bool exists(const std::string& rel) const {
    std::error_code ec;
    return fs::is_regular_file(dir_ / rel, ec);
  }

  std::string onnx(const std::string& requested) const {
    const std::string prec = requested.empty() ? "fp32" : requested;
    auto names = listed("onnx", prec);
    if (!names.empty()) return pick(names, kOnnxByPrecision(prec));
    const std::string conventional = kOnnxByPrecision(prec);
    if (!spec_.artifact(conventional) && exists(conventional)) return conventional;  // verification reports it
    std::string have;
    for (const auto& [k, a] : spec_.artifacts)
      if (a.kind == "onnx") have += (have.empty() ? "" : ", ") + k + " " + a.precision.value_or("fp32");
    throw BackendUnavailable(where_ + ": no ONNX artifact with precision " + prec + " (have: " +
                             (have.empty() ? "none" : have) + "); re-export with that precision or choose another");
  }

  std::string openvino() const {
    auto is_xml = [](const std::string& n) { return suffix_of(n) == ".xml"; };
    if (precision_ == "int8") {
      for (const auto& n : listed("openvino", "int8", ""))
        if (is_xml(n)) return n;
      throw BackendUnavailable(where_ + ": no int8 OpenVINO IR in this engine");
    }
    std::vector<std::string> names;
    for (const auto& n : listed("openvino", ""))
      if (is_xml(n) && spec_.artifact(n)->precision.value_or("") != "int8") names.push_back(n);
    if (!names.empty()) return pick(names, "openvino/model.xml");
    if (spec_.artifacts.empty() && exists("openvino/model.xml")) return "openvino/model.xml";
    return onnx("");  // the IR precision is a compile option: read the fp32 ONNX directly
  }

  std::string tensorrt() const {
    const std::string prec = precision_ == "device" ? "" : precision_;
    std::vector<std::string> names;
    for (const auto& n : listed("tensorrt", prec, ""))
      if (suffix_of(n) == ".plan" || suffix_of(n) == ".engine") names.push_back(n);
    if (!names.empty()) return pick(names, "model.plan");
    if (spec_.artifacts.empty() && exists("model.plan")) return "model.plan";
    throw BackendUnavailable(where_ + ": no" + (prec.empty() ? "" : " " + prec) +
                             " TensorRT plan in this engine (export with --target tensorrt)");
  }

  fs::path dir_;
  const EngineSpec& spec_;
  std::string precision_;
  std::string where_;
};

// The one default-precision rule (docs/engine_format.md, "Default backend and precision"; selection.py
// default_precision): with no precision requested, OpenVINO runs at the inference precision the export's parity
// gate passed for this IR (stlm.json artifacts.<xml>.inference_precision), else fp32; the backend downgrades bf16
// to f32 with a note where the device lacks BF16. Other backends: the artifact's own precision ("").
std::string default_precision(const std::string& backend, const ArtifactDesc* entry) {
  if (backend != "openvino") return "";
  return entry && entry->inference_precision ? *entry->inference_precision : "fp32";
}

std::string describe(const cv::Mat& m) {
  static const char* depths[] = {"uint8", "int8", "uint16", "int16", "int32", "float32", "float64", "float16"};
  const int d = m.depth();
  return std::string(d >= 0 && d < 8 ? depths[d] : "unknown") + " (" + std::to_string(m.rows) + ", " +
         std::to_string(m.cols) + ", " + std::to_string(m.channels()) + ")";
}

// Bilinear resize with half-pixel centres (cv::resize INTER_LINEAR semantics, edge clamping) of a float32
// map, computed in double precision. OpenCV 4.x's float path uses float coefficients (errors up to ~4e-5
// on a 1024 -> 480 resize); OpenCV >= 5 (the Python wheel) is exact to float rounding, and so is this.
cv::Mat resize_map(const cv::Mat& src, int out_h, int out_w) {
  CV_Assert(src.type() == CV_32FC1);
  if (src.rows == out_h && src.cols == out_w) return src.clone();
  struct Tap {
    int i0, i1;
    double f;
  };
  auto taps = [](int out, int in) {
    std::vector<Tap> t(static_cast<size_t>(out));
    const double scale = 1.0 / (static_cast<double>(out) / in);
    for (int d = 0; d < out; ++d) {
      const double x = (d + 0.5) * scale - 0.5;
      int x0 = static_cast<int>(std::floor(x));
      double fx = x - x0;
      if (x0 < 0) {
        x0 = 0;
        fx = 0;
      }
      if (x0 >= in - 1) {
        x0 = in - 1;
        fx = 0;
      }
      t[static_cast<size_t>(d)] = {x0, std::min(x0 + 1, in - 1), fx};
    }
    return t;
  };
  const std::vector<Tap> tx = taps(out_w, src.cols), ty = taps(out_h, src.rows);
  // Horizontal pass for every source row (in double), then the vertical blend per output row.
  std::vector<double> rows(static_cast<size_t>(src.rows) * out_w);
  for (int r = 0; r < src.rows; ++r) {
    const float* s = src.ptr<float>(r);
    double* o = rows.data() + static_cast<size_t>(r) * out_w;
    for (int x = 0; x < out_w; ++x) {
      const Tap& t = tx[static_cast<size_t>(x)];
      o[x] = s[t.i0] * (1.0 - t.f) + s[t.i1] * t.f;
    }
  }
  cv::Mat out(out_h, out_w, CV_32FC1);
  for (int y = 0; y < out_h; ++y) {
    const Tap& t = ty[static_cast<size_t>(y)];
    const double* a = rows.data() + static_cast<size_t>(t.i0) * out_w;
    const double* b = rows.data() + static_cast<size_t>(t.i1) * out_w;
    float* o = out.ptr<float>(y);
    for (int x = 0; x < out_w; ++x) o[x] = static_cast<float>(a[x] * (1.0 - t.f) + b[x] * t.f);
  }
  return out;
}

cv::Mat to_rgb(const cv::Mat& image, bool bgr, const std::string& label) {
  if (image.empty() || image.depth() != CV_8U || image.dims != 2 ||
      (image.channels() != 1 && image.channels() != 3 && image.channels() != 4))
    throw Error(label + ": expected a non-empty 8-bit image with 1, 3 or 4 channels (BGR/RGB, gray, BGRA/RGBA), got " +
                (image.empty() ? std::string("an empty image") : describe(image)));
  cv::Mat rgb;
  switch (image.channels()) {
    case 1: cv::cvtColor(image, rgb, cv::COLOR_GRAY2RGB); break;
    case 4: cv::cvtColor(image, rgb, bgr ? cv::COLOR_BGRA2RGB : cv::COLOR_RGBA2RGB); break;
    default:
      if (bgr) cv::cvtColor(image, rgb, cv::COLOR_BGR2RGB);
      else rgb = image;
  }
  return rgb;
}

}  // namespace

struct Detector::Impl {
  fs::path engine_dir;
  EngineSpec spec;
  std::unique_ptr<Backend> backend;
  std::string artifact;
  std::vector<std::string> notes;
  int batch_size = 0;  // LoadOptions::batch_size (0 = kDefaultChunk)

  int fixed_batch() const {
    if (spec.batch > 0) return spec.batch;
    return backend->max_batch;
  }

  int chunk_size() const {
    const int fixed = fixed_batch();
    if (fixed > 0) return fixed;
    return std::max(1, batch_size > 0 ? batch_size : kDefaultChunk);
  }

  // NaN/Inf in any output of the first m images (a fixed batch's padding excluded) is an error, never a score.
  void check_finite(const std::map<std::string, HostOutput>& outs, size_t m, size_t count) const {
    for (const auto& [name, out] : outs) {
      const size_t per = count ? out.data.size() / count : 0;
      if (per == 0 || out.data.size() != per * count) continue;
      std::vector<size_t> bad;
      bool nan = false, inf = false;
      for (size_t j = 0; j < m; ++j) {
        bool any = false;
        for (size_t k = j * per; k < (j + 1) * per; ++k) {
          const float v = out.data[k];
          if (!std::isfinite(v)) {
            any = true;
            (std::isnan(v) ? nan : inf) = true;
          }
        }
        if (any) bad.push_back(j);
      }
      if (bad.empty()) continue;
      std::string list;
      for (size_t i = 0; i < bad.size() && i < 8; ++i) list += (i ? ", " : "") + std::to_string(bad[i]);
      const std::string kinds = nan && inf ? "NaN and Infinity" : (nan ? "NaN" : "Infinity");
      throw NonFiniteOutput(display_path(engine_dir / artifact) + ": engine '" + spec.name + "' on backend " +
                            backend->name + " (precision " + (backend->precision.empty() ? "default" : backend->precision) +
                            ") returned " + kinds + " in output '" + name + "' for image(s) [" + list + "] of a batch of " +
                            std::to_string(m) + "; the result is refused (an fp16/bf16 overflow? try precision fp32)");
    }
  }

  void check_graph() const {
    const Backend& b = *backend;
    const std::string where = display_path(engine_dir / artifact);
    if (b.input_name != spec.input.name)
      throw Error(where + ": graph input is '" + b.input_name + "' but stlm.json field 'input.name' says '" +
                  spec.input.name + "'");
    std::string missing;
    for (const char* n : {"anomaly_map", "score"})
      if (std::find(b.output_names.begin(), b.output_names.end(), n) == b.output_names.end())
        missing += (missing.empty() ? "" : ", ") + std::string(n);
    if (!missing.empty()) {
      std::string have;
      for (const auto& n : b.output_names) have += (have.empty() ? "" : ", ") + n;
      throw Error(where + ": graph outputs [" + have + "] lack [" + missing + "] required by stlm.json");
    }
    if (spec.input.fused_preprocessing && b.input_dtype != DType::u8)
      throw Error(where + ": graph input is " + dtype_name(b.input_dtype) +
                  " but stlm.json says fused uint8 input");
    if (!spec.input.fused_preprocessing && b.input_dtype != DType::f32 && b.input_dtype != DType::f16)
      throw Error(where + ": graph input is " + dtype_name(b.input_dtype) +
                  " but stlm.json says normalised float input (fused_preprocessing false)");
    if (!b.input_shape.empty() && b.input_shape.size() != spec.input.shape.size())
      throw Error(where + ": graph input rank " + std::to_string(b.input_shape.size()) +
                  " differs from stlm.json field 'input.shape' " + shape_str(spec.input.shape));
  }

  // stlm_deploy.preprocess.resize_image: "area" shrinks with INTER_AREA (both sides shrink), else INTER_LINEAR.
  cv::Mat resize_rgb(const cv::Mat& rgb, int h, int w) const {
    if (rgb.rows == h && rgb.cols == w) return rgb;
    const bool shrinking = h <= rgb.rows && w <= rgb.cols;
    cv::Mat out;
    cv::resize(rgb, out, cv::Size(w, h), 0, 0, spec.resize == "area" && shrinking ? cv::INTER_AREA : cv::INTER_LINEAR);
    return out;
  }

  // One backend call on m img_size x img_size RGB images (padded to a fixed batch); the outputs' sizes and
  // finiteness are checked. `count` = the batch the graph ran (m, or the fixed batch).
  std::map<std::string, HostOutput> infer(const std::vector<cv::Mat>& small, size_t& count) const {
    const int s = spec.img_size;
    const size_t m = small.size();
    const int fixed = fixed_batch();
    count = fixed > 0 ? static_cast<size_t>(fixed) : m;  // pad fixed-batch graphs with black images
    const size_t plane = static_cast<size_t>(s) * s;
    std::vector<uint8_t> batch(count * plane * 3, 0);
    for (size_t i = 0; i < m; ++i) {
      cv::Mat slot(s, s, CV_8UC3, batch.data() + i * plane * 3);
      small[i].copyTo(slot);
    }
    InputView view;
    std::vector<float> f32;
    std::vector<uint16_t> f16;
    if (spec.input.fused_preprocessing) {
      view = {batch.data(), DType::u8, {static_cast<int64_t>(count), s, s, 3}};
    } else {  // (x - mean) / std on RGB 0..255 in float32, NHWC -> NCHW (stlm_deploy.preprocess.normalize_nchw)
      f32.resize(count * 3 * plane);
      float mean[3], stdv[3];
      for (int c = 0; c < 3; ++c) {
        mean[c] = static_cast<float>(spec.mean[c]);
        stdv[c] = static_cast<float>(spec.std[c]);
      }
      for (size_t n = 0; n < count; ++n) {
        const uint8_t* src = batch.data() + n * plane * 3;
        float* dst = f32.data() + n * 3 * plane;
        for (size_t p = 0; p < plane; ++p)
          for (int c = 0; c < 3; ++c) {
            float x = static_cast<float>(src[p * 3 + c]);
            x -= mean[c];
            x /= stdv[c];
            dst[c * plane + p] = x;
          }
      }
      view = {f32.data(), DType::f32, {static_cast<int64_t>(count), 3, s, s}};
      if (backend->input_dtype == DType::f16) {
        f16.resize(f32.size());
        for (size_t k = 0; k < f32.size(); ++k) f16[k] = float_to_half(f32[k]);
        view.data = f16.data();
        view.dtype = DType::f16;
      }
    }
    std::map<std::string, HostOutput> outs = backend->infer(view);
    const std::string where = display_path(engine_dir / artifact);
    const HostOutput& amap = outs.at("anomaly_map");
    const HostOutput& score = outs.at("score");
    if (amap.data.size() != count * plane)
      throw Error(where + ": output 'anomaly_map' has shape " + shape_str(amap.shape) + ", expected [" +
                  std::to_string(count) + ", " + std::to_string(s) + ", " + std::to_string(s) + "]");
    if (score.data.size() != count)
      throw Error(where + ": output 'score' has shape " + shape_str(score.shape) + ", expected [" +
                  std::to_string(count) + "]");
    check_finite(outs, m, count);
    return outs;
  }

  // The per-pixel outputs ([count, S, S]) other than the map and the score: e.g. "tlm_map".
  static bool is_extra(const std::string& name, const HostOutput& out, size_t count, size_t plane) {
    return name != "anomaly_map" && name != "score" && out.data.size() == count * plane && out.shape.size() == 3;
  }

  // A result from the graph-side map (img_size, or the stitched work map) and its score (stlm_deploy Detector._prediction).
  Prediction prediction(float score, const cv::Mat& small_map, const std::map<std::string, cv::Mat>& extras, int h,
                        int w, int n_tiles) const {
    Prediction p;
    p.anomaly_map = resize_map(small_map, h, w);
    p.score = score;
    p.backend = backend->name;
    p.precision = backend->precision;
    p.n_tiles = n_tiles;
    if (spec.threshold_image) {
      p.is_anomalous = static_cast<double>(p.score) > *spec.threshold_image;
      p.normalized_score = normalized_score(p.score, spec);
    }
    if (spec.threshold_pixel)  // numpy compares a float32 map with the threshold cast to float32
      p.mask = p.anomaly_map > static_cast<float>(*spec.threshold_pixel);
    for (const auto& [name, m] : extras) p.extra_maps[name] = resize_map(m, h, w);
    return p;
  }

  // One backend call for up to fixed_batch (or any number of) RGB images.
  void run_chunk(const std::vector<cv::Mat>& rgb, std::vector<Prediction>& preds) const {
    const int s = spec.img_size;
    std::vector<cv::Mat> small;
    for (const cv::Mat& im : rgb) small.push_back(resize_rgb(im, s, s));
    size_t count = 0;
    std::map<std::string, HostOutput> outs = infer(small, count);
    const size_t plane = static_cast<size_t>(s) * s;
    const HostOutput& amap = outs.at("anomaly_map");
    const HostOutput& score = outs.at("score");
    for (size_t j = 0; j < rgb.size(); ++j) {
      cv::Mat m(s, s, CV_32FC1, const_cast<float*>(amap.data.data() + j * plane));
      std::map<std::string, cv::Mat> extras;
      for (const auto& [name, out] : outs)
        if (is_extra(name, out, count, plane)) extras[name] = cv::Mat(s, s, CV_32FC1, const_cast<float*>(out.data.data() + j * plane));
      preds.push_back(prediction(score.data[j], m, extras, rgb[j].rows, rgb[j].cols, 1));
    }
  }

  // One image of a tiled engine (stlm_deploy.tiling.run_tiled): work image, tiles chunk_size() at a time,
  // mean-blended maps, top-k score of the stitched map.
  Prediction predict_tiled(const cv::Mat& rgb) const {
    const Tiling& t = *spec.tiling;
    const auto [wh, ww] = t.work_shape(rgb.rows, rgb.cols);
    const cv::Mat work = resize_rgb(rgb, wh, ww);
    const std::vector<std::pair<int, int>> grid = t.grid(wh, ww);
    const size_t step = static_cast<size_t>(chunk_size());
    const size_t plane = static_cast<size_t>(t.tile) * t.tile;
    std::map<std::string, Stitcher> stitchers;
    for (size_t i = 0; i < grid.size(); i += step) {
      const size_t n = std::min(step, grid.size() - i);
      std::vector<cv::Mat> tiles;
      for (size_t j = i; j < i + n; ++j)
        tiles.push_back(work(cv::Rect(grid[j].second, grid[j].first, t.tile, t.tile)));
      size_t count = 0;
      std::map<std::string, HostOutput> outs = infer(tiles, count);
      for (const auto& [name, out] : outs) {
        if (name != "anomaly_map" && !is_extra(name, out, count, plane)) continue;
        auto it = stitchers.try_emplace(name, t, wh, ww).first;
        for (size_t j = 0; j < n; ++j) it->second.add(grid[i + j].first, grid[i + j].second, out.data.data() + j * plane);
      }
    }
    const cv::Mat amap = stitchers.at("anomaly_map").result();
    std::map<std::string, cv::Mat> extras;
    for (const auto& [name, st] : stitchers)
      if (name != "anomaly_map") extras[name] = st.result();
    return prediction(topk_mean(amap, spec.top_k), amap, extras, rgb.rows, rgb.cols, static_cast<int>(grid.size()));
  }
};

Detector::Detector(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Detector::Detector(Detector&&) noexcept = default;
Detector& Detector::operator=(Detector&&) noexcept = default;
Detector::~Detector() = default;

std::vector<std::string> Detector::compiled_backends() {
  std::vector<std::string> out{"openvino"};
#ifdef STLM_HAVE_TENSORRT
  out.push_back("tensorrt");
#endif
#ifdef STLM_HAVE_ORT
  out.push_back("ort");
#endif
  return out;
}

Detector Detector::load(const std::string& engine, const std::string& backend, int threads) {
  LoadOptions opt;
  opt.backend = backend;
  opt.threads = threads;
  return load(engine, opt);
}

Detector Detector::load(const std::string& engine, const LoadOptions& opt) {
  const std::string backend = lower(opt.backend.empty() ? "auto" : opt.backend);
  if (backend != "auto" && backend != "openvino" && backend != "ort" && backend != "tensorrt")
    throw Error("backend: expected one of auto, openvino, ort, tensorrt, got '" + opt.backend + "'");
  const std::string precision = normalize_precision(opt.precision);
  if (backend != "auto" && !compiled(backend)) throw BackendUnavailable(not_compiled_message(backend));
  if (opt.threads < 0) throw Error("threads: expected 0 (all CPUs) or a positive number, got " +
                                   std::to_string(opt.threads));
  if (opt.batch_size < 0)
    throw Error("batch_size: expected 0 (default 8) or a positive number, got " + std::to_string(opt.batch_size));

  auto [engine_dir, hint] = resolve_engine(engine);
  if (!opt.artifact.empty()) hint = opt.artifact;
  EngineSpec spec = load_spec(engine_dir);
  if (!hint.empty()) {
    const std::string suf = suffix_of(hint);
    const std::string fits = backend_for_suffix(suf);
    const std::string shown = display_path(engine_dir / hint);
    if (fits.empty())
      throw Error(shown + ": not a runnable artifact (expected .onnx, .xml or .plan, or the engine directory)");
    const bool ok = backend == "auto" || backend == fits || (backend == "openvino" && suf == ".onnx");
    if (!ok)
      throw Error(shown + ": backend '" + backend + "' cannot run this file; use backend '" + fits +
                  "' or pass the engine directory");
  }

  // (backend, precision) in the order tried; precision "" = the default rule.
  std::vector<std::pair<std::string, std::string>> candidates;
  std::vector<std::string> notes;
  if (backend != "auto") {
    candidates = {{backend, precision}};
  } else if (!hint.empty()) {
    candidates = {{backend_for_suffix(suffix_of(hint)), precision}};
    if (candidates.front().first == "ort") candidates.push_back({"openvino", precision});  // OpenVINO reads ONNX too
  } else {
    candidates = {{"tensorrt", precision}};
    if (precision.empty()) {  // the fastest gated CPU variant timed here (else the static preference's) goes first
      std::vector<std::string> cpu{"openvino"};
      if (compiled("ort")) cpu.push_back("ort");
      Pick pick = measured_pick(engine_dir, spec, opt.threads > 0 ? opt.threads : default_threads(), cpu);
      notes.push_back("timings: " + pick.note);
      if (pick.backend.empty()) {  // right after stlm-export: the static preference for this CPU
        pick = static_pick(spec, cpu, cpu_flags());
        notes.push_back("static: " + pick.note);
      }
      if (!pick.backend.empty()) candidates.push_back({pick.backend, pick.precision});
    }
    for (const char* b : {"openvino", "ort"})
      if (std::find(candidates.begin(), candidates.end(), std::make_pair(std::string(b), precision)) ==
          candidates.end())
        candidates.push_back({b, precision});
  }

  for (const auto& [cand, cand_precision] : candidates) {
    Planner planner(engine_dir, spec, cand_precision);
    if (!compiled(cand)) {
      if (backend == "auto") {
        notes.push_back(cand + ": not compiled into this build");
        continue;
      }
      throw BackendUnavailable(not_compiled_message(cand));
    }
    std::unique_ptr<Backend> runner;
    std::string art;
    try {
      art = planner.artifact(cand, hint);
      if (opt.verify) verify_artifacts(engine_dir, spec, planner.with_sidecars(art));
      BackendConfig cfg;
      cfg.path = engine_dir / art;
      cfg.where = display_path(cfg.path);
      const ArtifactDesc* entry = spec.artifact(art);
      cfg.precision = cand_precision.empty() ? default_precision(cand, entry) : cand_precision;
      cfg.artifact_precision = entry && entry->precision ? *entry->precision : "";
      cfg.artifact_inference_precision = entry && entry->inference_precision ? *entry->inference_precision : "";
      cfg.threads = opt.threads;
      cfg.device = opt.device;
      cfg.gpu = opt.gpu;
      cfg.sidecar = engine_dir / (art + ".json");
      for (const auto& [k, a] : spec.artifacts)
        if (a.kind == "onnx") cfg.onnx_sha256s.push_back(a.sha256);
      if (cand == "openvino") runner = make_openvino_backend(cfg);
#ifdef STLM_HAVE_ORT
      if (cand == "ort") runner = make_ort_backend(cfg);
#endif
#ifdef STLM_HAVE_TENSORRT
      if (cand == "tensorrt") runner = make_tensorrt_backend(cfg);
#endif
    } catch (const BackendUnavailable& e) {
      if (backend != "auto") throw;
      const std::string msg = e.what();
      notes.push_back(msg.rfind(cand + ":", 0) == 0 ? msg : cand + ": " + msg);
      continue;
    }
    auto impl = std::make_unique<Impl>();
    impl->engine_dir = engine_dir;
    impl->spec = std::move(spec);
    impl->backend = std::move(runner);
    impl->artifact = art;
    impl->notes = std::move(notes);
    impl->batch_size = opt.batch_size;
    for (const auto& n : impl->backend->notes) impl->notes.push_back(cand + ": " + n);
    impl->check_graph();
    return Detector(std::move(impl));
  }
  std::string detail;
  for (const auto& n : notes) detail += (detail.empty() ? "" : " | ") + n;
  throw Error(display_path(engine_dir) + ": no backend can run this engine here (" + detail + ")");
}

std::vector<Prediction> Detector::predict(const std::vector<cv::Mat>& images, bool bgr) const {
  const auto label = [&](size_t i) { return images.size() == 1 ? std::string("image") : "image[" + std::to_string(i) + "]"; };
  for (size_t i = 0; i < images.size(); ++i)  // validate every input before any work (same messages as to_rgb)
    if (images[i].empty() || images[i].depth() != CV_8U || images[i].dims != 2 ||
        (images[i].channels() != 1 && images[i].channels() != 3 && images[i].channels() != 4))
      to_rgb(images[i], bgr, label(i));
  std::vector<Prediction> preds;
  preds.reserve(images.size());
  // Chunk by chunk: only one chunk's RGB copies, input tensor and outputs are alive at a time.
  if (impl_->spec.tiling) {  // image by image; each image's tiles run chunk_size() at a time
    for (size_t i = 0; i < images.size(); ++i) preds.push_back(impl_->predict_tiled(to_rgb(images[i], bgr, label(i))));
    return preds;
  }
  const size_t step = static_cast<size_t>(impl_->chunk_size());
  for (size_t i = 0; i < images.size(); i += step) {
    std::vector<cv::Mat> chunk;
    for (size_t j = i; j < std::min(images.size(), i + step); ++j) chunk.push_back(to_rgb(images[j], bgr, label(j)));
    impl_->run_chunk(chunk, preds);
  }
  return preds;
}

Prediction Detector::predict(const cv::Mat& image, bool bgr) const {
  std::vector<Prediction> p = predict(std::vector<cv::Mat>{image}, bgr);
  return std::move(p.front());
}

Prediction Detector::predict_rgb(const uint8_t* data, int height, int width, size_t stride) const {
  if (!data || height <= 0 || width <= 0)
    throw Error("image: expected packed RGB uint8 pixels with height > 0 and width > 0, got " +
                std::string(data ? "" : "a null pointer, ") + "height " + std::to_string(height) + ", width " +
                std::to_string(width));
  const size_t row = static_cast<size_t>(width) * 3;
  if (stride == 0) stride = row;
  if (stride < row)
    throw Error("image: stride " + std::to_string(stride) + " is smaller than width * 3 = " + std::to_string(row));
  cv::Mat view(height, width, CV_8UC3, const_cast<uint8_t*>(data), stride);
  return predict(view, false);
}

std::string Detector::backend_name() const { return impl_->backend->name; }
std::string Detector::precision() const { return impl_->backend->precision; }
std::string Detector::device() const { return impl_->backend->device; }
std::string Detector::artifact() const { return impl_->artifact; }
std::string Detector::engine_dir() const { return impl_->engine_dir.string(); }
std::string Detector::name() const { return impl_->spec.name; }
int Detector::img_size() const { return impl_->spec.img_size; }
int Detector::work_size() const { return impl_->spec.tiling ? impl_->spec.tiling->work_size : 0; }
double Detector::tile_overlap() const { return impl_->spec.tiling ? impl_->spec.tiling->overlap : 0.0; }
int Detector::top_k() const { return impl_->spec.top_k; }
int Detector::chunk_size() const { return impl_->chunk_size(); }
std::vector<std::string> Detector::notes() const { return impl_->notes; }

Thresholds Detector::thresholds() const {
  const auto& s = impl_->spec;
  return {s.threshold_image, s.threshold_pixel, s.threshold_method, s.score_min, s.score_max};
}

}  // namespace stlm

#include "spec.hpp"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <set>

#include <nlohmann/json.hpp>

#include "common.hpp"

namespace stlm::detail {

using json = nlohmann::ordered_json;

namespace {

const std::vector<std::string> kArtifactKinds = {"onnx", "openvino", "tensorrt", "json"};
const std::vector<std::string> kPrecisions = {"fp32", "fp16", "bf16", "int8"};
const std::vector<std::string> kLayouts = {"NHWC", "NCHW"};
const std::vector<std::string> kInputDtypes = {"uint8", "float32", "float16"};

std::string short_json(const json& v, size_t limit = 60) {
  std::string text = v.dump(-1, ' ', false, json::error_handler_t::replace);
  return text.size() <= limit ? text : text.substr(0, limit - 3) + "...";
}

std::string quoted_list(const std::vector<std::string>& choices) {
  std::string out = "one of ";
  for (size_t i = 0; i < choices.size(); ++i) out += (i ? ", '" : "'") + choices[i] + "'";
  return out;
}

bool is_int(const json& v) { return v.is_number_integer(); }  // booleans are not numbers in nlohmann
bool is_number(const json& v) { return v.is_number(); }

// Typed access to one JSON object with errors that name the file and the dotted field (like spec.py).
class Fields {
 public:
  Fields(const json& data, std::string where, std::string prefix = "")
      : data_(data), where_(std::move(where)), prefix_(std::move(prefix)) {
    if (!data.is_object()) {
      std::string label = prefix_.empty() ? "the top level" : "field '" + prefix_ + "'";
      throw Error(where_ + ": " + label + " must be a JSON object, got " + short_json(data));
    }
  }

  std::string path(const std::string& key) const { return prefix_.empty() ? key : prefix_ + "." + key; }
  const std::string& where() const { return where_; }

  Error fail(const std::string& key, const std::string& expected, const json& got) const {
    return Error(where_ + ": field '" + path(key) + "' must be " + expected + ", got " + short_json(got));
  }
  Error missing(const std::string& key, const std::string& expected = "required") const {
    return Error(where_ + ": field '" + path(key) + "' is missing (" + expected + ")");
  }

  bool has(const std::string& key) const { return data_.contains(key); }
  const json& get(const std::string& key) const {
    auto it = data_.find(key);
    if (it == data_.end()) throw missing(key);
    return *it;
  }

  std::string str(const std::string& key, const std::vector<std::string>& choices = {}, bool nonempty = false) const {
    const json& v = get(key);
    bool ok = v.is_string() && (choices.empty() || std::count(choices.begin(), choices.end(), v.get<std::string>())) &&
              (!nonempty || !v.get<std::string>().empty());
    if (!ok)
      throw fail(key, !choices.empty() ? quoted_list(choices) : (nonempty ? "a non-empty string" : "a string"), v);
    return v.get<std::string>();
  }

  std::optional<std::string> str_or_null(const std::string& key, const std::vector<std::string>& choices) const {
    if (!has(key) || get(key).is_null()) return std::nullopt;
    const json& v = get(key);
    if (!v.is_string() || (!choices.empty() && !std::count(choices.begin(), choices.end(), v.get<std::string>())))
      throw fail(key, quoted_list(choices) + " or null", v);
    return v.get<std::string>();
  }

  int64_t integer(const std::string& key, std::optional<int64_t> minimum = std::nullopt) const {
    const json& v = get(key);
    if (!is_int(v) || (minimum && v.get<int64_t>() < *minimum))
      throw fail(key, minimum ? "an integer >= " + std::to_string(*minimum) : "an integer", v);
    return v.get<int64_t>();
  }

  std::optional<double> number_or_null(const std::string& key) const {
    const json& v = get(key);
    if (v.is_null()) return std::nullopt;
    if (!is_number(v)) throw fail(key, "a number or null", v);
    return v.get<double>();
  }

  bool boolean(const std::string& key) const {
    const json& v = get(key);
    if (!v.is_boolean()) throw fail(key, "true or false", v);
    return v.get<bool>();
  }

  std::vector<int64_t> shape(const std::string& key) const {
    const json& v = get(key);
    bool ok = v.is_array();
    if (ok)
      for (const json& d : v) ok = ok && is_int(d) && (d.get<int64_t>() == -1 || d.get<int64_t>() > 0);
    if (!ok) throw fail(key, "a list of positive integers (-1 = dynamic)", v);
    return v.get<std::vector<int64_t>>();
  }

  std::array<double, 3> triple(const std::string& key, bool positive) const {
    const json& v = get(key);
    bool ok = v.is_array() && v.size() == 3;
    if (ok)
      for (const json& x : v) ok = ok && is_number(x) && (!positive || x.get<double>() > 0);
    if (!ok) throw fail(key, std::string("a list of 3 ") + (positive ? "positive numbers" : "numbers"), v);
    return {v[0].get<double>(), v[1].get<double>(), v[2].get<double>()};
  }

  Fields sub(const std::string& key) const { return Fields(get(key), where_, path(key)); }

 private:
  const json& data_;
  std::string where_;
  std::string prefix_;
};

// NaN, Infinity and -Infinity are not JSON, but Python's json module writes and reads them: mark those bare
// literals (outside strings) as tagged strings so the document parses and the field can be named below.
const std::string kNonFiniteTag = std::string("\x01stlm-nonfinite:");

std::string tag_nonfinite_literals(const std::string& text) {
  std::string out;
  out.reserve(text.size() + 32);
  bool in_string = false;
  size_t i = 0;
  while (i < text.size()) {
    const char c = text[i];
    if (in_string) {
      out.push_back(c);
      if (c == '\\' && i + 1 < text.size()) out.push_back(text[++i]);
      else if (c == '"') in_string = false;
      ++i;
      continue;
    }
    bool tagged = false;
    for (const char* lit : {"-Infinity", "Infinity", "NaN"}) {
      const size_t n = std::char_traits<char>::length(lit);
      if (text.compare(i, n, lit) == 0) {
        out += "\"\\u0001stlm-nonfinite:" + std::string(lit) + "\"";
        i += n;
        tagged = true;
        break;
      }
    }
    if (tagged) continue;
    if (c == '-' || (c >= '0' && c <= '9')) {  // a number literal that overflows a double (1e999) -> +-Infinity
      size_t j = i + 1;
      while (j < text.size() && (std::isdigit(static_cast<unsigned char>(text[j])) || text[j] == '.' ||
                                 text[j] == 'e' || text[j] == 'E' || text[j] == '+' || text[j] == '-'))
        ++j;
      const std::string number = text.substr(i, j - i);
      const double value = std::strtod(number.c_str(), nullptr);
      out += std::isinf(value) ? "\"\\u0001stlm-nonfinite:" + std::string(value > 0 ? "Infinity" : "-Infinity") + "\""
                               : number;
      i = j;
      continue;
    }
    if (c == '"') in_string = true;
    out.push_back(c);
    ++i;
  }
  return out;
}

// The first NaN/+-Infinity anywhere in the document (a tagged literal, or a number like 1e999 that
// overflowed): stlm.json holds finite numbers only, whatever the field.
bool find_nonfinite(const json& v, const std::string& path, std::string& where, std::string& value) {
  if (v.is_number_float() && !std::isfinite(v.get<double>())) {
    const double d = v.get<double>();
    where = path;
    value = std::isnan(d) ? "NaN" : (d > 0 ? "Infinity" : "-Infinity");
    return true;
  }
  if (v.is_string()) {
    const std::string& s = v.get_ref<const std::string&>();
    if (s.rfind(kNonFiniteTag, 0) == 0) {
      where = path;
      value = s.substr(kNonFiniteTag.size());
      return true;
    }
    return false;
  }
  if (v.is_object()) {
    for (const auto& [k, sub] : v.items())
      if (find_nonfinite(sub, path.empty() ? k : path + "." + k, where, value)) return true;
  } else if (v.is_array()) {
    for (size_t i = 0; i < v.size(); ++i)
      if (find_nonfinite(v[i], path + "[" + std::to_string(i) + "]", where, value)) return true;
  }
  return false;
}

void check_relpath(const Fields& f, const std::string& key) {
  fs::path p(key);
  bool bad = key.empty() || key.find('\\') != std::string::npos || p.is_absolute() ||
             (key.size() >= 2 && std::isalpha(static_cast<unsigned char>(key[0])) && key[1] == ':');
  for (const auto& part : p) bad = bad || part == "..";
  if (bad)
    throw Error(f.where() + ": field 'artifacts' key '" + key +
                "' must be a relative path inside the engine directory (forward slashes, no '..')");
}

void validate(const EngineSpec& s, const std::string& where) {
  const int64_t n = s.batch ? s.batch : -1;
  const int64_t sz = s.img_size;
  const InputDesc& in = s.input;
  std::string what = in.fused_preprocessing ? "fused_preprocessing true" : "fused_preprocessing false";
  std::string want_dtype = in.fused_preprocessing ? "uint8" : (in.dtype == "float16" ? "float16" : "float32");
  std::string want_layout = in.fused_preprocessing ? "NHWC" : "NCHW";
  std::vector<int64_t> want_shape = in.fused_preprocessing ? std::vector<int64_t>{n, sz, sz, 3}
                                                           : std::vector<int64_t>{n, 3, sz, sz};
  std::string ctx = " for " + what + ", img_size " + std::to_string(sz) + " and batch " +
                    (s.batch ? std::to_string(s.batch) : std::string("\"dynamic\""));
  if (in.dtype != want_dtype)
    throw Error(where + ": field 'input.dtype' must be \"" + want_dtype + "\"" + ctx + ", got \"" + in.dtype + "\"");
  if (in.layout != want_layout)
    throw Error(where + ": field 'input.layout' must be \"" + want_layout + "\"" + ctx + ", got \"" + in.layout + "\"");
  if (in.shape != want_shape)
    throw Error(where + ": field 'input.shape' must be " + shape_str(want_shape) + ctx + ", got " + shape_str(in.shape));
  std::set<std::string> names;
  for (const auto& o : s.outputs)
    if (!names.insert(o.name).second) throw Error(where + ": field 'outputs' has duplicate name '" + o.name + "'");
  for (const auto& [req, shape] : {std::pair<std::string, std::vector<int64_t>>{"anomaly_map", {n, sz, sz}},
                                   std::pair<std::string, std::vector<int64_t>>{"score", {n}}}) {
    const TensorDesc* o = s.output(req);
    if (!o) throw Error(where + ": field 'outputs' must contain '" + req + "'");
    if (o->dtype != "float32" || o->shape != shape)
      throw Error(where + ": field 'outputs' entry '" + req + "' must be float32 " + shape_str(shape) + ", got " +
                  o->dtype + " " + shape_str(o->shape));
  }
}

}  // namespace

const ArtifactDesc* EngineSpec::artifact(const std::string& relpath) const {
  for (const auto& [k, a] : artifacts)
    if (k == relpath) return &a;
  return nullptr;
}

const VariantDesc* EngineSpec::variant(const std::string& label) const {
  for (const auto& [k, v] : variants)
    if (k == label) return &v;
  return nullptr;
}

const TensorDesc* EngineSpec::output(const std::string& n) const {
  for (const auto& o : outputs)
    if (o.name == n) return &o;
  return nullptr;
}

EngineSpec parse_spec(const std::string& text, const std::string& where) {
  json data;
  try {
    data = json::parse(tag_nonfinite_literals(text));
  } catch (const json::parse_error& e) {
    std::string msg = e.what();
    auto pos = msg.find("] ");
    if (msg.rfind("[json.exception", 0) == 0 && pos != std::string::npos) msg = msg.substr(pos + 2);
    throw Error(where + ": not valid JSON (" + msg + ")");
  }
  Fields f(data, where);
  {
    std::string field, value;
    if (find_nonfinite(data, "", field, value))
      throw Error(where + ": field '" + (field.empty() ? "(top level)" : field) + "' must be a finite number, got " +
                  value);
  }
  EngineSpec s;
  const json& fmt = f.get("format");
  if (!fmt.is_string() || fmt.get<std::string>() != kFormat)
    throw f.fail("format", std::string("'") + kFormat + "' (this is not an STLM engine description)", fmt);
  const json& ver = f.get("format_version");
  if (!is_int(ver) || ver.get<int64_t>() < 1) throw f.fail("format_version", "a positive integer", ver);
  if (ver.get<int64_t>() > kFormatVersion)
    throw Error(where + ": field 'format_version' is " + std::to_string(ver.get<int64_t>()) +
                ", newer than this runtime supports (" + std::to_string(kFormatVersion) +
                "): upgrade stlm-deploy or re-export with a matching version");
  s.format_version = static_cast<int>(ver.get<int64_t>());
  const json& img = f.get("img_size");
  if (!is_int(img) || img.get<int64_t>() <= 0 || img.get<int64_t>() % kImgSizeMultiple)
    throw f.fail("img_size", "a positive multiple of " + std::to_string(kImgSizeMultiple), img);
  s.img_size = static_cast<int>(img.get<int64_t>());
  const json& outs = f.get("outputs");
  if (!outs.is_array() || outs.empty()) throw f.fail("outputs", "a non-empty list of {name, dtype, shape}", outs);
  for (size_t i = 0; i < outs.size(); ++i) {
    Fields o(outs[i], where, "outputs[" + std::to_string(i) + "]");
    s.outputs.push_back({o.str("name", {}, true), o.str("dtype", {}, true), o.shape("shape")});
  }
  const json& batch = f.get("batch");
  if (batch.is_string() && batch.get<std::string>() == "dynamic") {
    s.batch = 0;
  } else if (is_int(batch) && batch.get<int64_t>() > 0) {
    s.batch = static_cast<int>(batch.get<int64_t>());
  } else {
    throw f.fail("batch", "\"dynamic\" or a positive integer", batch);
  }
  const json& arts = f.get("artifacts");
  if (!arts.is_object()) throw f.fail("artifacts", "a JSON object", arts);
  for (const auto& [key, val] : arts.items()) {
    check_relpath(f, key);
    Fields a(val, where, "artifacts." + key);
    ArtifactDesc d;
    d.sha256 = a.str("sha256");
    bool hex64 = d.sha256.size() == 64 && std::all_of(d.sha256.begin(), d.sha256.end(), [](char c) {
      return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
    });
    if (!hex64) throw a.fail("sha256", "64 lowercase hex digits", a.get("sha256"));
    d.kind = a.str("kind", kArtifactKinds);
    d.precision = a.str_or_null("precision", kPrecisions);
    d.bytes = a.integer("bytes", 0);
    d.inference_precision = a.str_or_null("inference_precision", kPrecisions);
    s.artifacts.emplace_back(key, std::move(d));
  }
  if (f.has("tools")) {
    const json& tools = f.get("tools");
    if (!tools.is_object()) throw f.fail("tools", "a JSON object", tools);
    for (const auto& [k, v] : tools.items())
      if (!v.is_string()) throw f.fail("tools." + k, "a version string", v);
  }
  s.model_family = f.str("model_family", {}, true);
  s.name = f.str("name", {}, true);
  {
    Fields in = f.sub("input");
    s.input.name = in.str("name", {}, true);
    s.input.dtype = in.str("dtype", kInputDtypes);
    s.input.shape = in.shape("shape");
    s.input.layout = in.str("layout", kLayouts);
    s.input.channel_order = in.str("channel_order", {"RGB"});
    s.input.fused_preprocessing = in.boolean("fused_preprocessing");
  }
  {
    Fields pre = f.sub("preprocessing");
    s.resize = pre.str("resize", {"area", "bilinear"});
    s.mean = pre.triple("mean", false);
    s.std = pre.triple("std", true);
    // stlm_deploy/spec.py Preprocessing._parse + EngineSpec.validate: same rules, same messages
    if (pre.has("work_size")) {
      Tiling t;
      t.tile = s.img_size;
      t.work_size = static_cast<int>(pre.integer("work_size", 1));
      const json& ov = pre.get("tile_overlap");
      if (!is_number(ov)) throw pre.fail("tile_overlap", "a number", ov);
      t.overlap = ov.get<double>();
      t.blend = pre.str("tile_blend");
      if (t.work_size < t.tile)
        throw Error(where + ": field 'preprocessing.work_size' must be at least the tile size " +
                    std::to_string(t.tile) + " (the model input, img_size), got " + std::to_string(t.work_size));
      if (!(t.overlap >= 0.0 && t.overlap < kMaxTileOverlap))
        throw Error(where + ": field 'preprocessing.tile_overlap' must be a number in [0, 0.9), got " + short_json(ov));
      if (t.blend != "mean")
        throw Error(where + ": field 'preprocessing.tile_blend' must be one of 'mean', got " +
                    short_json(pre.get("tile_blend")));
      if (s.format_version < kTiledVersion)
        throw Error(where + ": field 'format_version' must be " + std::to_string(kTiledVersion) +
                    " or more for a tiled engine (preprocessing.work_size), got " + std::to_string(s.format_version) +
                    ": a runtime older than tiling would read version 1 and run it untiled");
      s.tiling = t;
    } else {
      std::string stray;
      for (const char* k : {"tile_overlap", "tile_blend"})
        if (pre.has(k)) stray += (stray.empty() ? "" : ", ") + std::string(k);
      if (!stray.empty())
        throw Error(where + ": field 'preprocessing.work_size' must be given with " + stray +
                    " (a tiled engine names its work size), got null");
    }
  }
  s.top_k = static_cast<int>(f.integer("top_k", 1));
  {
    Fields t = f.sub("thresholds");
    s.threshold_image = t.number_or_null("image");
    s.threshold_pixel = t.number_or_null("pixel");
    s.threshold_method = t.str("method");
    if (t.has("score_min")) s.score_min = t.number_or_null("score_min");
    if (t.has("score_max")) s.score_max = t.number_or_null("score_max");
    if (s.score_min.has_value() != s.score_max.has_value())
      throw Error(where + ": field 'thresholds." + std::string(s.score_min ? "score_max" : "score_min") +
                  "' must be given together with its partner (score_min/score_max) or both null");
    if (s.score_min && !(*s.score_max > *s.score_min))
      throw Error(where + ": field 'thresholds.score_max' must be greater than score_min (" +
                  std::to_string(*s.score_min) + "), got " + std::to_string(*s.score_max));
  }
  if (f.has("source")) Fields(f.get("source"), where, "source");
  if (f.has("variants")) {  // stlm_deploy/spec.py _parse_variants: same rules, same messages
    const json& vars = f.get("variants");
    if (!vars.is_object()) throw f.fail("variants", "a JSON object", vars);
    for (const auto& [label, val] : vars.items()) {
      const auto slash = label.find('/');
      const std::string backend = label.substr(0, slash), precision = slash == std::string::npos ? "" : label.substr(slash + 1);
      const bool ok = (backend == "ort" || backend == "openvino" || backend == "tensorrt") &&
                      std::count(kPrecisions.begin(), kPrecisions.end(), precision);
      if (!ok)
        throw Error(where + ": field 'variants' key '" + label + "' must be <backend>/<precision> with backend one of "
                    "ort, openvino, tensorrt and precision one of fp32, fp16, bf16, int8");
      Fields v(val, where, "variants." + label);
      VariantDesc d;
      d.artifact = v.str("artifact", {}, true);
      fs::path ap(d.artifact);
      bool bad = d.artifact.find('\\') != std::string::npos || ap.is_absolute();
      for (const auto& part : ap) bad = bad || part == "..";
      if (bad)
        throw v.fail("artifact", "a relative path inside the engine directory (forward slashes, no '..')", v.get("artifact"));
      d.gated = v.boolean("gated");
      if (v.has("why")) d.why = v.str("why");
      if (v.has("evidence") && v.get("evidence").is_object()) {
        const json& ev = v.get("evidence");
        if (ev.contains("sufficient") && ev["sufficient"].is_boolean()) d.evidence_sufficient = ev["sufficient"].get<bool>();
        if (ev.contains("n_images") && ev["n_images"].is_number_integer()) d.evidence_images = ev["n_images"].get<int64_t>();
      }
      s.variants.emplace_back(label, std::move(d));
    }
  }
  s.opset = static_cast<int>(f.integer("opset", 1));
  validate(s, where);
  return s;
}

EngineSpec load_spec(const fs::path& engine_dir) {
  fs::path p = engine_dir / kSpecFilename;
  return parse_spec(read_file(p), display_path(p));
}

std::pair<fs::path, std::string> resolve_engine(const fs::path& path) {
  std::error_code ec;
  if (!fs::exists(path, ec))
    throw Error(display_path(path) + ": no such engine directory or file");
  if (fs::is_directory(path, ec)) {
    if (fs::is_regular_file(path / kSpecFilename, ec)) return {path, ""};
    fs::path parent = path.lexically_normal().parent_path();
    if (path.lexically_normal().filename() == "openvino" && fs::is_regular_file(parent / kSpecFilename, ec)) {
      std::vector<std::string> xml;
      for (const auto& e : fs::directory_iterator(path, ec))
        if (e.path().extension() == ".xml") xml.push_back(e.path().filename().string());
      std::sort(xml.begin(), xml.end());
      return {parent, xml.empty() ? "" : "openvino/" + xml.front()};
    }
    throw Error(display_path(path) + ": not an engine directory (no " + kSpecFilename +
                "); pass the folder written by stlm-export");
  }
  fs::path file = path.lexically_normal();
  fs::path parent = file.parent_path();
  if (parent.empty()) parent = ".";
  fs::path engine_dir;
  std::string prefix;
  if (fs::is_regular_file(parent / kSpecFilename, ec)) {
    engine_dir = parent;
  } else if (parent.filename() == "openvino" && fs::is_regular_file(parent.parent_path() / kSpecFilename, ec)) {
    engine_dir = parent.parent_path();
    prefix = "openvino/";
  } else {
    throw Error(display_path(path) + ": not inside an engine directory (no " + kSpecFilename +
                " next to it or one level up)");
  }
  std::string name = file.filename().string();
  auto ends_with = [](const std::string& s, const std::string& t) {
    return s.size() >= t.size() && s.compare(s.size() - t.size(), t.size(), t) == 0;
  };
  if (name == kSpecFilename || (ends_with(name, ".json") && !ends_with(name, ".plan.json"))) return {engine_dir, ""};
  if (ends_with(name, ".plan.json")) {
    std::string plan = name.substr(0, name.size() - 5);
    return {engine_dir, fs::exists(parent / plan, ec) ? prefix + plan : ""};
  }
  if (file.extension() == ".bin" && fs::exists(fs::path(file).replace_extension(".xml"), ec))
    return {engine_dir, prefix + fs::path(name).replace_extension(".xml").string()};
  return {engine_dir, prefix + name};
}

void verify_artifacts(const fs::path& engine_dir, const EngineSpec& spec, const std::vector<std::string>& names) {
  for (const std::string& name : names) {
    const ArtifactDesc* art = spec.artifact(name);
    fs::path p = engine_dir / name;
    if (!art)
      throw Error(display_path(engine_dir / kSpecFilename) + ": artifact '" + name +
                  "' is not listed in field 'artifacts', so its checksum cannot be verified (re-export, or skip "
                  "verification with verify=false / --no-verify)");
    std::error_code ec;
    if (!fs::is_regular_file(p, ec))
      throw Error(display_path(p) + ": listed in " + kSpecFilename +
                  " but missing: the engine directory is incomplete; re-export or copy it again");
    std::string found = sha256_file(p);
    if (found != art->sha256)
      throw Error(display_path(p) + ": sha256 mismatch (expected " + art->sha256.substr(0, 12) + "..., found " +
                  found.substr(0, 12) + "...): the file was modified after export; re-export");
  }
}

}  // namespace stlm::detail

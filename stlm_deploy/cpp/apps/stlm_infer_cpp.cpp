// stlm_infer_cpp: score images with an exported STLM engine from C++ (example app of the stlm::deploy library).
//
//   stlm_infer_cpp ENGINE IMAGE... [--out DIR] [--backend auto|openvino|ort|tensorrt] [--precision P]
//                  [--threads N] [--batch-size N] [--max-pixels N] [--json] [--bench N] [--save-maps DIR]
//                  [--no-verify] [--verbose]
//
// Prints one line per image on stdout: "path score decision" (decision: anomalous | normal | none when the
// engine has no image threshold), plus the median latency in ms with --bench N. --json prints one JSON
// document instead (always valid UTF-8 JSON: bytes of a file name that are not UTF-8 become U+FFFD). --out DIR writes overlays DIR/<name>.png (JET heat map blended 50% + outline of
// map > pixel threshold); --save-maps DIR writes each full-size map as DIR/<name>.npy (float32).
// IMAGE may be a folder (searched recursively). Errors are ONE line on stderr each: an engine error stops
// everything (exit 1); a missing or unreadable image is reported, the others are still processed, and the
// exit code is 1. Bad arguments / no images: exit 2. Each --json result names the backend and precision that
// ran. Overlays and maps are written durably (temp file, checked write/fsync/close, rename).
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>
#include <opencv2/core.hpp>
#include <opencv2/core/utils/logger.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "stlm/detector.hpp"

namespace fs = std::filesystem;
using json = nlohmann::ordered_json;

namespace {

const char* kUsage =
    "usage: stlm_infer_cpp ENGINE IMAGE... [--out DIR] [--backend auto|openvino|ort|tensorrt]\n"
    "                      [--precision fp32|bf16|fp16|int8|device] [--threads N] [--batch-size N]\n"
    "                      [--max-pixels N] [--json] [--bench N]\n"
    "                      [--save-maps DIR] [--no-verify] [--verbose] [--list-backends]\n"
    "\n"
    "Score images with an exported STLM engine (the directory written by stlm-export, or a file in it).\n"
    "stdout: one line per image 'path score decision' (anomalous | normal | none without a threshold).\n"
    "  --out DIR        write overlays DIR/<name>.png (heat map + defect outline)\n"
    "  --save-maps DIR  write each anomaly map (image size, float32) as DIR/<name>.npy\n"
    "  --backend B      auto (default), openvino, ort, tensorrt\n"
    "  --precision P    openvino inference precision (default fp32) / artifact precision\n"
    "  --threads N      CPU threads (default: all CPUs this process may use)\n"
    "  --batch-size N   images per backend call for batched predict() on a dynamic engine (default 8)\n"
    "  --max-pixels N   refuse images with more pixels, read from the file header before decoding\n"
    "                   (default 64000000, as stlm-infer; 0 = no cap)\n"
    "  --json           print one JSON document (results + failures + backend) instead of lines;\n"
    "                   file-name bytes that are not UTF-8 are written as U+FFFD (valid JSON)\n"
    "  --bench N        time N predictions per image after one warm-up; report the median in ms\n"
    "  --no-verify      skip the sha256 check of the artifacts\n"
    "  --verbose        print which backend/artifact runs on stderr\n"
    "  --list-backends  print the backends compiled into this build and exit\n"
    "Exit status: 0 ok, 1 engine error or some images failed (each reported on one stderr line), 2 usage.\n";

const std::set<std::string> kImageExtensions = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp",
                                                ".pgm", ".ppm", ".pbm", ".jp2"};

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Args {
  std::string engine;
  std::vector<std::string> inputs;
  std::string out, save_maps;
  stlm::LoadOptions load;
  bool json = false, verbose = false, list_backends = false;
  int bench = 0;
  long long max_pixels = 64000000;  // stlm_deploy.images.DEFAULT_MAX_PIXELS
};

int parse_int(const std::string& flag, const std::string& v, int minimum) {
  char* end = nullptr;
  long x = std::strtol(v.c_str(), &end, 10);
  if (v.empty() || *end || x < minimum || x > 1000000)
    throw UsageError(flag + ": expected an integer >= " + std::to_string(minimum) + ", got '" + v + "'");
  return static_cast<int>(x);
}

Args parse(int argc, char** argv) {
  Args a;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    std::string s = argv[i];
    auto value = [&](const std::string& flag) {
      if (i + 1 >= argc) throw UsageError(flag + ": missing value");
      return std::string(argv[++i]);
    };
    std::string flag = s, inline_value;
    bool has_inline = false;
    if (s.rfind("--", 0) == 0 && s.find('=') != std::string::npos) {
      flag = s.substr(0, s.find('='));
      inline_value = s.substr(s.find('=') + 1);
      has_inline = true;
    }
    auto take = [&](const std::string& f) { return has_inline ? inline_value : value(f); };
    if (flag == "-h" || flag == "--help") {
      std::cout << kUsage;
      std::exit(0);
    } else if (flag == "--out") {
      a.out = take(flag);
    } else if (flag == "--save-maps") {
      a.save_maps = take(flag);
    } else if (flag == "--backend") {
      a.load.backend = take(flag);
    } else if (flag == "--precision") {
      a.load.precision = take(flag);
    } else if (flag == "--threads") {
      a.load.threads = parse_int(flag, take(flag), 0);
    } else if (flag == "--batch-size") {
      a.load.batch_size = parse_int(flag, take(flag), 1);
    } else if (flag == "--max-pixels") {
      const std::string v = take(flag);
      char* end = nullptr;
      const long long x = std::strtoll(v.c_str(), &end, 10);
      if (v.empty() || *end || x < 0) throw UsageError(flag + ": expected an integer >= 0, got '" + v + "'");
      a.max_pixels = x;
    } else if (flag == "--bench") {
      a.bench = parse_int(flag, take(flag), 1);
    } else if (flag == "--json") {
      a.json = true;
    } else if (flag == "--no-verify") {
      a.load.verify = false;
    } else if (flag == "--verbose" || flag == "-v") {
      a.verbose = true;
    } else if (flag == "--list-backends") {
      a.list_backends = true;
    } else if (s == "--") {
      for (++i; i < argc; ++i) positional.emplace_back(argv[i]);
    } else if (s.size() > 1 && s[0] == '-') {
      throw UsageError("no such option: " + s);
    } else {
      positional.push_back(s);
    }
  }
  if (a.list_backends) return a;
  if (positional.empty()) throw UsageError("missing ENGINE and IMAGE arguments");
  a.engine = positional.front();
  a.inputs.assign(positional.begin() + 1, positional.end());
  if (a.inputs.empty()) throw UsageError("no IMAGE given: pass image files or folders");
  return a;
}

struct Input {
  std::string path;      // as given / found
  std::string key;       // output name without extension (unique)
  std::string problem;   // set when the input does not exist
};

// Files/folders -> (path, unique key) like stlm-infer's collect_inputs; missing paths keep their problem.
std::vector<Input> collect(const std::vector<std::string>& items) {
  std::vector<Input> out;
  std::set<std::string> keys, seen;
  auto add = [&](const fs::path& p, std::string key) {
    std::error_code ec;
    std::string real = fs::weakly_canonical(p, ec).string();
    if (!seen.insert(real).second) return;
    std::string base = key;
    for (int i = 2; keys.count(key); ++i) key = base + "-" + std::to_string(i);
    keys.insert(key);
    out.push_back({p.string(), key, ""});
  };
  for (const std::string& item : items) {
    fs::path p(item);
    std::error_code ec;
    if (fs::is_directory(p, ec)) {
      std::vector<fs::path> files;
      for (auto it = fs::recursive_directory_iterator(p, ec); !ec && it != fs::recursive_directory_iterator();
           it.increment(ec)) {
        std::string ext = it->path().extension().string();
        std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
        if (it->is_regular_file(ec) && kImageExtensions.count(ext)) files.push_back(it->path());
      }
      std::sort(files.begin(), files.end());
      for (const auto& f : files) add(f, fs::path(f.lexically_relative(p)).replace_extension().generic_string());
    } else if (fs::exists(p, ec)) {
      add(p, p.stem().string());
    } else {
      out.push_back({item, "", item + ": no such file or directory"});
    }
  }
  return out;
}

// Write bytes durably and atomically: a temp file in the same folder, written, fsynced and closed with every
// step checked (a full disk or a file-size limit often fails only at flush/close), then renamed over `dest`
// and the folder fsynced. Any failure: one-line error naming `dest`, the temp file removed, `dest` untouched.
void write_atomic(const fs::path& dest, const std::string& bytes) {
  std::error_code ec;
  const fs::path dir = dest.has_parent_path() ? dest.parent_path() : fs::path(".");
  fs::create_directories(dir, ec);
  fs::path tmp = dir / ("." + dest.filename().string() + "." + std::to_string(::getpid()) + ".tmp");
  auto fail = [&](const char* step, int err) {
    fs::remove(tmp, ec);
    throw std::runtime_error(dest.string() + ": cannot write (" + step + ": " + std::strerror(err) + ")");
  };
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  if (fd < 0) fail("open", errno);
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = n < 0 ? errno : EIO;
      ::close(fd);
      fail("write", err);
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) {
    const int err = errno;
    ::close(fd);
    fail("fsync", err);
  }
  if (::close(fd) != 0) fail("close", errno);
  if (::rename(tmp.c_str(), dest.c_str()) != 0) fail("rename", errno);
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {  // the rename itself is durable; file systems that cannot sync a folder are tolerated
    ::fsync(dfd);
    ::close(dfd);
  }
}

// A float32 (H, W) map as a .npy file (format version 1.0, C order).
std::string npy_bytes(const cv::Mat& map) {
  CV_Assert(map.type() == CV_32FC1);
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + std::to_string(map.rows) + ", " +
                       std::to_string(map.cols) + "), }";
  const size_t unpadded = 10 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header.push_back('\n');
  std::string out = "\x93NUMPY";
  out.push_back('\x01');
  out.push_back('\x00');
  out.push_back(static_cast<char>(header.size() & 0xff));
  out.push_back(static_cast<char>((header.size() >> 8) & 0xff));
  out += header;
  cv::Mat c = map.isContinuous() ? map : map.clone();
  out.append(reinterpret_cast<const char*>(c.data), c.total() * sizeof(float));
  return out;
}

std::string png_bytes(const cv::Mat& image) {
  std::vector<uchar> buf;
  if (!cv::imencode(".png", image, buf)) throw std::runtime_error("PNG encoding failed");
  return std::string(buf.begin(), buf.end());
}

// The rules of stlm_deploy/images.py (the one reader): EXIF orientation applied (IMREAD_ANYDEPTH |
// IMREAD_ANYCOLOR), 16-bit scaled by 255/65535, float in [0, 1] times 255, grey replicated, alpha dropped.
cv::Mat to_bgr8(const cv::Mat& decoded) {
  if (decoded.empty()) return {};
  cv::Mat img = decoded;
  if (img.depth() == CV_16U) {
    cv::Mat f;
    img.convertTo(f, CV_32F);
    f.convertTo(img, CV_8U, 255.0 / 65535.0);
  } else if (img.depth() == CV_32F || img.depth() == CV_64F) {
    double lo = 0, hi = 0;
    cv::minMaxLoc(img.reshape(1), &lo, &hi);
    img.convertTo(img, CV_8U, hi <= 1.0 ? 255.0 : 1.0);
  } else if (img.depth() != CV_8U) {
    img.convertTo(img, CV_8U);
  }
  if (img.channels() == 1 || img.channels() == 2) {
    cv::Mat grey;
    cv::extractChannel(img, grey, 0);
    cv::cvtColor(grey, img, cv::COLOR_GRAY2BGR);
  } else if (img.channels() == 4) {
    cv::cvtColor(img, img, cv::COLOR_BGRA2BGR);
  }
  return img;
}

// (width, height) from an encoded image's header, as stlm_deploy/images.py's image_size() (PNG IHDR, JPEG
// SOFn, BMP, TIFF, WebP); {0, 0} when the format or header is not recognised (the decoder then decides).
std::pair<uint64_t, uint64_t> header_size(const std::vector<uchar>& b) {
  const size_t n = b.size();
  auto be16 = [&](size_t i) { return i + 2 <= n ? (uint64_t(b[i]) << 8) | b[i + 1] : 0; };
  auto be32 = [&](size_t i) { return i + 4 <= n ? (be16(i) << 16) | be16(i + 2) : 0; };
  auto le16 = [&](size_t i) { return i + 2 <= n ? (uint64_t(b[i + 1]) << 8) | b[i] : 0; };
  auto le32 = [&](size_t i) { return i + 4 <= n ? (le16(i + 2) << 16) | le16(i) : 0; };
  auto starts = [&](size_t at, const char* magic, size_t len) {
    return n >= at + len && std::memcmp(b.data() + at, magic, len) == 0;
  };
  if (starts(0, "\x89PNG\r\n\x1a\n", 8) && starts(12, "IHDR", 4)) return {be32(16), be32(20)};
  if (starts(0, "\xff\xd8", 2)) {
    size_t i = 2;
    while (i + 4 <= n && b[i] == 0xFF) {
      const uchar m = b[i + 1];
      if (m == 0xFF) { ++i; continue; }
      if (m == 0x01 || m == 0xD8 || (m >= 0xD0 && m <= 0xD7)) { i += 2; continue; }
      if (m >= 0xC0 && m <= 0xCF && m != 0xC4 && m != 0xC8 && m != 0xCC) return {be16(i + 7), be16(i + 5)};
      if (m == 0xDA) break;
      i += 2 + be16(i + 2);
    }
    return {0, 0};
  }
  if (starts(0, "BM", 2) && n >= 26) {
    if (le32(14) == 12) return {le16(18), le16(20)};
    const int32_t w = static_cast<int32_t>(le32(18)), h = static_cast<int32_t>(le32(22));
    return {static_cast<uint64_t>(std::llabs(w)), static_cast<uint64_t>(std::llabs(h))};
  }
  if (starts(0, "II*\0", 4) || starts(0, "MM\0*", 4)) {
    const bool le = b[0] == 'I';
    auto u16 = [&](size_t i) { return le ? le16(i) : be16(i); };
    auto u32 = [&](size_t i) { return le ? le32(i) : be32(i); };
    const uint64_t off = u32(4);
    const uint64_t count = u16(off);
    uint64_t w = 0, h = 0;
    for (uint64_t k = 0; k < count && k < 4096; ++k) {
      const size_t e = off + 2 + k * 12;
      if (e + 12 > n) break;
      const uint64_t tag = u16(e), type = u16(e + 2);
      const uint64_t v = type == 3 ? u16(e + 8) : u32(e + 8);
      if (tag == 256) w = v;
      if (tag == 257) h = v;
    }
    return w && h ? std::make_pair(w, h) : std::make_pair(uint64_t(0), uint64_t(0));
  }
  if (starts(0, "RIFF", 4) && starts(8, "WEBP", 4) && n >= 30) {
    if (starts(12, "VP8X", 4))
      return {(uint64_t(b[24]) | uint64_t(b[25]) << 8 | uint64_t(b[26]) << 16) + 1,
              (uint64_t(b[27]) | uint64_t(b[28]) << 8 | uint64_t(b[29]) << 16) + 1};
    if (starts(12, "VP8L", 4) && b[20] == 0x2F) {
      const uint64_t bits = le32(21);
      return {(bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1};
    }
    if (starts(12, "VP8 ", 4)) return {le16(26) & 0x3FFF, le16(28) & 0x3FFF};
  }
  return {0, 0};
}

std::string with_commas(uint64_t v) {
  std::string s = std::to_string(v);
  for (int i = static_cast<int>(s.size()) - 3; i > 0; i -= 3) s.insert(static_cast<size_t>(i), ",");
  return s;
}

cv::Mat read_image(const std::string& path, std::string& problem, long long max_pixels) {
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    problem = path + ": cannot read (" + std::string(std::strerror(errno)) + ")";
    return {};
  }
  if (max_pixels > 0) {  // refuse from the header, before the file is read whole or decoded
    std::vector<uchar> head(1 << 20);
    f.read(reinterpret_cast<char*>(head.data()), static_cast<std::streamsize>(head.size()));
    head.resize(static_cast<size_t>(f.gcount()));
    const auto [w, h] = header_size(head);
    if (w && h && w * h > static_cast<uint64_t>(max_pixels)) {
      problem = path + ": image is too large to decode (" + std::to_string(w) + "x" + std::to_string(h) + " = " +
                with_commas(w * h) + " pixels, limit " + with_commas(static_cast<uint64_t>(max_pixels)) +
                "; raise --max-pixels to allow it)";
      return {};
    }
    f.clear();
    f.seekg(0);
  }
  std::vector<uchar> data((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  cv::Mat img;
  if (!data.empty()) {
    try {
      img = to_bgr8(cv::imdecode(data, cv::IMREAD_ANYDEPTH | cv::IMREAD_ANYCOLOR));
    } catch (const cv::Exception&) {
      img.release();
    }
  }
  if (img.empty()) problem = path + ": cannot decode as an image (unsupported format, empty or corrupt file)";
  return img;
}

std::string fmt_score(float s) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.8g", static_cast<double>(s));
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  cv::utils::logging::setLogLevel(cv::utils::logging::LOG_LEVEL_SILENT);  // one line per error, ours
  Args args;
  try {
    args = parse(argc, argv);
  } catch (const UsageError& e) {
    std::cerr << "Error: " << e.what() << " (see --help)\n";
    return 2;
  }
  if (args.list_backends) {
    for (const auto& b : stlm::Detector::compiled_backends()) std::cout << b << "\n";
    return 0;
  }
  std::vector<Input> inputs = collect(args.inputs);
  const bool any_file = std::any_of(inputs.begin(), inputs.end(), [](const Input& i) { return i.problem.empty(); });
  if (!any_file) {
    std::string what;
    for (const auto& i : inputs) what += (what.empty() ? "" : "; ") + i.problem;
    std::cerr << "Error: no input images found (" << what << ")\n";
    return 2;
  }

  std::optional<stlm::Detector> det;
  try {
    det.emplace(stlm::Detector::load(args.engine, args.load));
  } catch (const std::exception& e) {
    std::cerr << "Error: " << stlm::Error(e.what()).what() << "\n";
    return 1;
  }
  if (args.verbose) {
    std::cerr << "stlm_infer_cpp: " << det->name() << " on " << det->backend_name() << " (" << det->precision()
              << ", " << det->device() << "); artifact " << det->artifact() << "; chunk " << det->chunk_size()
              << "\n";
    for (const auto& n : det->notes()) std::cerr << "stlm_infer_cpp: note: " << n << "\n";
  }
  const stlm::Thresholds thr = det->thresholds();

  json results = json::array(), failed = json::array();
  for (const Input& in : inputs) {
    auto fail = [&](const std::string& msg) {
      std::cerr << msg << "; skipped\n";
      failed.push_back({{"path", in.path}, {"error", msg}});
    };
    if (!in.problem.empty()) {
      fail(in.problem);
      continue;
    }
    std::string problem;
    cv::Mat bgr = read_image(in.path, problem, args.max_pixels);
    if (bgr.empty()) {
      fail(problem);
      continue;
    }
    try {
      stlm::Prediction pred = det->predict(bgr, true);
      json r = {{"path", in.path}, {"score", pred.score}, {"is_anomalous", nullptr},
                {"height", bgr.rows}, {"width", bgr.cols}, {"backend", pred.backend},
                {"precision", pred.precision}, {"n_tiles", pred.n_tiles}};
      if (pred.is_anomalous) r["is_anomalous"] = *pred.is_anomalous;
      r["normalized_score"] = pred.normalized_score ? json(*pred.normalized_score) : json(nullptr);
      double median_ms = -1;
      if (args.bench > 0) {
        det->predict(bgr, true);  // warm-up
        std::vector<double> ms;
        for (int k = 0; k < args.bench; ++k) {
          auto t0 = std::chrono::steady_clock::now();
          det->predict(bgr, true);
          ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
        }
        std::sort(ms.begin(), ms.end());
        const size_t n = ms.size();
        median_ms = n % 2 ? ms[n / 2] : 0.5 * (ms[n / 2 - 1] + ms[n / 2]);
        r["latency_ms"] = {{"median", median_ms}, {"runs", args.bench}};
      }
      if (!args.save_maps.empty()) {
        fs::path p = fs::path(args.save_maps) / (in.key + ".npy");
        write_atomic(p, npy_bytes(pred.anomaly_map));
        r["map"] = p.string();
      }
      if (!args.out.empty()) {
        fs::path p = fs::path(args.out) / (in.key + ".png");
        write_atomic(p, png_bytes(stlm::overlay(bgr, pred.anomaly_map, thr.pixel, true)));
        r["overlay"] = p.string();
      }
      if (!args.json) {
        std::string decision = pred.is_anomalous ? (*pred.is_anomalous ? "anomalous" : "normal") : "none";
        std::cout << in.path << " " << fmt_score(pred.score) << " " << decision;
        if (pred.normalized_score) std::cout << " " << fmt_score(*pred.normalized_score);
        if (args.bench > 0) {
          char buf[32];
          std::snprintf(buf, sizeof buf, "%.3f", median_ms);
          std::cout << " " << buf << "ms";
        }
        std::cout << std::endl;
      }
      results.push_back(std::move(r));
    } catch (const std::exception& e) {
      fail(in.path + ": " + stlm::Error(e.what()).what());
    }
  }
  if (args.json) {
    json doc = {{"engine", det->engine_dir()},
                {"name", det->name()},
                {"backend", det->backend_name()},
                {"precision", det->precision()},
                {"device", det->device()},
                {"artifact", det->artifact()},
                {"results", results},
                {"failed", failed}};
    // replace: a file name that is not valid UTF-8 must not make the whole document unprintable
    std::cout << doc.dump(2, ' ', false, json::error_handler_t::replace) << std::endl;
  }
  return failed.empty() ? 0 : 1;
}

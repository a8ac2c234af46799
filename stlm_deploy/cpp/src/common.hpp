// Internal helpers shared by the runtime's translation units (not installed).
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "stlm/detector.hpp"

namespace stlm::detail {

namespace fs = std::filesystem;

// Collapse all whitespace runs (newlines included) into single spaces: messages stay one line.
std::string one_line(const std::string& text);

// First non-empty line of a library error (OpenVINO/TensorRT messages span many lines), at most `limit` chars.
std::string first_line(const std::string& text, size_t limit = 300);

// A path as the user would recognise it: relative to the working directory when inside it.
std::string display_path(const fs::path& path);

// Lowercase hex SHA-256 of a file (OpenSSL EVP); throws stlm::Error naming the file if unreadable.
std::string sha256_file(const fs::path& path);

// Whole file as bytes/text; throws stlm::Error "<path>: cannot read (...)".
std::string read_file(const fs::path& path);

// A shape as "[-1, 256, 256, 3]" (-1 = dynamic), for error messages about graphs and stlm.json;
// open/close "(" ")" give numpy's tuple style used for input arrays.
std::string shape_str(const std::vector<int64_t>& shape, const char* open = "[", const char* close = "]");

// CPUs this process may use (sched_getaffinity), at least 1: the default thread count.
int default_threads();

// IEEE binary16 <-> binary32, round-to-nearest-even (what numpy's astype(float16) does).
uint16_t float_to_half(float value);
float half_to_float(uint16_t bits);

}  // namespace stlm::detail

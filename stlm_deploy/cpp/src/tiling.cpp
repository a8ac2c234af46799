#include "tiling.hpp"

#include <algorithm>
#include <cmath>
#include <functional>
#include <stdexcept>

namespace stlm::detail {

int Tiling::stride() const { return std::max(1, static_cast<int>(std::floor(tile * (1.0 - overlap)))); }

std::pair<int, int> Tiling::work_shape(int height, int width) const {
  const long long l = std::max(height, width);
  auto side = [&](int s) {
    const long long v = (2LL * s * work_size + l) / (2 * l);  // round half up of s * work_size / l
    return std::max(tile, static_cast<int>(v));
  };
  return {side(height), side(width)};
}

std::vector<int> axis_positions(int length, int tile, int stride) {
  if (length < tile) throw std::invalid_argument("axis shorter than the tile");
  const int span = length - tile;
  if (span == 0) return {0};
  const int count = (span + stride - 1) / stride + 1;
  std::vector<int> out(static_cast<size_t>(count));
  for (int i = 0; i < count; ++i) out[static_cast<size_t>(i)] = static_cast<int>((1LL * i * span) / (count - 1));
  return out;
}

std::vector<std::pair<int, int>> Tiling::grid(int work_h, int work_w) const {
  std::vector<std::pair<int, int>> out;
  for (int y : axis_positions(work_h, tile, stride()))
    for (int x : axis_positions(work_w, tile, stride())) out.emplace_back(y, x);
  return out;
}

Stitcher::Stitcher(const Tiling& tiling, int work_h, int work_w)
    : tile_(tiling.tile), h_(work_h), w_(work_w), acc_(static_cast<size_t>(work_h) * work_w, 0.0),
      cy_(static_cast<size_t>(work_h), 0), cx_(static_cast<size_t>(work_w), 0) {
  for (int p : axis_positions(h_, tile_, tiling.stride()))
    for (int i = p; i < p + tile_; ++i) ++cy_[static_cast<size_t>(i)];
  for (int p : axis_positions(w_, tile_, tiling.stride()))
    for (int i = p; i < p + tile_; ++i) ++cx_[static_cast<size_t>(i)];
}

void Stitcher::add(int y, int x, const float* tile_map) {
  for (int r = 0; r < tile_; ++r) {
    double* row = acc_.data() + static_cast<size_t>(y + r) * w_ + x;
    const float* src = tile_map + static_cast<size_t>(r) * tile_;
    for (int c = 0; c < tile_; ++c) row[c] += static_cast<double>(src[c]);
  }
}

cv::Mat Stitcher::result() const {
  cv::Mat out(h_, w_, CV_32FC1);
  for (int y = 0; y < h_; ++y) {
    float* o = out.ptr<float>(y);
    const double* a = acc_.data() + static_cast<size_t>(y) * w_;
    for (int x = 0; x < w_; ++x)
      o[x] = static_cast<float>(a[x] / static_cast<double>(cy_[static_cast<size_t>(y)] * cx_[static_cast<size_t>(x)]));
  }
  return out;
}

float topk_mean(const cv::Mat& map, int k) {
  CV_Assert(map.type() == CV_32FC1 && map.isContinuous());
  const float* p = map.ptr<float>();
  std::vector<float> v(p, p + map.total());
  const size_t kk = std::max<size_t>(1, std::min<size_t>(static_cast<size_t>(k), v.size()));
  std::nth_element(v.begin(), v.begin() + static_cast<long>(kk - 1), v.end(), std::greater<float>());
  std::sort(v.begin(), v.begin() + static_cast<long>(kk), std::greater<float>());
  double total = 0.0;
  for (size_t i = 0; i < kk; ++i) total += static_cast<double>(v[i]);
  return static_cast<float>(total / static_cast<double>(kk));
}

}  // namespace stlm::detail

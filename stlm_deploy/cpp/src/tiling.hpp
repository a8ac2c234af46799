// Tiled inference, mirroring stlm_deploy/tiling.py operation for operation (docs/engine_format.md, "Tiling"):
// the work shape (long side work_size, aspect kept, no side below the tile), the tile positions per axis, the
// "mean" blend (float64 sums in tile order, divided by the number of covering tiles, rounded to float32) and the
// top-k score of the stitched map (float64, largest first). Python and C++ give the same stitched map bit for bit
// from the same tile maps.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include <opencv2/core.hpp>

namespace stlm::detail {

struct Tiling {
  int tile = 0;          // the graph's input side (stlm.json img_size)
  int work_size = 0;     // long side of the work image
  double overlap = 0.0;  // fraction of a tile neighbours share at least, in [0, 0.9)
  std::string blend = "mean";

  int stride() const;
  // (h, w) an image of (height, width) is resized to.
  std::pair<int, int> work_shape(int height, int width) const;
  // (y, x) of every tile of a work image, row by row.
  std::vector<std::pair<int, int>> grid(int work_h, int work_w) const;
};

// Start of every tile along one axis of `length` >= tile pixels.
std::vector<int> axis_positions(int length, int tile, int stride);

// Accumulates tile maps (CV_32FC1, tile x tile) at their positions; result() is the blended CV_32FC1 work map.
class Stitcher {
 public:
  Stitcher(const Tiling& tiling, int work_h, int work_w);
  void add(int y, int x, const float* tile_map);  // tile * tile floats, row-major
  cv::Mat result() const;

 private:
  int tile_, h_, w_;
  std::vector<double> acc_;
  std::vector<long long> cy_, cx_;
};

// Mean of the k largest pixels of a CV_32FC1 map, summed in double from the largest down.
float topk_mean(const cv::Mat& map, int k);

}  // namespace stlm::detail

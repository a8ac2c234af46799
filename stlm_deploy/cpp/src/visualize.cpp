// Overlays for humans, identical to stlm_deploy/visualize.py (overlay, heatmap, defect_contours).
#include <algorithm>
#include <vector>

#include <opencv2/imgproc.hpp>

#include "stlm/detector.hpp"

namespace stlm {

cv::Mat overlay(const cv::Mat& image, const cv::Mat& anomaly_map, std::optional<double> threshold, bool bgr,
                double alpha) {
  if (image.empty() || image.type() != CV_8UC3)
    throw Error("overlay: expected a CV_8UC3 image, got " + std::string(image.empty() ? "an empty image" : "another type"));
  if (anomaly_map.empty() || anomaly_map.type() != CV_32FC1)
    throw Error("overlay: expected a CV_32FC1 anomaly map");
  cv::Mat m = anomaly_map;
  if (m.size() != image.size()) cv::resize(anomaly_map, m, image.size(), 0, 0, cv::INTER_LINEAR);
  // heat map: round(clip(map / vmax, 0, 1) * 255) -> JET (OpenCV gives BGR); vmax = min(1, 2 x pixel
  // threshold) so the threshold sits mid-palette (visualize.colour_range in the Python runtime)
  const double vmax = (threshold && *threshold > 0) ? std::min(1.0, 2.0 * *threshold) : 1.0;
  cv::Mat clipped;
  cv::min(cv::max(m * (1.0 / vmax), 0.0), 1.0, clipped);
  cv::patchNaNs(clipped, 0.0);
  cv::Mat u8, heat;
  clipped.convertTo(u8, CV_8U, 255.0);
  cv::applyColorMap(u8, heat, cv::COLORMAP_JET);
  if (!bgr) cv::cvtColor(heat, heat, cv::COLOR_BGR2RGB);
  const double a = std::clamp(alpha, 0.0, 1.0);
  cv::Mat out;
  cv::addWeighted(image, 1.0 - a, heat, a, 0.0, out);
  if (threshold) {
    cv::Mat mask = m > static_cast<float>(*threshold);
    mask /= 255;
    std::vector<std::vector<cv::Point>> contours;
    cv::findContours(mask, contours, cv::RETR_LIST, cv::CHAIN_APPROX_NONE);
    if (!contours.empty()) cv::drawContours(out, contours, -1, cv::Scalar(255, 255, 255), 2);
  }
  return out;
}

}  // namespace stlm

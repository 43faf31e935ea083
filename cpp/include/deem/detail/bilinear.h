// Bilinear sampling coefficients shared by the CPU and CUDA kernels.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define DEEM_HD __host__ __device__ __forceinline__
#else
#define DEEM_HD inline
#endif

namespace deem::detail {

// The four corners of a sample at normalised (x, y) on an H x W map, pixel-centre convention.
// Corners outside the map get weight 0 and a clamped (always valid) pixel index, so callers may
// load them unconditionally. `inside` is false when every corner is outside or has weight 0.
template <typename T>
struct Bilinear {
  bool inside;
  int pixel[4];  // (y0,x0) (y0,x1) (y1,x0) (y1,x1), row-major within the level
  T weight[4];   // interpolation weights (0 for corners outside the map)
  T dx[4];       // d(weight_k)/d(x_im), 0 outside
  T dy[4];       // d(weight_k)/d(y_im), 0 outside
};

template <typename T>
DEEM_HD Bilinear<T> bilinear(T loc_x, T loc_y, int height, int width) {
  Bilinear<T> b;
  const T x = loc_x * static_cast<T>(width) - static_cast<T>(0.5);
  const T y = loc_y * static_cast<T>(height) - static_cast<T>(0.5);
  b.inside = y > T(-1) && x > T(-1) && y < static_cast<T>(height) && x < static_cast<T>(width);
  if (!b.inside) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      b.pixel[k] = 0;
      b.weight[k] = b.dx[k] = b.dy[k] = T(0);
    }
    return b;
  }
  const T fy = floor(y), fx = floor(x);
  const int y0 = static_cast<int>(fy), x0 = static_cast<int>(fx);
  const T ly = y - fy, lx = x - fx, hy = T(1) - ly, hx = T(1) - lx;
  const bool ok_y0 = y0 >= 0, ok_y1 = y0 + 1 < height, ok_x0 = x0 >= 0, ok_x1 = x0 + 1 < width;
  const int cy0 = ok_y0 ? y0 : 0, cy1 = ok_y1 ? y0 + 1 : height - 1;
  const int cx0 = ok_x0 ? x0 : 0, cx1 = ok_x1 ? x0 + 1 : width - 1;
  b.pixel[0] = cy0 * width + cx0;
  b.pixel[1] = cy0 * width + cx1;
  b.pixel[2] = cy1 * width + cx0;
  b.pixel[3] = cy1 * width + cx1;
  const bool ok[4] = {ok_y0 && ok_x0, ok_y0 && ok_x1, ok_y1 && ok_x0, ok_y1 && ok_x1};
  const T w[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
  const T gx[4] = {-hy, hy, -ly, ly};
  const T gy[4] = {-hx, -lx, hx, lx};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    b.weight[k] = ok[k] ? w[k] : T(0);
    b.dx[k] = ok[k] ? gx[k] : T(0);
    b.dy[k] = ok[k] ? gy[k] : T(0);
  }
  return b;
}

}  // namespace deem::detail

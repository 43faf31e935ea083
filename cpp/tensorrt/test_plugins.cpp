// Unit test of deem's TensorRT plugins without TensorRT's libraries or a GPU: the creators and fields (names,
// parsing, errors, the serialisation round trip), the type and format rules, and the enqueue path itself, run with
// Backend::kCpu (the same problem building and argument mapping, then the CPU kernels of the same entry-point
// family) against a float64 reference of the node semantics, for fp32, fp16 and bf16 values.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "deem/detail/half_cpu.h"
#include "deem_plugins.h"

using deem::trt::Backend;
using deem::trt::DeemPlugin;
using deem::trt::Kind;
using nvinfer1::DataType;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldCollection;
using nvinfer1::PluginFieldType;
using nvinfer1::PluginTensorDesc;

namespace {

int g_failures = 0;
int g_checks = 0;

void check(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) {
    ++g_failures;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

template <typename F>
bool throws(F&& f) {
  try {
    f();
  } catch (const std::exception&) {
    return true;
  }
  return false;
}

PluginTensorDesc desc(std::vector<int64_t> dims, DataType type) {
  PluginTensorDesc d{};
  d.dims.nbDims = static_cast<int32_t>(dims.size());
  for (size_t i = 0; i < dims.size(); ++i) d.dims.d[i] = dims[i];
  d.type = type;
  d.format = nvinfer1::TensorFormat::kLINEAR;
  d.scale = 1.0f;
  return d;
}

int64_t numel(const std::vector<int64_t>& dims) {
  int64_t n = 1;
  for (int64_t d : dims) n *= d;
  return n;
}

// A host buffer of one TensorRT dtype, filled from doubles and read back as doubles.
struct Buffer {
  DataType type;
  std::vector<uint8_t> bytes;
  Buffer(DataType t, const std::vector<double>& v) : type(t) {
    bytes.resize(v.size() * size());
    for (size_t i = 0; i < v.size(); ++i) set(i, v[i]);
  }
  Buffer(DataType t, size_t n) : type(t), bytes(n * ((t == DataType::kFLOAT) ? 4 : (t == DataType::kBOOL ? 1 : 2))) {}
  size_t size() const { return type == DataType::kFLOAT ? 4 : (type == DataType::kBOOL ? 1 : 2); }
  void set(size_t i, double v) {
    if (type == DataType::kFLOAT) {
      const float f = static_cast<float>(v);
      std::memcpy(&bytes[4 * i], &f, 4);
    } else if (type == DataType::kHALF) {
      const uint16_t b = deem::detail::half_from_float(static_cast<float>(v)).bits;
      std::memcpy(&bytes[2 * i], &b, 2);
    } else if (type == DataType::kBF16) {
      const uint16_t b = deem::detail::bf16_from_float(static_cast<float>(v)).bits;
      std::memcpy(&bytes[2 * i], &b, 2);
    } else {
      bytes[i] = v != 0.0 ? 1 : 0;
    }
  }
  double get(size_t i) const {
    if (type == DataType::kFLOAT) {
      float f;
      std::memcpy(&f, &bytes[4 * i], 4);
      return f;
    }
    uint16_t b;
    std::memcpy(&b, &bytes[2 * i], 2);
    if (type == DataType::kHALF) return deem::detail::to_float(deem::detail::Half{b});
    return deem::detail::to_float(deem::detail::BFloat16{b});
  }
  // the value as stored (rounded to the dtype), for the reference
  std::vector<double> values() const {
    std::vector<double> v(bytes.size() / size());
    for (size_t i = 0; i < v.size(); ++i) v[i] = type == DataType::kBOOL ? bytes[i] : get(i);
    return v;
  }
};

std::vector<double> uniform(std::mt19937& rng, size_t n, double lo, double hi) {
  std::uniform_real_distribution<double> u(lo, hi);
  std::vector<double> v(n);
  for (auto& x : v) x = u(rng);
  return v;
}

double rel_l2(const std::vector<double>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return std::sqrt(num / (den > 0 ? den : 1));
}

// bilinear sample with zero padding of level (h, w) whose rows start at `start` (value [.., S, M, D] row-major)
double sample(const std::vector<double>& value, int64_t base, int64_t M, int64_t D, int64_t m, int64_t c, int h, int w,
              int64_t start, double lx, double ly) {
  const double x = lx * w - 0.5, y = ly * h - 0.5;
  const double x0 = std::floor(x), y0 = std::floor(y);
  double out = 0;
  for (int dy = 0; dy < 2; ++dy) {
    for (int dx = 0; dx < 2; ++dx) {
      const int64_t xi = static_cast<int64_t>(x0) + dx, yi = static_cast<int64_t>(y0) + dy;
      if (xi < 0 || yi < 0 || xi >= w || yi >= h) continue;
      const double wt = (dx ? x - x0 : 1 - (x - x0)) * (dy ? y - y0 : 1 - (y - y0));
      out += wt * value[((base + start + yi * w + xi) * M + m) * D + c];
    }
  }
  return out;
}

const std::vector<int32_t> kShapes = {6, 5, 3, 3, 2, 1};  // three levels, non-square
constexpr int64_t kRows = 6 * 5 + 3 * 3 + 2 * 1;

std::unique_ptr<DeemPlugin> make(Kind kind, Backend backend = Backend::kCpu) {
  PluginField f("spatial_shapes", kShapes.data(), PluginFieldType::kINT32, static_cast<int32_t>(kShapes.size()));
  PluginFieldCollection fc{1, &f};
  return std::unique_ptr<DeemPlugin>(deem::trt::create_plugin(kind, &fc, backend));
}

double tolerance(DataType t) { return t == DataType::kFLOAT ? 1e-6 : (t == DataType::kHALF ? 1e-3 : 8e-3); }
const char* type_name(DataType t) { return t == DataType::kFLOAT ? "fp32" : (t == DataType::kHALF ? "fp16" : "bf16"); }

void test_msda(DataType vt, DataType wt) {
  const int64_t N = 2, Lq = 5, M = 2, D = 8, L = 3, P = 4;
  std::mt19937 rng(1);
  Buffer value(vt, uniform(rng, N * kRows * M * D, -1, 1));
  Buffer loc(DataType::kFLOAT, uniform(rng, N * Lq * M * L * P * 2, -0.1, 1.1));
  Buffer w(wt, uniform(rng, N * Lq * M * L * P, 0, 0.5));
  const PluginTensorDesc in[3] = {desc({N, kRows, M, D}, vt), desc({N, Lq, M, L, P, 2}, DataType::kFLOAT),
                                  desc({N, Lq, M, L, P}, wt)};
  const PluginTensorDesc out_desc = desc({N, Lq, M * D}, vt);
  Buffer out(vt, N * Lq * M * D);
  auto plugin = make(Kind::kMsDeformAttn);
  const void* inputs[3] = {value.bytes.data(), loc.bytes.data(), w.bytes.data()};
  void* outputs[1] = {out.bytes.data()};
  check(plugin->onShapeChange(in, 3, &out_desc, 1) == 0, "MsDeformAttn onShapeChange: " + plugin->last_error());
  check(plugin->enqueue(in, &out_desc, inputs, outputs, nullptr, nullptr) == 0,
        "MsDeformAttn enqueue: " + plugin->last_error());

  const auto v = value.values(), l = loc.values(), a = w.values();
  std::vector<double> ref(N * Lq * M * D, 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t q = 0; q < Lq; ++q)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t lv = 0; lv < L; ++lv)
          for (int64_t p = 0; p < P; ++p) {
            const int64_t k = (((n * Lq + q) * M + m) * L + lv) * P + p;
            int64_t start = 0;
            for (int64_t j = 0; j < lv; ++j) start += kShapes[2 * j] * kShapes[2 * j + 1];
            for (int64_t c = 0; c < D; ++c) {
              ref[((n * Lq + q) * M + m) * D + c] +=
                  a[k] * sample(v, n * kRows, M, D, m, c, kShapes[2 * lv], kShapes[2 * lv + 1], start, l[2 * k],
                                l[2 * k + 1]);
            }
          }
  const double err = rel_l2(out.values(), ref);
  check(err <= tolerance(vt), std::string("MsDeformAttn ") + type_name(vt) + " values, " + type_name(wt) +
                                  " weights: rel. L2 " + std::to_string(err));
  std::printf("MsDeformAttn %s/%s: rel. L2 %.3g\n", type_name(vt), type_name(wt), err);
}

void test_mmfs(DataType vt, bool ignore) {
  const int64_t N = 2, Lq = 4, I = 3, M = 2, D = 8, L = 3, P = 2;
  std::mt19937 rng(2);
  Buffer value(vt, uniform(rng, N * I * kRows * M * D, -1, 1));
  Buffer loc(DataType::kFLOAT, uniform(rng, N * Lq * I * M * P * 2, -0.1, 1.1));
  Buffer logits(DataType::kFLOAT, uniform(rng, N * Lq * I * M * L * P, -2, 2));
  std::vector<double> vis(N * Lq * I);
  for (size_t i = 0; i < vis.size(); ++i) vis[i] = (i % 4 == 1) ? 0.0 : 1.0;  // some images hidden
  for (int64_t i = 0; i < I; ++i) vis[(1 * Lq + 2) * I + i] = 0.0;         // a query that sees no image
  Buffer visible(DataType::kBOOL, vis);
  Buffer ign(vt, uniform(rng, M * D, -1, 1));
  std::vector<PluginTensorDesc> in = {desc({N, I * kRows, M, D}, vt), desc({N, Lq, I, M, P, 2}, DataType::kFLOAT),
                                      desc({N, Lq, I, M, L, P}, DataType::kFLOAT), desc({N, Lq, I}, DataType::kBOOL)};
  std::vector<const void*> inputs = {value.bytes.data(), loc.bytes.data(), logits.bytes.data(), visible.bytes.data()};
  if (ignore) {
    in.push_back(desc({M, D}, vt));
    inputs.push_back(ign.bytes.data());
  }
  const PluginTensorDesc out_desc[2] = {desc({N, Lq, M * D}, vt), desc({N, Lq, M}, DataType::kFLOAT)};
  Buffer out(vt, N * Lq * M * D), lse(DataType::kFLOAT, N * Lq * M);
  void* outputs[2] = {out.bytes.data(), lse.bytes.data()};
  auto plugin = make(Kind::kMmfsCore);
  const auto nb = static_cast<int32_t>(in.size());
  check(plugin->onShapeChange(in.data(), nb, out_desc, 2) == 0, "MmfsCore onShapeChange: " + plugin->last_error());
  std::unique_ptr<nvinfer1::IPluginV3> runtime(plugin->attachToContext(nullptr));  // the runtime copy
  auto* rt = static_cast<DeemPlugin*>(runtime.get());
  check(rt->enqueue(in.data(), out_desc, inputs.data(), outputs, nullptr, nullptr) == 0,
        "MmfsCore enqueue: " + rt->last_error());

  const auto v = value.values(), l = loc.values(), z = logits.values(), ig = ign.values();
  std::vector<double> ref(N * Lq * M * D, 0.0), ref_lse(N * Lq * M, 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t q = 0; q < Lq; ++q)
      for (int64_t m = 0; m < M; ++m) {
        double denom = 1.0;
        for (int64_t i = 0; i < I; ++i) {
          if (vis[(n * Lq + q) * I + i] == 0.0) continue;
          for (int64_t k = 0; k < L * P; ++k) denom += std::exp(z[(((n * Lq + q) * I + i) * M + m) * L * P + k]);
        }
        ref_lse[(n * Lq + q) * M + m] = std::log(denom);
        for (int64_t c = 0; c < D; ++c) {
          double acc = ignore ? ig[m * D + c] / denom : 0.0;
          for (int64_t i = 0; i < I; ++i) {
            if (vis[(n * Lq + q) * I + i] == 0.0) continue;
            int64_t start = 0;
            for (int64_t lv = 0; lv < L; ++lv) {
              for (int64_t p = 0; p < P; ++p) {
                const double a = std::exp(z[((((n * Lq + q) * I + i) * M + m) * L + lv) * P + p]) / denom;
                const int64_t li = ((((n * Lq + q) * I + i) * M + m) * P + p) * 2;
                acc += a * sample(v, (n * I + i) * kRows, M, D, m, c, kShapes[2 * lv], kShapes[2 * lv + 1], start,
                                  l[li], l[li + 1]);
              }
              start += kShapes[2 * lv] * kShapes[2 * lv + 1];
            }
          }
          ref[((n * Lq + q) * M + m) * D + c] = acc;
        }
      }
  const double err = rel_l2(out.values(), ref), err_lse = rel_l2(lse.values(), ref_lse);
  const std::string what = std::string("MmfsCore ") + type_name(vt) + (ignore ? " with" : " without") + " ignore token";
  check(err <= tolerance(vt), what + ": rel. L2 " + std::to_string(err));
  check(err_lse <= 1e-6, what + ": lse rel. L2 " + std::to_string(err_lse));
  std::printf("%s: rel. L2 %.3g (lse %.3g)\n", what.c_str(), err, err_lse);

  // a shape that does not fit the level table is an error from enqueue, not a crash
  std::vector<PluginTensorDesc> bad = in;
  bad[0] = desc({N, I * kRows + 1, M, D}, vt);
  check(rt->enqueue(bad.data(), out_desc, inputs.data(), outputs, nullptr, nullptr) != 0 &&
            rt->last_error().find("value rows") != std::string::npos,
        "MmfsCore enqueue rejects value rows that do not match spatial_shapes");
}

void test_fields_and_creators() {
  int32_t count = 0;
  nvinfer1::IPluginCreatorInterface* const* creators = getCreators(count);
  check(count == 2, "getCreators returns two creators");
  const char* names[2] = {"MsDeformAttn", "MmfsCore"};
  for (int32_t i = 0; i < count && i < 2; ++i) {
    auto* c = static_cast<nvinfer1::IPluginCreatorV3One*>(creators[i]);
    check(std::string(c->getInterfaceInfo().kind) == "PLUGIN CREATOR_V3ONE", "creator interface kind");
    check(std::string(c->getPluginName()) == names[i], std::string("creator name ") + names[i]);
    check(std::string(c->getPluginNamespace()) == "deem" && std::string(c->getPluginVersion()) == "1",
          "creator namespace deem, version 1");
    check(c->getFieldNames()->nbFields == 1 && std::string(c->getFieldNames()->fields[0].name) == "spatial_shapes",
          "creator field names");
    PluginField f("spatial_shapes", kShapes.data(), PluginFieldType::kINT32, static_cast<int32_t>(kShapes.size()));
    PluginFieldCollection fc{1, &f};
    std::unique_ptr<nvinfer1::IPluginV3> p(c->createPlugin("node", &fc, nvinfer1::TensorRTPhase::kBUILD));
    check(p != nullptr, "creator builds a plugin");
    if (p) {
      auto* core = static_cast<nvinfer1::IPluginV3OneCore*>(
          p->getCapabilityInterface(nvinfer1::PluginCapabilityType::kCORE));
      check(std::string(core->getPluginName()) == names[i], "plugin name matches the ONNX node");
      check(p->getCapabilityInterface(nvinfer1::PluginCapabilityType::kBUILD) != nullptr &&
                p->getCapabilityInterface(nvinfer1::PluginCapabilityType::kRUNTIME) != nullptr,
            "plugin has the build and runtime capabilities");
    }
    PluginFieldCollection empty{0, nullptr};
    std::unique_ptr<nvinfer1::IPluginV3> none(c->createPlugin("node", &empty, nvinfer1::TensorRTPhase::kBUILD));
    check(none == nullptr, "creator refuses a plugin without spatial_shapes");
  }

  // serialisation: the fields a plugin serialises build an identical plugin (int64 input fields accepted)
  const std::vector<int64_t> wide = {6, 5, 3, 3, 2, 1};
  PluginField f64("spatial_shapes", wide.data(), PluginFieldType::kINT64, 6);
  PluginFieldCollection fc64{1, &f64};
  std::unique_ptr<DeemPlugin> a(deem::trt::create_plugin(Kind::kMmfsCore, &fc64));
  const PluginFieldCollection* saved = a->getFieldsToSerialize();
  check(saved->nbFields == 1 && saved->fields[0].type == PluginFieldType::kINT32 && saved->fields[0].length == 6,
        "serialised field: spatial_shapes as int32[6]");
  std::unique_ptr<DeemPlugin> b(deem::trt::create_plugin(Kind::kMmfsCore, saved));
  check(b->levels().hw() == kShapes && b->levels().rows() == kRows && b->levels().table().start[2] == 39,
        "deserialised level table");

  const std::vector<int32_t> odd = {4, 4, 2}, zero = {4, 0};
  PluginField fo("spatial_shapes", odd.data(), PluginFieldType::kINT32, 3);
  PluginFieldCollection co{1, &fo};
  check(throws([&] { delete deem::trt::create_plugin(Kind::kMsDeformAttn, &co); }), "odd spatial_shapes rejected");
  PluginField fz("spatial_shapes", zero.data(), PluginFieldType::kINT32, 2);
  PluginFieldCollection cz{1, &fz};
  check(throws([&] { delete deem::trt::create_plugin(Kind::kMsDeformAttn, &cz); }), "zero-sized level rejected");
  PluginField fu("mode", zero.data(), PluginFieldType::kINT32, 2);
  PluginFieldCollection cu{1, &fu};
  check(throws([&] { delete deem::trt::create_plugin(Kind::kMsDeformAttn, &cu); }), "unknown field rejected");
}

void test_types_and_formats() {
  auto msda = make(Kind::kMsDeformAttn);
  auto mmfs = make(Kind::kMmfsCore);
  DataType out[2];
  const DataType half_in[5] = {DataType::kHALF, DataType::kFLOAT, DataType::kFLOAT, DataType::kBOOL, DataType::kHALF};
  check(mmfs->getOutputDataTypes(out, 2, half_in, 5) == 0 && out[0] == DataType::kHALF && out[1] == DataType::kFLOAT,
        "MmfsCore outputs: value dtype and float32 lse");
  check(msda->getNbOutputs() == 1 && mmfs->getNbOutputs() == 2, "output counts");
  auto dyn = [](DataType t) {
    nvinfer1::DynamicPluginTensorDesc d{};
    d.desc.type = t;
    d.desc.format = nvinfer1::TensorFormat::kLINEAR;
    return d;
  };
  for (DataType vt : {DataType::kFLOAT, DataType::kHALF, DataType::kBF16}) {
    nvinfer1::DynamicPluginTensorDesc io[7] = {dyn(vt), dyn(DataType::kFLOAT), dyn(DataType::kFLOAT),
                                               dyn(DataType::kBOOL), dyn(vt), dyn(vt), dyn(DataType::kFLOAT)};
    bool all = true;
    for (int pos = 0; pos < 7; ++pos) all = all && mmfs->supportsFormatCombination(pos, io, 5, 2);
    check(all, std::string("MmfsCore supports ") + type_name(vt));
    io[1] = dyn(vt);
    check(vt == DataType::kFLOAT || !mmfs->supportsFormatCombination(1, io, 5, 2),
          "MmfsCore needs float32 locations");
  }
  nvinfer1::DynamicPluginTensorDesc bad[4] = {dyn(DataType::kINT8), dyn(DataType::kFLOAT), dyn(DataType::kFLOAT),
                                              dyn(DataType::kINT8)};
  check(!msda->supportsFormatCombination(0, bad, 3, 1), "MsDeformAttn refuses int8 values");
  bad[0].desc.type = DataType::kHALF;
  bad[0].desc.format = nvinfer1::TensorFormat::kHWC8;
  check(!msda->supportsFormatCombination(0, bad, 3, 1), "MsDeformAttn needs linear formats");
}

void test_cuda_backend_without_gpu() {
#ifndef DEEM_WITH_CUDA
  auto plugin = make(Kind::kMsDeformAttn, Backend::kCuda);
  const int64_t N = 1, Lq = 1, M = 1, D = 8, L = 3, P = 1;
  std::vector<float> value(N * kRows * M * D), loc(N * Lq * M * L * P * 2), w(N * Lq * M * L * P), out(N * Lq * M * D);
  const PluginTensorDesc in[3] = {desc({N, kRows, M, D}, DataType::kFLOAT),
                                  desc({N, Lq, M, L, P, 2}, DataType::kFLOAT), desc({N, Lq, M, L, P}, DataType::kFLOAT)};
  const PluginTensorDesc od = desc({N, Lq, M * D}, DataType::kFLOAT);
  const void* inputs[3] = {value.data(), loc.data(), w.data()};
  void* outputs[1] = {out.data()};
  check(plugin->enqueue(in, &od, inputs, outputs, nullptr, nullptr) != 0 &&
            plugin->last_error().find("without CUDA") != std::string::npos,
        "a build without CUDA kernels reports it from enqueue");
#endif
}

}  // namespace

int main() {
  std::printf("TensorRT headers %d.%d.%d\n", NV_TENSORRT_MAJOR, NV_TENSORRT_MINOR, NV_TENSORRT_PATCH);
  test_fields_and_creators();
  test_types_and_formats();
  for (DataType vt : {DataType::kFLOAT, DataType::kHALF, DataType::kBF16}) {
    test_msda(vt, vt);
    test_msda(vt, DataType::kFLOAT);
    test_mmfs(vt, true);
    test_mmfs(vt, false);
  }
  test_cuda_backend_without_gpu();
  std::fflush(stderr);
  std::printf("\n%d passed, %d failed\n", g_checks - g_failures, g_failures);
  return g_failures == 0 ? 0 : 1;
}

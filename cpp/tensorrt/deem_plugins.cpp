// deem's TensorRT plugins: the IPluginV3 capabilities, shape / type rules, enqueue over the kernels of
// deem/msda.h and deem/mmfs.h, the creators and the plugin-library entry points (see deem_plugins.h).
#include "deem_plugins.h"

#include <cstdio>
#include <exception>
#include <utility>

#include "deem/mmfs.h"
#include "deem/msda.h"

namespace deem::trt {

using nvinfer1::DataType;
using nvinfer1::DimsExprs;
using nvinfer1::DynamicPluginTensorDesc;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldCollection;
using nvinfer1::PluginFieldType;
using nvinfer1::PluginTensorDesc;
using nvinfer1::TensorFormat;

namespace {

nvinfer1::ILoggerFinder* g_logger_finder = nullptr;

constexpr char kShapesField[] = "spatial_shapes";

[[noreturn]] void fail_arg(const std::string& message) { throw ArgumentError(message); }

bool is_value_type(DataType t) { return t == DataType::kFLOAT || t == DataType::kHALF || t == DataType::kBF16; }

DType to_dtype(DataType t) {
  switch (t) {
    case DataType::kFLOAT: return DType::kFloat32;
    case DataType::kHALF: return DType::kFloat16;
    case DataType::kBF16: return DType::kBFloat16;
    default: fail_arg("unsupported tensor type (expected float32, float16 or bfloat16)");
  }
}

std::string dims_str(const nvinfer1::Dims& d) {
  std::string s = "[";
  for (int i = 0; i < d.nbDims; ++i) s += (i ? ", " : "") + std::to_string(d.d[i]);
  return s + "]";
}

void require_dims(const PluginTensorDesc& t, int rank, const char* name, const char* layout) {
  if (t.dims.nbDims != rank) {
    fail_arg(std::string(name) + ": expected " + layout + ", got " + dims_str(t.dims));
  }
}

void require_equal(int64_t got, int64_t want, const std::string& what) {
  if (got != want) fail_arg(what + ": expected " + std::to_string(want) + ", got " + std::to_string(got));
}

int64_t index_dim(int64_t v, const std::string& what) {
  if (v < 0 || v > kMaxIndex) fail_arg(what + " = " + std::to_string(v) + " is outside the kernels' int32 range");
  return v;
}

void require_points(int64_t p) {
  if (p < 1 || p > 16) fail_arg("expected 1 to 16 sampling points, got " + std::to_string(p));
}

MsdaProblem msda_problem(const Levels& levels, const PluginTensorDesc* in) {
  require_dims(in[0], 4, "value", "[N, S, M, D]");
  require_dims(in[1], 6, "sampling_locations", "[N, Lq, M, L, P, 2]");
  require_dims(in[2], 5, "attention_weights", "[N, Lq, M, L, P]");
  MsdaProblem pr;
  pr.batch = index_dim(in[0].dims.d[0], "N");
  pr.value_len = in[0].dims.d[1];
  pr.heads = index_dim(in[0].dims.d[2], "M");
  pr.channels = index_dim(in[0].dims.d[3], "D");
  pr.queries = index_dim(in[1].dims.d[1], "Lq");
  pr.points = in[1].dims.d[4];
  pr.value_dtype = to_dtype(in[0].type);
  pr.weight_dtype = to_dtype(in[2].type);
  pr.levels = levels.table();
  require_equal(pr.value_len, levels.rows(), "value rows S (sum of H*W of spatial_shapes)");
  require_points(pr.points);
  const int64_t L = pr.levels.count;
  const int64_t loc[6] = {pr.batch, pr.queries, pr.heads, L, pr.points, 2};
  for (int i = 0; i < 6; ++i) require_equal(in[1].dims.d[i], loc[i], "sampling_locations dimension " + std::to_string(i));
  for (int i = 0; i < 5; ++i) require_equal(in[2].dims.d[i], loc[i], "attention_weights dimension " + std::to_string(i));
  if (in[1].type != DataType::kFLOAT) fail_arg("sampling_locations: expected float32");
  if (pr.weight_dtype != pr.value_dtype && pr.weight_dtype != DType::kFloat32) {
    fail_arg("attention_weights: expected the value dtype or float32");
  }
  return pr;
}

MmfsProblem mmfs_problem(const Levels& levels, const PluginTensorDesc* in, int32_t nb_inputs) {
  require_dims(in[0], 4, "value", "[N, I*S, M, D]");
  require_dims(in[1], 6, "sampling_locations", "[N, Lq, I, M, P, 2]");
  require_dims(in[2], 6, "attention_logits", "[N, Lq, I, M, L, P]");
  require_dims(in[3], 3, "image_visible", "[N, Lq, I]");
  MmfsProblem pr;
  pr.batch = index_dim(in[0].dims.d[0], "N");
  pr.heads = index_dim(in[0].dims.d[2], "M");
  pr.channels = index_dim(in[0].dims.d[3], "D");
  pr.queries = index_dim(in[1].dims.d[1], "Lq");
  pr.images = index_dim(in[1].dims.d[2], "I");
  pr.points = in[1].dims.d[4];
  pr.image_len = levels.rows();
  pr.value_dtype = to_dtype(in[0].type);
  pr.levels = levels.table();
  pr.has_ignore_token = nb_inputs > 4;
  require_points(pr.points);
  require_equal(in[0].dims.d[1], pr.images * pr.image_len, "value rows (images x sum of H*W of spatial_shapes)");
  const int64_t L = pr.levels.count;
  const int64_t loc[6] = {pr.batch, pr.queries, pr.images, pr.heads, pr.points, 2};
  const int64_t logits[6] = {pr.batch, pr.queries, pr.images, pr.heads, L, pr.points};
  for (int i = 0; i < 6; ++i) {
    require_equal(in[1].dims.d[i], loc[i], "sampling_locations dimension " + std::to_string(i));
    require_equal(in[2].dims.d[i], logits[i], "attention_logits dimension " + std::to_string(i));
  }
  for (int i = 0; i < 3; ++i) require_equal(in[3].dims.d[i], loc[i], "image_visible dimension " + std::to_string(i));
  if (in[1].type != DataType::kFLOAT || in[2].type != DataType::kFLOAT) {
    fail_arg("sampling_locations and attention_logits: expected float32");
  }
  if (in[3].type != DataType::kBOOL) fail_arg("image_visible: expected bool");
  if (pr.has_ignore_token) {
    require_dims(in[4], 2, "ignore_token", "[M, D]");
    require_equal(in[4].dims.d[0], pr.heads, "ignore_token heads");
    require_equal(in[4].dims.d[1], pr.channels, "ignore_token channels");
    if (in[4].type != in[0].type) fail_arg("ignore_token: expected the value dtype");
  }
  return pr;
}

std::vector<int32_t> read_shapes_field(const PluginFieldCollection* fc) {
  if (fc == nullptr) fail_arg("no plugin fields (expected spatial_shapes)");
  std::vector<int32_t> hw;
  bool found = false;
  for (int32_t i = 0; i < fc->nbFields; ++i) {
    const PluginField& f = fc->fields[i];
    const std::string name = f.name ? f.name : "";
    if (name != kShapesField) fail_arg("unknown plugin field '" + name + "' (expected only spatial_shapes)");
    found = true;
    hw.resize(static_cast<size_t>(f.length));
    for (int32_t k = 0; k < f.length; ++k) {
      if (f.type == PluginFieldType::kINT32) {
        hw[k] = static_cast<const int32_t*>(f.data)[k];
      } else if (f.type == PluginFieldType::kINT64) {
        const int64_t v = static_cast<const int64_t*>(f.data)[k];
        if (v < 0 || v > kMaxIndex) fail_arg("spatial_shapes: entry " + std::to_string(v) + " does not fit int32");
        hw[k] = static_cast<int32_t>(v);
      } else {
        fail_arg("spatial_shapes: expected an int32 or int64 array");
      }
    }
  }
  if (!found) fail_arg("missing plugin field spatial_shapes");
  return hw;
}

}  // namespace

const char* kind_name(Kind kind) { return kind == Kind::kMmfsCore ? "MmfsCore" : "MsDeformAttn"; }

void log_error(const std::string& message) noexcept {
  try {
    nvinfer1::ILogger* logger = g_logger_finder ? g_logger_finder->findLogger() : nullptr;
    const std::string text = "deem TensorRT plugin: " + message;
    if (logger) {
      logger->log(nvinfer1::ILogger::Severity::kERROR, text.c_str());
    } else {
      std::fprintf(stderr, "%s\n", text.c_str());
    }
  } catch (...) {
  }
}

Levels::Levels(std::vector<int32_t> hw) : hw_(std::move(hw)) {
  if (hw_.empty() || hw_.size() % 2 != 0) {
    fail_arg("spatial_shapes: expected [H0, W0, H1, W1, ...] (an even, non-zero count), got " +
             std::to_string(hw_.size()) + " entries");
  }
  const int64_t levels = static_cast<int64_t>(hw_.size() / 2);
  if (levels > kMaxLevels) fail_arg("spatial_shapes: at most " + std::to_string(kMaxLevels) + " levels");
  table_.count = static_cast<int32_t>(levels);
  for (int64_t l = 0; l < levels; ++l) {
    const int64_t h = hw_[2 * l], w = hw_[2 * l + 1];
    if (h < 1 || w < 1) fail_arg("spatial_shapes: level " + std::to_string(l) + " needs H >= 1 and W >= 1");
    if (h * w > kMaxIndex || rows_ + h * w > kMaxIndex) fail_arg("spatial_shapes: the levels exceed int32 rows");
    table_.height[l] = static_cast<int32_t>(h);
    table_.width[l] = static_cast<int32_t>(w);
    table_.start[l] = static_cast<int32_t>(rows_);
    rows_ += h * w;
  }
}

DeemPlugin::DeemPlugin(Kind kind, Levels levels, Backend backend)
    : kind_(kind), levels_(std::move(levels)), backend_(backend) {
  field_ = PluginField(kShapesField, levels_.hw().data(), PluginFieldType::kINT32,
                       static_cast<int32_t>(levels_.hw().size()));
  fields_.nbFields = 1;
  fields_.fields = &field_;
}

int32_t DeemPlugin::fail(const std::string& message) noexcept {
  try {
    last_error_ = std::string(kind_name(kind_)) + ": " + message;
  } catch (...) {
  }
  log_error(last_error_);
  return -1;
}

nvinfer1::IPluginCapability* DeemPlugin::getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept {
  switch (type) {
    case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
    case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
  }
  return nullptr;
}

nvinfer1::IPluginV3* DeemPlugin::clone() noexcept {
  try {
    auto* copy = new DeemPlugin(kind_, levels_, backend_);
    copy->nb_inputs_ = nb_inputs_;
    return copy;
  } catch (const std::exception& e) {
    fail(e.what());
    return nullptr;
  }
}

int32_t DeemPlugin::configurePlugin(const DynamicPluginTensorDesc* in, int32_t nb_inputs,
                                    const DynamicPluginTensorDesc*, int32_t nb_outputs) noexcept {
  const bool mmfs = kind_ == Kind::kMmfsCore;
  if (mmfs ? (nb_inputs < 4 || nb_inputs > 5) : nb_inputs != 3) {
    return fail("unexpected number of inputs " + std::to_string(nb_inputs));
  }
  if (nb_outputs != getNbOutputs()) return fail("unexpected number of outputs " + std::to_string(nb_outputs));
  nb_inputs_ = nb_inputs;
  (void)in;  // shapes are dynamic: they are checked in onShapeChange / enqueue
  return 0;
}

int32_t DeemPlugin::getOutputDataTypes(DataType* output_types, int32_t nb_outputs, const DataType* input_types,
                                       int32_t nb_inputs) const noexcept {
  if (nb_inputs < 1 || nb_outputs != getNbOutputs()) return -1;
  output_types[0] = input_types[0];
  if (kind_ == Kind::kMmfsCore) output_types[1] = DataType::kFLOAT;
  return 0;
}

int32_t DeemPlugin::getOutputShapes(const DimsExprs* inputs, int32_t nb_inputs, const DimsExprs*, int32_t,
                                    DimsExprs* outputs, int32_t nb_outputs, nvinfer1::IExprBuilder& builder) noexcept {
  if (nb_inputs < 2 || nb_outputs != getNbOutputs()) return -1;
  const DimsExprs& value = inputs[0];
  const DimsExprs& loc = inputs[1];
  if (value.nbDims != 4 || loc.nbDims != 6) return -1;
  outputs[0].nbDims = 3;
  outputs[0].d[0] = value.d[0];
  outputs[0].d[1] = loc.d[1];
  outputs[0].d[2] = builder.operation(nvinfer1::DimensionOperation::kPROD, *value.d[2], *value.d[3]);
  if (kind_ == Kind::kMmfsCore) {
    outputs[1].nbDims = 3;
    outputs[1].d[0] = value.d[0];
    outputs[1].d[1] = loc.d[1];
    outputs[1].d[2] = value.d[2];
  }
  return 0;
}

bool DeemPlugin::supportsFormatCombination(int32_t pos, const DynamicPluginTensorDesc* in_out, int32_t nb_inputs,
                                           int32_t nb_outputs) noexcept {
  if (pos < 0 || pos >= nb_inputs + nb_outputs) return false;
  const PluginTensorDesc& t = in_out[pos].desc;
  if (t.format != TensorFormat::kLINEAR) return false;
  const DataType value = in_out[0].desc.type;
  if (pos == 0) return is_value_type(t.type);
  if (kind_ == Kind::kMsDeformAttn) {
    if (pos == 1) return t.type == DataType::kFLOAT;
    if (pos == 2) return t.type == DataType::kFLOAT || t.type == value;
    return t.type == value;  // output
  }
  if (pos == 1 || pos == 2) return t.type == DataType::kFLOAT;
  if (pos == 3) return t.type == DataType::kBOOL;
  if (pos == 4 && nb_inputs == 5) return t.type == value;  // ignore_token
  if (pos == nb_inputs) return t.type == value;            // output
  return t.type == DataType::kFLOAT;                       // lse
}

int32_t DeemPlugin::onShapeChange(const PluginTensorDesc* in, int32_t nb_inputs, const PluginTensorDesc*,
                                  int32_t) noexcept {
  try {
    nb_inputs_ = nb_inputs;
    if (kind_ == Kind::kMmfsCore) {
      mmfs_problem(levels_, in, nb_inputs);
    } else {
      msda_problem(levels_, in);
    }
    return 0;
  } catch (const std::exception& e) {
    return fail(e.what());
  }
}

int32_t DeemPlugin::enqueue(const PluginTensorDesc* input_desc, const PluginTensorDesc* output_desc,
                            const void* const* inputs, void* const* outputs, void*, cudaStream_t stream) noexcept {
  try {
    (void)output_desc;
    if (kind_ == Kind::kMsDeformAttn) {
      const MsdaProblem pr = msda_problem(levels_, input_desc);
      if (pr.batch * pr.queries == 0) return 0;
      const MsdaForwardArgs args{inputs[0], inputs[1], inputs[2], outputs[0]};
      if (backend_ == Backend::kCpu) {
        msda_forward_cpu(pr, args, 1);
      } else {
        msda_forward_cuda(pr, args, stream);
      }
      return 0;
    }
    // enqueue is not told the input count: onShapeChange (always called before it) recorded it
    const MmfsProblem pr = mmfs_problem(levels_, input_desc, nb_inputs_);
    if (pr.batch * pr.queries == 0) return 0;
    MmfsForwardArgs args;
    args.value = inputs[0];
    args.locations = inputs[1];
    args.logits = inputs[2];
    args.visible = static_cast<const uint8_t*>(inputs[3]);
    args.ignore_token = pr.has_ignore_token ? inputs[4] : nullptr;
    args.output = outputs[0];
    args.lse = outputs[1];
    if (backend_ == Backend::kCpu) {
      mmfs_forward_cpu(pr, args, 1);
    } else {
      mmfs_forward_cuda(pr, args, stream);
    }
    return 0;
  } catch (const std::exception& e) {
    return fail(e.what());
  }
}

nvinfer1::IPluginV3* DeemPlugin::attachToContext(nvinfer1::IPluginResourceContext*) noexcept { return clone(); }

const PluginFieldCollection* DeemPlugin::getFieldsToSerialize() noexcept { return &fields_; }

DeemPlugin* create_plugin(Kind kind, const PluginFieldCollection* fields, Backend backend) {
  return new DeemPlugin(kind, Levels(read_shapes_field(fields)), backend);
}

DeemPluginCreator::DeemPluginCreator(Kind kind) : kind_(kind) {
  name_field_ = PluginField(kShapesField, nullptr, PluginFieldType::kINT32, 0);
  names_.nbFields = 1;
  names_.fields = &name_field_;
}

nvinfer1::IPluginV3* DeemPluginCreator::createPlugin(const char*, const PluginFieldCollection* fc,
                                                     nvinfer1::TensorRTPhase) noexcept {
  try {
    return create_plugin(kind_, fc, Backend::kCuda);
  } catch (const std::exception& e) {
    log_error(std::string(kind_name(kind_)) + ": " + e.what());
    return nullptr;
  }
}

}  // namespace deem::trt

extern "C" {

TENSORRTAPI nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nb_creators) {
  static deem::trt::DeemPluginCreator msda(deem::trt::Kind::kMsDeformAttn);
  static deem::trt::DeemPluginCreator mmfs(deem::trt::Kind::kMmfsCore);
  static nvinfer1::IPluginCreatorInterface* const creators[] = {&msda, &mmfs};
  nb_creators = 2;
  return creators;
}

TENSORRTAPI void setLoggerFinder(nvinfer1::ILoggerFinder* finder) { deem::trt::g_logger_finder = finder; }

}

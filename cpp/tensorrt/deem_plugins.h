// TensorRT IPluginV3 plugins over deem's kernels, one per custom ONNX node of the `deem` domain
// (python/deem/export/schemas.py; docs/export.md):
//
//   MsDeformAttn  value [N,S,M,D], sampling_locations [N,Lq,M,L,P,2] f32, attention_weights [N,Lq,M,L,P]
//                 -> output [N,Lq,M*D]                                     (deem/msda.h)
//   MmfsCore      value [N,I*S,M,D], sampling_locations [N,Lq,I,M,P,2] f32, attention_logits [N,Lq,I,M,L,P] f32,
//                 image_visible [N,Lq,I] bool, ignore_token [M,D] (optional)
//                 -> output [N,Lq,M*D], lse [N,Lq,M] f32                    (deem/mmfs.h)
//
// Values and outputs are fp32, fp16 or bf16 (the kernels accumulate in fp32); the level sizes are the plugin
// field `spatial_shapes` (int32 [H0, W0, H1, W1, ...], the ONNX attribute of the same name), serialised with the
// engine. Plugin namespace "deem", version "1". The library exports getCreators / setLoggerFinder, so TensorRT
// loads it with IPluginRegistry::loadLibrary or `trtexec --dynamicPlugins=libdeem_trt_plugins.so`; it needs no
// symbol of libnvinfer itself.
#pragma once

#include <NvInferRuntime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "deem/common.h"

namespace deem::trt {

constexpr char kNamespace[] = "deem";
constexpr char kVersion[] = "1";

enum class Kind { kMsDeformAttn, kMmfsCore };
// Where enqueue runs the kernels: TensorRT always gets kCuda; kCpu (host pointers, the CPU kernels) serves the
// C++ unit test of the enqueue path on machines without a GPU.
enum class Backend { kCuda, kCpu };

const char* kind_name(Kind kind);

// The level table of the `spatial_shapes` field: checked (1..kMaxLevels levels, H, W >= 1, int32 sizes).
class Levels {
 public:
  Levels() = default;
  explicit Levels(std::vector<int32_t> hw);  // throws ArgumentError naming the problem
  const std::vector<int32_t>& hw() const { return hw_; }
  const LevelTable& table() const { return table_; }
  int64_t rows() const { return rows_; }  // sum of H*W

 private:
  std::vector<int32_t> hw_;
  LevelTable table_{};
  int64_t rows_ = 0;
};

class DeemPlugin final : public nvinfer1::IPluginV3,
                         public nvinfer1::IPluginV3OneCore,
                         public nvinfer1::IPluginV3OneBuild,
                         public nvinfer1::IPluginV3OneRuntime {
 public:
  DeemPlugin(Kind kind, Levels levels, Backend backend = Backend::kCuda);

  // IPluginV3
  nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
  nvinfer1::IPluginV3* clone() noexcept override;

  // IPluginV3OneCore
  const char* getPluginName() const noexcept override { return kind_name(kind_); }
  const char* getPluginVersion() const noexcept override { return kVersion; }
  const char* getPluginNamespace() const noexcept override { return kNamespace; }

  // IPluginV3OneBuild
  int32_t getNbOutputs() const noexcept override { return kind_ == Kind::kMmfsCore ? 2 : 1; }
  int32_t configurePlugin(const nvinfer1::DynamicPluginTensorDesc* in, int32_t nb_inputs,
                          const nvinfer1::DynamicPluginTensorDesc* out, int32_t nb_outputs) noexcept override;
  int32_t getOutputDataTypes(nvinfer1::DataType* output_types, int32_t nb_outputs,
                             const nvinfer1::DataType* input_types, int32_t nb_inputs) const noexcept override;
  int32_t getOutputShapes(const nvinfer1::DimsExprs* inputs, int32_t nb_inputs, const nvinfer1::DimsExprs* shape_inputs,
                          int32_t nb_shape_inputs, nvinfer1::DimsExprs* outputs, int32_t nb_outputs,
                          nvinfer1::IExprBuilder& builder) noexcept override;
  bool supportsFormatCombination(int32_t pos, const nvinfer1::DynamicPluginTensorDesc* in_out, int32_t nb_inputs,
                                 int32_t nb_outputs) noexcept override;

  // IPluginV3OneRuntime
  int32_t onShapeChange(const nvinfer1::PluginTensorDesc* in, int32_t nb_inputs, const nvinfer1::PluginTensorDesc* out,
                        int32_t nb_outputs) noexcept override;
  int32_t enqueue(const nvinfer1::PluginTensorDesc* input_desc, const nvinfer1::PluginTensorDesc* output_desc,
                  const void* const* inputs, void* const* outputs, void* workspace,
                  cudaStream_t stream) noexcept override;
  nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
  const nvinfer1::PluginFieldCollection* getFieldsToSerialize() noexcept override;

  Kind kind() const { return kind_; }
  const Levels& levels() const { return levels_; }
  // The last error of configurePlugin / onShapeChange / enqueue (also sent to TensorRT's logger).
  const std::string& last_error() const { return last_error_; }

 private:
  int32_t fail(const std::string& message) noexcept;

  Kind kind_;
  Levels levels_;
  Backend backend_;
  int32_t nb_inputs_ = 0;  // set by configurePlugin / onShapeChange (MmfsCore: 5 with an ignore token)
  nvinfer1::PluginField field_{};
  nvinfer1::PluginFieldCollection fields_{};
  std::string last_error_;
};

// A plugin from its fields (`spatial_shapes` as kINT32 or kINT64; other fields are rejected). Throws
// ArgumentError naming what is wrong. The creators call it with Backend::kCuda.
DeemPlugin* create_plugin(Kind kind, const nvinfer1::PluginFieldCollection* fields, Backend backend = Backend::kCuda);

class DeemPluginCreator final : public nvinfer1::IPluginCreatorV3One {
 public:
  explicit DeemPluginCreator(Kind kind);
  nvinfer1::IPluginV3* createPlugin(const char* name, const nvinfer1::PluginFieldCollection* fc,
                                    nvinfer1::TensorRTPhase phase) noexcept override;
  const nvinfer1::PluginFieldCollection* getFieldNames() noexcept override { return &names_; }
  const char* getPluginName() const noexcept override { return kind_name(kind_); }
  const char* getPluginVersion() const noexcept override { return kVersion; }
  const char* getPluginNamespace() const noexcept override { return kNamespace; }

 private:
  Kind kind_;
  nvinfer1::PluginField name_field_{};
  nvinfer1::PluginFieldCollection names_{};
};

// Sends `message` to TensorRT's logger when the library was given one (setLoggerFinder), else to stderr.
void log_error(const std::string& message) noexcept;

}  // namespace deem::trt

extern "C" {
// The plugin-library entry points TensorRT looks up (IPluginRegistry::loadLibrary, trtexec --dynamicPlugins).
TENSORRTAPI nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nb_creators);
TENSORRTAPI void setLoggerFinder(nvinfer1::ILoggerFinder* finder);
}

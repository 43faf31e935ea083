// deem._C: thin pybind11 bindings over the kernel library. Tensors arrive as DLPack capsules;
// every argument is validated here so that bad input raises a ValueError naming the tensor.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "deem/mmfs.h"
#include "deem/msda.h"
#include "tensor_arg.h"

namespace py = pybind11;
using deem::ArgumentError;
using deem::DType;
using deem::GradValueStrategy;
using deem::python::Device;
using deem::python::parse_tensor;
using deem::python::TensorArg;

namespace {

[[noreturn]] void fail(const std::string& msg) { throw ArgumentError(msg); }

// float64 values compute (and take locations) in float64, everything else in float32.
DType opmath_dtype(DType value) { return value == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32; }

// Reads spatial_shapes [L,2] and level_start_index [L] (host integer tensors) into a LevelTable and
// returns the total number of value rows they describe.
int64_t read_levels(const TensorArg& shapes, const TensorArg& starts, deem::LevelTable& table) {
  shapes.require_ndim(2, "[L, 2] of (H, W) per level");
  if (shapes.dim(1) != 2) fail(shapes.name + ": expected shape [L, 2] of (H, W) per level, got " + shapes.shape_str());
  const int64_t levels = shapes.dim(0);
  if (levels < 1 || levels > deem::kMaxLevels) {
    fail(shapes.name + ": expected between 1 and " + std::to_string(deem::kMaxLevels) + " levels, got " +
         std::to_string(levels));
  }
  starts.require_shape({levels}, "[L] (the first value row of every level)");
  for (const TensorArg* t : {&shapes, &starts}) {
    t->require_host();
    t->require_contiguous();
    if (!t->is_integer()) fail(t->name + ": expected an int64 or int32 tensor, got " + t->dtype_str());
  }
  table.count = static_cast<int32_t>(levels);
  int64_t total = 0;
  for (int64_t l = 0; l < levels; ++l) {
    const int64_t h = shapes.integer_at(2 * l), w = shapes.integer_at(2 * l + 1), s = starts.integer_at(l);
    if (h < 1 || w < 1) {
      fail(shapes.name + ": level " + std::to_string(l) + " has size (" + std::to_string(h) + ", " +
           std::to_string(w) + "); every level needs H >= 1 and W >= 1");
    }
    if (s != total) {
      fail(starts.name + ": level " + std::to_string(l) + " starts at row " + std::to_string(s) +
           " but the levels before it hold " + std::to_string(total) + " rows (expected the prefix sums of H*W)");
    }
    table.height[l] = static_cast<int32_t>(h);
    table.width[l] = static_cast<int32_t>(w);
    table.start[l] = static_cast<int32_t>(s);
    total += h * w;
    if (total > INT32_MAX) fail(shapes.name + ": the levels hold more than 2^31 rows");
  }
  return total;
}

void require_points(int64_t points, const TensorArg& t) {
  if (points < 1 || points > 16) fail(t.name + ": expected 1 to 16 sampling points, got " + std::to_string(points));
}

void require_float_like(const TensorArg& t, DType dtype, const TensorArg& ref) {
  t.require_dtype(dtype);
  t.require_same_device(ref);
  t.require_contiguous();
}

// ---------------------------------------------------------------------------------------------
// generic multi-scale deformable attention

struct MsdaCall {
  deem::MsdaProblem problem;
  TensorArg value;
  Device device;
  int device_id;
};

// value [N,S,M,D], locations [N,Lq,M,L,P,2], weights [N,Lq,M,L,P]
MsdaCall check_msda(py::handle value_h, py::handle shapes_h, py::handle starts_h, py::handle loc_h, py::handle w_h,
                    TensorArg& loc, TensorArg& weights) {
  MsdaCall call;
  TensorArg& value = call.value;
  value = parse_tensor(value_h, "value");
  const TensorArg shapes = parse_tensor(shapes_h, "spatial_shapes");
  const TensorArg starts = parse_tensor(starts_h, "level_start_index");
  loc = parse_tensor(loc_h, "sampling_locations");
  weights = parse_tensor(w_h, "attention_weights");

  value.require_ndim(4, "[N, S, M, D] (batch, value rows, heads, channels)");
  const DType vdt = value.float_dtype();
  value.require_contiguous();
  auto& pr = call.problem;
  pr.batch = value.dim(0);
  pr.value_len = value.dim(1);
  pr.heads = value.dim(2);
  pr.channels = value.dim(3);
  pr.value_dtype = vdt;
  if (pr.heads < 1 || pr.channels < 1) fail("value: expected M >= 1 heads and D >= 1 channels, got shape " + value.shape_str());

  const int64_t total = read_levels(shapes, starts, pr.levels);
  if (total != pr.value_len) {
    fail("spatial_shapes: the levels hold " + std::to_string(total) + " rows (sum of H*W) but value has S = " +
         std::to_string(pr.value_len) + " (value shape " + value.shape_str() + ")");
  }
  const int64_t L = pr.levels.count;
  loc.require_ndim(6, "[N, Lq, M, L, P, 2]");
  pr.queries = loc.dim(1);
  pr.points = loc.dim(4);
  require_points(pr.points, loc);
  loc.require_shape({pr.batch, pr.queries, pr.heads, L, pr.points, 2}, "[N, Lq, M, L, P, 2]");
  require_float_like(loc, opmath_dtype(vdt), value);
  weights.require_shape({pr.batch, pr.queries, pr.heads, L, pr.points}, "[N, Lq, M, L, P]");
  pr.weight_dtype = weights.float_dtype();
  if (pr.weight_dtype != vdt && pr.weight_dtype != opmath_dtype(vdt)) {
    fail("attention_weights: expected dtype " + std::string(deem::dtype_name(vdt)) + " or " +
         deem::dtype_name(opmath_dtype(vdt)) + ", got " + weights.dtype_str());
  }
  weights.require_same_device(value);
  weights.require_contiguous();
  call.device = value.device;
  call.device_id = value.device_id;
  return call;
}

void require_output(const TensorArg& out, std::vector<int64_t> shape, DType dtype, const TensorArg& ref,
                    const char* layout) {
  out.require_shape(shape, layout);
  require_float_like(out, dtype, ref);
}

void msda_forward(py::handle value_h, py::handle shapes_h, py::handle starts_h, py::handle loc_h, py::handle w_h,
                  py::handle out_h, uintptr_t stream, int num_threads) {
  TensorArg loc, weights;
  MsdaCall call = check_msda(value_h, shapes_h, starts_h, loc_h, w_h, loc, weights);
  const auto& pr = call.problem;
  const TensorArg out = parse_tensor(out_h, "output");
  require_output(out, {pr.batch, pr.queries, pr.heads, pr.channels}, pr.value_dtype, call.value, "[N, Lq, M, D]");
  const deem::MsdaForwardArgs args{call.value.data, loc.data, weights.data, out.data};
  if (pr.batch * pr.queries == 0) return;
  py::gil_scoped_release release;
  if (call.device == Device::kCPU) {
    deem::msda_forward_cpu(pr, args, num_threads);
  } else {
    deem::CudaDeviceGuard guard(call.device_id);
    deem::msda_forward_cuda(pr, args, reinterpret_cast<void*>(stream));
  }
}

int msda_grad_value_strategy(py::handle value_h, py::handle shapes_h, py::handle starts_h, py::handle loc_h,
                             py::handle w_h, int requested) {
  TensorArg loc, weights;
  MsdaCall call = check_msda(value_h, shapes_h, starts_h, loc_h, w_h, loc, weights);
  if (call.device == Device::kCPU) return static_cast<int>(GradValueStrategy::kOwner);
  deem::CudaDeviceGuard guard(call.device_id);
  return static_cast<int>(deem::msda_grad_value_strategy(call.problem, static_cast<GradValueStrategy>(requested)));
}

void msda_backward(py::handle value_h, py::handle shapes_h, py::handle starts_h, py::handle loc_h, py::handle w_h,
                   py::handle grad_out_h, py::handle grad_value_h, py::handle grad_accum_h, py::handle grad_loc_h,
                   py::handle grad_w_h, int strategy, uintptr_t stream, int num_threads) {
  TensorArg loc, weights;
  MsdaCall call = check_msda(value_h, shapes_h, starts_h, loc_h, w_h, loc, weights);
  const auto& pr = call.problem;
  const TensorArg grad_out = parse_tensor(grad_out_h, "grad_output");
  const TensorArg grad_value = parse_tensor(grad_value_h, "grad_value");
  const TensorArg grad_accum = parse_tensor(grad_accum_h, "grad_value_accum", /*optional=*/true);
  const TensorArg grad_loc = parse_tensor(grad_loc_h, "grad_sampling_locations");
  const TensorArg grad_w = parse_tensor(grad_w_h, "grad_attention_weights");
  require_output(grad_out, {pr.batch, pr.queries, pr.heads, pr.channels}, pr.value_dtype, call.value, "[N, Lq, M, D]");
  require_output(grad_value, call.value.shape, pr.value_dtype, call.value, "(same as value)");
  require_output(grad_loc, loc.shape, loc.float_dtype(), call.value, "(same as sampling_locations)");
  require_output(grad_w, weights.shape, pr.weight_dtype, call.value, "(same as attention_weights)");
  if (grad_accum.present) {
    require_output(grad_accum, call.value.shape, DType::kFloat32, call.value, "(same as value, float32, zeroed)");
  }
  deem::MsdaBackwardArgs args;
  args.value = call.value.data;
  args.locations = loc.data;
  args.weights = weights.data;
  args.grad_output = grad_out.data;
  args.grad_value = grad_value.data;
  args.grad_value_accum = grad_accum.present ? static_cast<float*>(grad_accum.data) : nullptr;
  args.grad_locations = grad_loc.data;
  args.grad_weights = grad_w.data;
  py::gil_scoped_release release;
  if (call.device == Device::kCPU) {
    deem::msda_backward_cpu(pr, args, num_threads);
  } else {
    deem::CudaDeviceGuard guard(call.device_id);
    deem::msda_backward_cuda(pr, args, static_cast<GradValueStrategy>(strategy), reinterpret_cast<void*>(stream));
  }
}

// ---------------------------------------------------------------------------------------------
// fused MMFS core

struct MmfsCall {
  deem::MmfsProblem problem;
  TensorArg value, loc, logits, visible, ignore;
};

// value [N, I*S_img, M, D], locations [N,Lq,I,M,P,2], logits [N,Lq,I,M,L,P], visible [N,Lq,I], ignore [M,D]
MmfsCall check_mmfs(py::handle value_h, py::handle shapes_h, py::handle starts_h, py::handle loc_h,
                    py::handle logits_h, py::handle visible_h, py::handle ignore_h) {
  MmfsCall call;
  call.value = parse_tensor(value_h, "value");
  const TensorArg shapes = parse_tensor(shapes_h, "spatial_shapes");
  const TensorArg starts = parse_tensor(starts_h, "level_start_index");
  call.loc = parse_tensor(loc_h, "sampling_locations");
  call.logits = parse_tensor(logits_h, "attention_logits");
  call.visible = parse_tensor(visible_h, "image_visible");
  call.ignore = parse_tensor(ignore_h, "ignore_token", /*optional=*/true);
  const TensorArg& value = call.value;
  auto& pr = call.problem;

  value.require_ndim(4, "[N, n_images * S_image, M, D]");
  pr.value_dtype = value.float_dtype();
  value.require_contiguous();
  pr.batch = value.dim(0);
  pr.heads = value.dim(2);
  pr.channels = value.dim(3);
  if (pr.heads < 1 || pr.channels < 1) fail("value: expected M >= 1 heads and D >= 1 channels, got shape " + value.shape_str());
  pr.image_len = read_levels(shapes, starts, pr.levels);
  const int64_t L = pr.levels.count;

  call.loc.require_ndim(6, "[N, Lq, n_images, M, P, 2]");
  pr.queries = call.loc.dim(1);
  pr.images = call.loc.dim(2);
  pr.points = call.loc.dim(4);
  require_points(pr.points, call.loc);
  if (pr.images < 1) fail("sampling_locations: expected at least one image, got shape " + call.loc.shape_str());
  if (value.dim(1) != pr.images * pr.image_len) {
    fail("value: expected " + std::to_string(pr.images) + " images x " + std::to_string(pr.image_len) +
         " rows (spatial_shapes) = " + std::to_string(pr.images * pr.image_len) + " rows in dim 1, got shape " +
         value.shape_str());
  }
  const DType op = opmath_dtype(pr.value_dtype);
  call.loc.require_shape({pr.batch, pr.queries, pr.images, pr.heads, pr.points, 2}, "[N, Lq, n_images, M, P, 2]");
  require_float_like(call.loc, op, value);
  call.logits.require_shape({pr.batch, pr.queries, pr.images, pr.heads, L, pr.points}, "[N, Lq, n_images, M, L, P]");
  require_float_like(call.logits, op, value);
  call.visible.require_shape({pr.batch, pr.queries, pr.images}, "[N, Lq, n_images]");
  if (!((call.visible.code == 6 || call.visible.code == 1) && call.visible.bits == 8)) {
    fail("image_visible: expected a bool or uint8 tensor, got " + call.visible.dtype_str());
  }
  call.visible.require_same_device(value);
  call.visible.require_contiguous();
  pr.has_ignore_token = call.ignore.present;
  if (call.ignore.present) require_output(call.ignore, {pr.heads, pr.channels}, pr.value_dtype, value, "[M, D]");
  return call;
}

void mmfs_forward(py::handle value_h, py::handle shapes_h, py::handle starts_h, py::handle loc_h,
                  py::handle logits_h, py::handle visible_h, py::handle ignore_h, py::handle out_h, py::handle lse_h,
                  uintptr_t stream, int num_threads) {
  MmfsCall call = check_mmfs(value_h, shapes_h, starts_h, loc_h, logits_h, visible_h, ignore_h);
  const auto& pr = call.problem;
  const TensorArg out = parse_tensor(out_h, "output");
  const TensorArg lse = parse_tensor(lse_h, "lse");
  require_output(out, {pr.batch, pr.queries, pr.heads, pr.channels}, pr.value_dtype, call.value, "[N, Lq, M, D]");
  require_output(lse, {pr.batch, pr.queries, pr.heads}, opmath_dtype(pr.value_dtype), call.value, "[N, Lq, M]");
  deem::MmfsForwardArgs args;
  args.value = call.value.data;
  args.locations = call.loc.data;
  args.logits = call.logits.data;
  args.visible = static_cast<const uint8_t*>(call.visible.data);
  args.ignore_token = call.ignore.present ? call.ignore.data : nullptr;
  args.output = out.data;
  args.lse = lse.data;
  if (pr.batch * pr.queries == 0) return;
  py::gil_scoped_release release;
  if (call.value.device == Device::kCPU) {
    deem::mmfs_forward_cpu(pr, args, num_threads);
  } else {
    deem::CudaDeviceGuard guard(call.value.device_id);
    deem::mmfs_forward_cuda(pr, args, reinterpret_cast<void*>(stream));
  }
}

int mmfs_grad_value_strategy(py::handle value_h, py::handle shapes_h, py::handle starts_h, py::handle loc_h,
                             py::handle logits_h, py::handle visible_h, py::handle ignore_h, int requested) {
  MmfsCall call = check_mmfs(value_h, shapes_h, starts_h, loc_h, logits_h, visible_h, ignore_h);
  if (call.value.device == Device::kCPU) return static_cast<int>(GradValueStrategy::kOwner);
  deem::CudaDeviceGuard guard(call.value.device_id);
  return static_cast<int>(deem::mmfs_grad_value_strategy(call.problem, static_cast<GradValueStrategy>(requested)));
}

void mmfs_backward(py::handle value_h, py::handle shapes_h, py::handle starts_h, py::handle loc_h,
                   py::handle logits_h, py::handle visible_h, py::handle ignore_h, py::handle lse_h,
                   py::handle grad_out_h, py::handle grad_value_h, py::handle grad_accum_h, py::handle grad_loc_h,
                   py::handle grad_logits_h, int strategy, uintptr_t stream, int num_threads) {
  MmfsCall call = check_mmfs(value_h, shapes_h, starts_h, loc_h, logits_h, visible_h, ignore_h);
  const auto& pr = call.problem;
  const DType op = opmath_dtype(pr.value_dtype);
  const TensorArg lse = parse_tensor(lse_h, "lse");
  const TensorArg grad_out = parse_tensor(grad_out_h, "grad_output");
  const TensorArg grad_value = parse_tensor(grad_value_h, "grad_value");
  const TensorArg grad_accum = parse_tensor(grad_accum_h, "grad_value_accum", /*optional=*/true);
  const TensorArg grad_loc = parse_tensor(grad_loc_h, "grad_sampling_locations");
  const TensorArg grad_logits = parse_tensor(grad_logits_h, "grad_attention_logits");
  require_output(lse, {pr.batch, pr.queries, pr.heads}, op, call.value, "[N, Lq, M]");
  require_output(grad_out, {pr.batch, pr.queries, pr.heads, pr.channels}, pr.value_dtype, call.value, "[N, Lq, M, D]");
  require_output(grad_value, call.value.shape, pr.value_dtype, call.value, "(same as value)");
  require_output(grad_loc, call.loc.shape, op, call.value, "(same as sampling_locations)");
  require_output(grad_logits, call.logits.shape, op, call.value, "(same as attention_logits)");
  if (grad_accum.present) {
    require_output(grad_accum, call.value.shape, DType::kFloat32, call.value, "(same as value, float32, zeroed)");
  }
  deem::MmfsBackwardArgs args;
  args.value = call.value.data;
  args.locations = call.loc.data;
  args.logits = call.logits.data;
  args.visible = static_cast<const uint8_t*>(call.visible.data);
  args.ignore_token = call.ignore.present ? call.ignore.data : nullptr;
  args.lse = lse.data;
  args.grad_output = grad_out.data;
  args.grad_value = grad_value.data;
  args.grad_value_accum = grad_accum.present ? static_cast<float*>(grad_accum.data) : nullptr;
  args.grad_locations = grad_loc.data;
  args.grad_logits = grad_logits.data;
  py::gil_scoped_release release;
  if (call.value.device == Device::kCPU) {
    deem::mmfs_backward_cpu(pr, args, num_threads);
  } else {
    deem::CudaDeviceGuard guard(call.value.device_id);
    deem::mmfs_backward_cuda(pr, args, static_cast<GradValueStrategy>(strategy), reinterpret_cast<void*>(stream));
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "deem compiled kernels (CPU always; CUDA when built with nvcc)";
  py::register_exception<ArgumentError>(m, "ArgumentError", PyExc_ValueError);
  m.attr("__version__") = DEEM_VERSION;
  m.def("cuda_kernels_built", &deem::cuda_kernels_built, "Whether the CUDA kernels were compiled in.");
  m.attr("max_levels") = deem::kMaxLevels;
  m.def("msda_forward", &msda_forward, py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"),
        py::arg("sampling_locations"), py::arg("attention_weights"), py::arg("output"), py::arg("stream") = 0,
        py::arg("num_threads") = 1);
  m.def(
      "msda_validate",
      [](py::handle v, py::handle s, py::handle st, py::handle l, py::handle w) {
        TensorArg loc, weights;
        check_msda(v, s, st, l, w, loc, weights);
      },
      py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("sampling_locations"),
      py::arg("attention_weights"), "Validate the inputs of msda_forward without running it.");
  m.def(
      "mmfs_validate",
      [](py::handle v, py::handle s, py::handle st, py::handle l, py::handle z, py::handle vis, py::handle ign) {
        check_mmfs(v, s, st, l, z, vis, ign);
      },
      py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("sampling_locations"),
      py::arg("attention_logits"), py::arg("image_visible"), py::arg("ignore_token"),
      "Validate the inputs of mmfs_forward without running it.");
  m.def("msda_grad_value_strategy", &msda_grad_value_strategy, py::arg("value"), py::arg("spatial_shapes"),
        py::arg("level_start_index"), py::arg("sampling_locations"), py::arg("attention_weights"),
        py::arg("requested") = 0);
  m.def("msda_backward", &msda_backward, py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"),
        py::arg("sampling_locations"), py::arg("attention_weights"), py::arg("grad_output"), py::arg("grad_value"),
        py::arg("grad_value_accum"), py::arg("grad_sampling_locations"), py::arg("grad_attention_weights"),
        py::arg("strategy") = 0, py::arg("stream") = 0, py::arg("num_threads") = 1);
  m.def("mmfs_forward", &mmfs_forward, py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"),
        py::arg("sampling_locations"), py::arg("attention_logits"), py::arg("image_visible"),
        py::arg("ignore_token"), py::arg("output"), py::arg("lse"), py::arg("stream") = 0, py::arg("num_threads") = 1);
  m.def("mmfs_grad_value_strategy", &mmfs_grad_value_strategy, py::arg("value"), py::arg("spatial_shapes"),
        py::arg("level_start_index"), py::arg("sampling_locations"), py::arg("attention_logits"),
        py::arg("image_visible"), py::arg("ignore_token"), py::arg("requested") = 0);
  m.def("mmfs_backward", &mmfs_backward, py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"),
        py::arg("sampling_locations"), py::arg("attention_logits"), py::arg("image_visible"),
        py::arg("ignore_token"), py::arg("lse"), py::arg("grad_output"), py::arg("grad_value"),
        py::arg("grad_value_accum"), py::arg("grad_sampling_locations"), py::arg("grad_attention_logits"),
        py::arg("strategy") = 0, py::arg("stream") = 0, py::arg("num_threads") = 1);
}

// deem._C: thin pybind11 bindings over the kernel library. Tensors arrive as DLPack capsules. Each op
// direction is one call: it validates every argument (bad input raises a ValueError naming the tensor),
// resolves the CUDA d(value) strategy, asks Python for a workspace only when that strategy needs one, and
// runs the kernel with the GIL released.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "deem/mmfs.h"
#include "deem/msda.h"
#include "registrations.h"
#include "tensor_arg.h"

namespace py = pybind11;
using deem::ArgumentError;
using deem::DType;
using deem::GradValueStrategy;
using deem::python::Device;
using deem::python::index_size;
using deem::python::parse_tensor;
using deem::python::TensorArg;

namespace {

[[noreturn]] void fail(const std::string& msg) { throw ArgumentError(msg); }

// Dimension i of t as an int32 index of the kernels.
int64_t dim32(const TensorArg& t, int i, const char* what) {
  return index_size(t.dim(i), t.name + ": " + what + " (dimension " + std::to_string(i) + ")");
}

// Reads spatial_shapes [L,2] and level_start_index [L] (host integer tensors) into a LevelTable and
// returns the total number of value rows they describe. Sizes are checked in int64 before any is
// narrowed: every level's H, W and H*W and the running row total must fit the kernels' int32 indices.
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
    const std::string level = "level " + std::to_string(l);
    if (h < 1 || w < 1) {
      fail(shapes.name + ": " + level + " has size (" + std::to_string(h) + ", " + std::to_string(w) +
           "); every level needs H >= 1 and W >= 1");
    }
    if (h > deem::kMaxIndex || w > deem::kMaxIndex || h * w > deem::kMaxIndex) {  // h, w < 2^31: no overflow
      fail(shapes.name + ": " + level + " has size (" + std::to_string(h) + ", " + std::to_string(w) +
           "); the kernels index a level's H * W pixels in int32 (at most 2^31 - 1)");
    }
    if (s != total) {
      fail(starts.name + ": " + level + " starts at row " + std::to_string(s) + " but the levels before it hold " +
           std::to_string(total) + " rows (expected the prefix sums of H*W)");
    }
    table.height[l] = static_cast<int32_t>(h);
    table.width[l] = static_cast<int32_t>(w);
    table.start[l] = static_cast<int32_t>(s);
    total += h * w;  // both terms < 2^31
    if (total > deem::kMaxIndex) {
      fail(shapes.name + ": the levels hold " + std::to_string(total) +
           " rows; the kernels index level starts in int32 (at most 2^31 - 1 rows)");
    }
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

void require_output(const TensorArg& out, std::vector<int64_t> shape, DType dtype, const TensorArg& ref,
                    const char* layout) {
  out.require_shape(shape, layout);
  require_float_like(out, dtype, ref);
}

py::tuple shape_tuple(const std::vector<int64_t>& shape) {
  py::tuple t(shape.size());
  for (size_t i = 0; i < shape.size(); ++i) t[i] = shape[i];
  return t;
}

// An output: either a DLPack capsule the caller allocated, or an allocator `(shape, dtype name) -> capsule`
// that is called only now, after the inputs were validated. `holder` keeps the capsule alive.
TensorArg output_arg(py::handle h, const char* name, const std::vector<int64_t>& shape, DType dtype,
                     const TensorArg& ref, const char* layout, py::object& holder) {
  if (PyCallable_Check(h.ptr())) {
    holder = h(shape_tuple(shape), deem::dtype_name(dtype));
  } else {
    holder = py::reinterpret_borrow<py::object>(h);
  }
  const TensorArg out = parse_tensor(holder, name);
  require_output(out, shape, dtype, ref, layout);
  return out;
}

GradValueStrategy requested_strategy(int strategy) {
  if (strategy < 0 || strategy > 3) {
    fail("strategy: expected 0 (auto), 1 (atomic), 2 (owner) or 3 (tensor), got " + std::to_string(strategy));
  }
  return static_cast<GradValueStrategy>(strategy);
}

bool is_16bit(DType dtype) { return dtype == DType::kFloat16 || dtype == DType::kBFloat16; }

// The fp32 workspace of the atomic strategy with 16-bit values, shaped like value (zeroed by the kernel).
TensorArg workspace_for(py::handle workspace, const TensorArg& value, py::object& holder) {
  if (!PyCallable_Check(workspace.ptr())) {
    fail("workspace: the atomic d(value) strategy with 16-bit values needs a float32 workspace; pass an allocator "
         "(shape, dtype name) -> DLPack capsule");
  }
  return output_arg(workspace, "grad_value_accum", value.shape, DType::kFloat32, value, "(same as value, float32)",
                    holder);
}

// The d(value) strategy that will run (CPU: owner, each thread owns its rows; CUDA: the kernels' choice) and,
// where the atomic strategy with 16-bit values needs one, its fp32 workspace through `workspace`.
template <typename Problem, typename Choose>
GradValueStrategy resolve_strategy(const TensorArg& value, const Problem& pr, int requested, Choose&& choose,
                                   py::handle workspace, TensorArg& accum, py::object& holder) {
  GradValueStrategy chosen = requested_strategy(requested);
  if (value.device != Device::kCUDA) return GradValueStrategy::kOwner;
  {
    deem::CudaDeviceGuard guard(value.device_id);
    chosen = choose(pr, chosen);
  }
  if (chosen == GradValueStrategy::kAtomic && is_16bit(pr.value_dtype) && pr.batch > 0) {
    accum = workspace_for(workspace, value, holder);
  }
  return chosen;
}

// Runs `cpu()` or, on the value's CUDA device, `cuda()` with the GIL released.
template <typename Cpu, typename Cuda>
void run_on_device(const TensorArg& value, Cpu&& cpu, Cuda&& cuda) {
  py::gil_scoped_release release;
  if (value.device == Device::kCPU) {
    cpu();
  } else {
    deem::CudaDeviceGuard guard(value.device_id);
    cuda();
  }
}

// ---------------------------------------------------------------------------------------------
// generic multi-scale deformable attention

struct MsdaCall {
  deem::MsdaProblem problem;
  TensorArg value, loc, weights;
};

// value [N,S,M,D], locations [N,Lq,M,L,P,2], weights [N,Lq,M,L,P]
MsdaCall check_msda(py::handle value_h, py::handle shapes_h, py::handle starts_h, py::handle loc_h, py::handle w_h) {
  MsdaCall call;
  TensorArg& value = call.value;
  value = parse_tensor(value_h, "value");
  const TensorArg shapes = parse_tensor(shapes_h, "spatial_shapes");
  const TensorArg starts = parse_tensor(starts_h, "level_start_index");
  call.loc = parse_tensor(loc_h, "sampling_locations");
  call.weights = parse_tensor(w_h, "attention_weights");
  TensorArg& loc = call.loc;
  TensorArg& weights = call.weights;

  value.require_ndim(4, "[N, S, M, D] (batch, value rows, heads, channels)");
  const DType vdt = value.float_dtype();
  value.require_contiguous();
  auto& pr = call.problem;
  pr.batch = dim32(value, 0, "N");
  pr.value_len = value.dim(1);
  pr.heads = dim32(value, 2, "M");
  pr.channels = dim32(value, 3, "D");
  pr.value_dtype = vdt;
  if (pr.heads < 1 || pr.channels < 1) fail("value: expected M >= 1 heads and D >= 1 channels, got shape " + value.shape_str());

  const int64_t total = read_levels(shapes, starts, pr.levels);
  if (total != pr.value_len) {
    fail("spatial_shapes: the levels hold " + std::to_string(total) + " rows (sum of H*W) but value has S = " +
         std::to_string(pr.value_len) + " (value shape " + value.shape_str() + ")");
  }
  const int64_t L = pr.levels.count;
  loc.require_ndim(6, "[N, Lq, M, L, P, 2]");
  pr.queries = dim32(loc, 1, "Lq");
  pr.points = loc.dim(4);
  require_points(pr.points, loc);
  loc.require_shape({pr.batch, pr.queries, pr.heads, L, pr.points, 2}, "[N, Lq, M, L, P, 2]");
  require_float_like(loc, deem::acc_dtype(vdt), value);
  weights.require_shape({pr.batch, pr.queries, pr.heads, L, pr.points}, "[N, Lq, M, L, P]");
  pr.weight_dtype = weights.float_dtype();
  if (pr.weight_dtype != vdt && pr.weight_dtype != deem::acc_dtype(vdt)) {
    fail("attention_weights: expected dtype " + std::string(deem::dtype_name(vdt)) + " or " +
         deem::dtype_name(deem::acc_dtype(vdt)) + ", got " + weights.dtype_str());
  }
  weights.require_same_device(value);
  weights.require_contiguous();
  deem::python::element_count(value.shape, "value: N * S * M * D");
  deem::python::element_count(loc.shape, "sampling_locations: N * Lq * M * L * P * 2");
  return call;
}

void msda_forward(py::handle value_h, py::handle shapes_h, py::handle starts_h, py::handle loc_h, py::handle w_h,
                  py::handle out_h, uintptr_t stream, int num_threads) {
  const MsdaCall call = check_msda(value_h, shapes_h, starts_h, loc_h, w_h);
  const auto& pr = call.problem;
  py::object out_holder;
  const TensorArg out = output_arg(out_h, "output", {pr.batch, pr.queries, pr.heads, pr.channels}, pr.value_dtype,
                                   call.value, "[N, Lq, M, D]", out_holder);
  const deem::MsdaForwardArgs args{call.value.data, call.loc.data, call.weights.data, out.data};
  if (pr.batch * pr.queries == 0) return;
  run_on_device(call.value, [&] { deem::msda_forward_cpu(pr, args, num_threads); },
                [&] { deem::msda_forward_cuda(pr, args, reinterpret_cast<void*>(stream)); });
}

// Returns the d(value) strategy that ran (CPU: owner, each thread owns its rows).
int msda_backward(py::handle value_h, py::handle shapes_h, py::handle starts_h, py::handle loc_h, py::handle w_h,
                  py::handle grad_out_h, py::handle grad_value_h, py::handle grad_loc_h, py::handle grad_w_h,
                  int strategy, py::handle workspace, uintptr_t stream, int num_threads) {
  const MsdaCall call = check_msda(value_h, shapes_h, starts_h, loc_h, w_h);
  const auto& pr = call.problem;
  const TensorArg grad_out = parse_tensor(grad_out_h, "grad_output");
  require_output(grad_out, {pr.batch, pr.queries, pr.heads, pr.channels}, pr.value_dtype, call.value, "[N, Lq, M, D]");
  py::object holders[3];
  const TensorArg grad_value = output_arg(grad_value_h, "grad_value", call.value.shape, pr.value_dtype, call.value,
                                          "(same as value)", holders[0]);
  const TensorArg grad_loc = output_arg(grad_loc_h, "grad_sampling_locations", call.loc.shape, call.loc.float_dtype(),
                                        call.value, "(same as sampling_locations)", holders[1]);
  const TensorArg grad_w = output_arg(grad_w_h, "grad_attention_weights", call.weights.shape, pr.weight_dtype,
                                      call.value, "(same as attention_weights)", holders[2]);
  py::object holder;
  TensorArg accum;
  const GradValueStrategy chosen =
      resolve_strategy(call.value, pr, strategy, deem::msda_grad_value_strategy, workspace, accum, holder);
  deem::MsdaBackwardArgs args;
  args.value = call.value.data;
  args.locations = call.loc.data;
  args.weights = call.weights.data;
  args.grad_output = grad_out.data;
  args.grad_value = grad_value.data;
  args.grad_value_accum = accum.present ? static_cast<float*>(accum.data) : nullptr;
  args.grad_locations = grad_loc.data;
  args.grad_weights = grad_w.data;
  if (pr.batch > 0) {  // else every gradient is empty
    run_on_device(call.value, [&] { deem::msda_backward_cpu(pr, args, num_threads); },
                  [&] { deem::msda_backward_cuda(pr, args, chosen, reinterpret_cast<void*>(stream)); });
  }
  return static_cast<int>(chosen);
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
  pr.batch = dim32(value, 0, "N");
  pr.heads = dim32(value, 2, "M");
  pr.channels = dim32(value, 3, "D");
  if (pr.heads < 1 || pr.channels < 1) fail("value: expected M >= 1 heads and D >= 1 channels, got shape " + value.shape_str());
  pr.image_len = read_levels(shapes, starts, pr.levels);
  const int64_t L = pr.levels.count;

  call.loc.require_ndim(6, "[N, Lq, n_images, M, P, 2]");
  pr.queries = dim32(call.loc, 1, "Lq");
  pr.images = dim32(call.loc, 2, "n_images");
  pr.points = call.loc.dim(4);
  require_points(pr.points, call.loc);
  if (pr.images < 1) fail("sampling_locations: expected at least one image, got shape " + call.loc.shape_str());
  const int64_t rows = deem::python::checked_mul(pr.images, pr.image_len, "value: n_images x S_image rows");
  if (value.dim(1) != rows) {
    fail("value: expected " + std::to_string(pr.images) + " images x " + std::to_string(pr.image_len) +
         " rows (spatial_shapes) = " + std::to_string(rows) + " rows in dim 1, got shape " + value.shape_str());
  }
  const DType op = deem::acc_dtype(pr.value_dtype);
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
  deem::python::element_count(value.shape, "value: N * rows * M * D");
  deem::python::element_count(call.logits.shape, "attention_logits: N * Lq * n_images * M * L * P");
  return call;
}

void mmfs_forward(py::handle value_h, py::handle shapes_h, py::handle starts_h, py::handle loc_h,
                  py::handle logits_h, py::handle visible_h, py::handle ignore_h, py::handle out_h, py::handle lse_h,
                  uintptr_t stream, int num_threads) {
  const MmfsCall call = check_mmfs(value_h, shapes_h, starts_h, loc_h, logits_h, visible_h, ignore_h);
  const auto& pr = call.problem;
  py::object holders[2];
  const TensorArg out = output_arg(out_h, "output", {pr.batch, pr.queries, pr.heads, pr.channels}, pr.value_dtype,
                                   call.value, "[N, Lq, M, D]", holders[0]);
  const TensorArg lse = output_arg(lse_h, "lse", {pr.batch, pr.queries, pr.heads}, deem::acc_dtype(pr.value_dtype),
                                   call.value, "[N, Lq, M]", holders[1]);
  deem::MmfsForwardArgs args;
  args.value = call.value.data;
  args.locations = call.loc.data;
  args.logits = call.logits.data;
  args.visible = static_cast<const uint8_t*>(call.visible.data);
  args.ignore_token = call.ignore.present ? call.ignore.data : nullptr;
  args.output = out.data;
  args.lse = lse.data;
  if (pr.batch * pr.queries == 0) return;
  run_on_device(call.value, [&] { deem::mmfs_forward_cpu(pr, args, num_threads); },
                [&] { deem::mmfs_forward_cuda(pr, args, reinterpret_cast<void*>(stream)); });
}

// Returns the d(value) strategy that ran (CPU: owner).
int mmfs_backward(py::handle value_h, py::handle shapes_h, py::handle starts_h, py::handle loc_h,
                  py::handle logits_h, py::handle visible_h, py::handle ignore_h, py::handle lse_h,
                  py::handle grad_out_h, py::handle grad_value_h, py::handle grad_loc_h, py::handle grad_logits_h,
                  int strategy, py::handle workspace, uintptr_t stream, int num_threads) {
  const MmfsCall call = check_mmfs(value_h, shapes_h, starts_h, loc_h, logits_h, visible_h, ignore_h);
  const auto& pr = call.problem;
  const DType op = deem::acc_dtype(pr.value_dtype);
  const TensorArg lse = parse_tensor(lse_h, "lse");
  const TensorArg grad_out = parse_tensor(grad_out_h, "grad_output");
  require_output(lse, {pr.batch, pr.queries, pr.heads}, op, call.value, "[N, Lq, M]");
  require_output(grad_out, {pr.batch, pr.queries, pr.heads, pr.channels}, pr.value_dtype, call.value, "[N, Lq, M, D]");
  py::object holders[3];
  const TensorArg grad_value = output_arg(grad_value_h, "grad_value", call.value.shape, pr.value_dtype, call.value,
                                          "(same as value)", holders[0]);
  const TensorArg grad_loc = output_arg(grad_loc_h, "grad_sampling_locations", call.loc.shape, op, call.value,
                                        "(same as sampling_locations)", holders[1]);
  const TensorArg grad_logits = output_arg(grad_logits_h, "grad_attention_logits", call.logits.shape, op, call.value,
                                           "(same as attention_logits)", holders[2]);
  py::object holder;
  TensorArg accum;
  const GradValueStrategy chosen =
      resolve_strategy(call.value, pr, strategy, deem::mmfs_grad_value_strategy, workspace, accum, holder);
  deem::MmfsBackwardArgs args;
  args.value = call.value.data;
  args.locations = call.loc.data;
  args.logits = call.logits.data;
  args.visible = static_cast<const uint8_t*>(call.visible.data);
  args.ignore_token = call.ignore.present ? call.ignore.data : nullptr;
  args.lse = lse.data;
  args.grad_output = grad_out.data;
  args.grad_value = grad_value.data;
  args.grad_value_accum = accum.present ? static_cast<float*>(accum.data) : nullptr;
  args.grad_locations = grad_loc.data;
  args.grad_logits = grad_logits.data;
  if (pr.batch > 0) {  // else every gradient is empty
    run_on_device(call.value, [&] { deem::mmfs_backward_cpu(pr, args, num_threads); },
                  [&] { deem::mmfs_backward_cuda(pr, args, chosen, reinterpret_cast<void*>(stream)); });
  }
  return static_cast<int>(chosen);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "deem compiled kernels (CPU always; CUDA when built with nvcc)";
  py::register_exception<ArgumentError>(m, "ArgumentError", PyExc_ValueError);
  py::register_exception<deem::OutOfMemoryError>(m, "OutOfMemoryError", PyExc_MemoryError);
  m.attr("__version__") = DEEM_VERSION;
  m.def("cuda_kernels_built", &deem::cuda_kernels_built, "Whether the CUDA kernels were compiled in.");
  m.attr("max_levels") = deem::kMaxLevels;
  deem::python::register_masked_mse(m);
  deem::python::register_resampler(m);
  m.def("msda_forward", &msda_forward, py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"),
        py::arg("sampling_locations"), py::arg("attention_weights"), py::arg("output"), py::arg("stream") = 0,
        py::arg("num_threads") = 1,
        "Validate the arguments, then write the forward into `output` (a DLPack capsule, or an allocator "
        "(shape, dtype name) -> capsule called once the inputs are valid).");
  m.def("msda_backward", &msda_backward, py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"),
        py::arg("sampling_locations"), py::arg("attention_weights"), py::arg("grad_output"), py::arg("grad_value"),
        py::arg("grad_sampling_locations"), py::arg("grad_attention_weights"), py::arg("strategy") = 0,
        py::arg("workspace") = py::none(), py::arg("stream") = 0, py::arg("num_threads") = 1,
        "Validate the arguments, resolve the d(value) strategy (0 auto, 1 atomic, 2 owner, 3 tensor), allocate the "
        "gradients (capsules or an allocator) and, only if that strategy needs one, a float32 workspace through "
        "workspace(shape, dtype name); write the gradients and return the strategy that ran.");
  m.def("mmfs_forward", &mmfs_forward, py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"),
        py::arg("sampling_locations"), py::arg("attention_logits"), py::arg("image_visible"),
        py::arg("ignore_token"), py::arg("output"), py::arg("lse"), py::arg("stream") = 0, py::arg("num_threads") = 1,
        "Validate the arguments, then write the forward into `output` and `lse` (capsules or an allocator).");
  m.def("mmfs_backward", &mmfs_backward, py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"),
        py::arg("sampling_locations"), py::arg("attention_logits"), py::arg("image_visible"),
        py::arg("ignore_token"), py::arg("lse"), py::arg("grad_output"), py::arg("grad_value"),
        py::arg("grad_sampling_locations"), py::arg("grad_attention_logits"), py::arg("strategy") = 0,
        py::arg("workspace") = py::none(), py::arg("stream") = 0, py::arg("num_threads") = 1,
        "As msda_backward, for the fused MMFS core.");
}

// OpenVINO's kernels of the nodes visionmamba.BiSelectiveScan and visionmamba.ConvSiLU (scan_lanes.h and
// conv_silu.h, as the PyTorch ops and ONNX Runtime's kernels run them) as OpenVINO operations, on
// OpenVINO's TBB threads. The extension library holds the operations and two mappings to them: the ONNX
// frontend's, of the nodes (domain "visionmamba"), and the PyTorch frontend's, of the ops visionmamba::bi_scan
// and conv_silu (traced or torch.export-ed), with aten's antialiased bicubic resampling that the frontend lacks.
// openvino.Core.add_extension(path) and openvino.convert_model(..., extension=path) load them. Contracts:
// onnxruntime_op.cpp.
#include <tbb/parallel_for.h>
#include <tbb/task_arena.h>

#include <openvino/core/extension.hpp>
#include <openvino/core/op_extension.hpp>
#include <openvino/frontend/onnx/extension/op.hpp>
#include <openvino/frontend/pytorch/extension/conversion.hpp>
#include <openvino/op/constant.hpp>
#include <openvino/op/convert.hpp>
#include <openvino/op/interpolate.hpp>
#include <openvino/op/op.hpp>

#include <stdexcept>
#include <string>
#include <vector>

#include "conv_silu.h"
#include "isa_guard.h"
#include "scan_lanes.h"

namespace visionmamba {

class BiSelectiveScan : public ov::op::Op {
 public:
  OPENVINO_OP("BiSelectiveScan", "visionmamba");

  BiSelectiveScan() = default;
  explicit BiSelectiveScan(const ov::OutputVector& inputs) : Op(inputs) { constructor_validate_and_infer_types(); }

  // y (b, L, E): z's shape, float32.
  void validate_and_infer_types() override {
    NODE_VALIDATION_CHECK(this, get_input_size() == 7, "BiSelectiveScan takes 7 inputs, got ", get_input_size());
    for (size_t i = 0; i < 7; ++i)
      NODE_VALIDATION_CHECK(this, get_input_element_type(i).is_dynamic() || get_input_element_type(i) == ov::element::f32,
                            "BiSelectiveScan's inputs are float32");
    set_output_type(0, ov::element::f32, get_input_partial_shape(5));
  }

  std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& inputs) const override {
    return std::make_shared<BiSelectiveScan>(inputs);
  }

  bool visit_attributes(ov::AttributeVisitor&) override { return true; }

  bool has_evaluate() const override { return true; }

  bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override {
    const ov::Shape& u = inputs[0].get_shape();
    const ov::Shape& dt = inputs[2].get_shape();
    const ov::Shape& A = inputs[3].get_shape();
    lanes::BiScanInputs<float> in;
    in.u = inputs[0].data<const float>();
    in.x_proj_out = inputs[1].data<const float>();
    in.dt_weight = inputs[2].data<const float>();
    in.A = inputs[3].data<const float>();
    in.D = inputs[4].data<const float>();
    in.z = inputs[5].data<const float>();
    in.bias = inputs[6].data<const float>();
    in.batch = static_cast<int64_t>(u[1]);
    in.L = static_cast<int64_t>(u[2]);
    in.E = static_cast<int64_t>(u[3]);
    in.R = static_cast<int64_t>(dt[2]);
    in.N = static_cast<int64_t>(A[2]);
    outputs[0].set_shape(inputs[5].get_shape());
    if (in.batch * in.L * in.E == 0) return true;
    const auto weights = lanes::lane_weights(in);
    auto args = lanes::contiguous_args(in, weights, outputs[0].data<float>());
    args.task_blocks = lanes::task_blocks(in.batch, in.E, tbb::this_task_arena::max_concurrency());
    tbb::parallel_for(int64_t(0), lanes::bi_forward_tasks(args), [&](int64_t task) {
      thread_local std::vector<float> h;
      h.resize(lanes::bi_forward_scratch(args));
      lanes::bi_forward_task(args, task, h.data());
    });
    return true;
  }
};

class ConvSiLU : public ov::op::Op {
 public:
  OPENVINO_OP("ConvSiLU", "visionmamba");

  ConvSiLU() = default;
  explicit ConvSiLU(const ov::OutputVector& inputs) : Op(inputs) { constructor_validate_and_infer_types(); }

  // u (2, b, L, E) from x (b, L, E).
  void validate_and_infer_types() override {
    NODE_VALIDATION_CHECK(this, get_input_size() == 3, "ConvSiLU takes 3 inputs, got ", get_input_size());
    ov::PartialShape u{2};
    const ov::PartialShape& x = get_input_partial_shape(0);
    if (x.rank().is_static())
      for (const auto& d : x) u.push_back(d);
    set_output_type(0, ov::element::f32, x.rank().is_static() ? u : ov::PartialShape::dynamic(4));
  }

  std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& inputs) const override {
    return std::make_shared<ConvSiLU>(inputs);
  }

  bool visit_attributes(ov::AttributeVisitor&) override { return true; }

  bool has_evaluate() const override { return true; }

  bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override {
    const ov::Shape& x = inputs[0].get_shape();
    const int64_t batch = static_cast<int64_t>(x[0]), L = static_cast<int64_t>(x[1]), E = static_cast<int64_t>(x[2]);
    const int64_t K = static_cast<int64_t>(inputs[1].get_shape()[2]);
    outputs[0].set_shape({2, x[0], x[1], x[2]});
    if (batch * L * E == 0) return true;
    const std::vector<float> taps = lanes::transposed_pairs(inputs[1].data<const float>(), E, K);  // (2, K, E)
    conv::ConvParams<float> p;
    p.x = inputs[0].data<const float>();
    p.sx_b = L * E;
    p.sx_t = E;
    p.w = taps.data();
    p.bias = inputs[2].data<const float>();
    p.batch = batch;
    p.L = L;
    p.E = E;
    p.K = K;
    float* u = outputs[0].data<float>();
    tbb::parallel_for(int64_t(0), 2 * batch * L, [&](int64_t r) {
      conv::conv_silu_row(p, r / (batch * L), (r / L) % batch, r % L, u + r * E, u + r * E);
    });
    return true;
  }
};

// ------------------------------------------------------------------ the PyTorch frontend: ops -> operations
namespace pytorch {

ov::OutputVector inputs(const ov::frontend::NodeContext& context, size_t count) {
  ov::OutputVector in;
  for (size_t i = 0; i < count; ++i) in.push_back(context.get_input(static_cast<int>(i)));
  return in;
}

// visionmamba::bi_scan (u, x_proj_out, dt_weight, A, D, z, bias, checkpoint_steps) -> (y, states): the
// states are the backward's, which a converted (inference) model has no use for: an empty tensor.
ov::OutputVector bi_scan(const ov::frontend::NodeContext& context) {
  auto scan = std::make_shared<BiSelectiveScan>(inputs(context, 7));
  auto states = ov::op::v0::Constant::create(ov::element::f32, ov::Shape{0}, std::vector<float>{});
  return {scan->output(0), states};
}

// visionmamba::bi_scan_inference: the same inputs but checkpoint_steps, y alone.
ov::OutputVector bi_scan_inference(const ov::frontend::NodeContext& context) {
  return {std::make_shared<BiSelectiveScan>(inputs(context, 7))->output(0)};
}

ov::OutputVector conv_silu(const ov::frontend::NodeContext& context) {
  return {std::make_shared<ConvSiLU>(inputs(context, 3))->output(0)};
}

// aten::_upsample_bicubic2d_aa (input, output_size, align_corners, scales) in both overloads (.default and
// .vec: output_size None, scale_factors given): PyTorch's antialiased bicubic is PIL's (a = -0.5, taps
// renormalised at the borders), which is OpenVINO's BICUBIC_PILLOW (checked against PyTorch in the tests).
ov::OutputVector upsample_bicubic2d_aa(const ov::frontend::NodeContext& context) {
  using Interpolate = ov::op::v11::Interpolate;
  Interpolate::InterpolateAttrs attrs;
  attrs.mode = Interpolate::InterpolateMode::BICUBIC_PILLOW;
  attrs.antialias = true;
  attrs.cube_coeff = -0.5;
  const bool align_corners = context.get_values_from_const_input(2).as<bool>();
  attrs.coordinate_transformation_mode = align_corners ? Interpolate::CoordinateTransformMode::ALIGN_CORNERS
                                                       : Interpolate::CoordinateTransformMode::HALF_PIXEL;
  const bool by_size = !context.input_is_none(1);
  attrs.shape_calculation_mode = by_size ? Interpolate::ShapeCalcMode::SIZES : Interpolate::ShapeCalcMode::SCALES;
  auto target = std::make_shared<ov::op::v0::Convert>(context.get_input(by_size ? 1 : 3),
                                                      by_size ? ov::element::i64 : ov::element::f32);
  auto axes = ov::op::v0::Constant::create(ov::element::i64, ov::Shape{2}, std::vector<int64_t>{2, 3});
  return {std::make_shared<Interpolate>(context.get_input(0), target, axes, attrs)->output(0)};
}

// Each op under its TorchScript name (convert_model of a module) and its FX name (of a torch.export program);
// bi_scan (two results, in graphs traced with gradients) under the first only: the FX frontend would index
// its first result where the graph takes the second.
std::vector<ov::Extension::Ptr> conversions() {
  std::vector<ov::Extension::Ptr> all;
  const std::vector<std::pair<std::string, ov::frontend::CreatorFunction>> ops = {
      {"visionmamba::bi_scan", bi_scan},
      {"visionmamba::bi_scan_inference", bi_scan_inference},
      {"visionmamba.bi_scan_inference.default", bi_scan_inference},
      {"visionmamba::conv_silu", conv_silu}, {"visionmamba.conv_silu.default", conv_silu},
      {"aten::_upsample_bicubic2d_aa", upsample_bicubic2d_aa},
      {"aten._upsample_bicubic2d_aa.default", upsample_bicubic2d_aa},
      {"aten._upsample_bicubic2d_aa.vec", upsample_bicubic2d_aa}};
  for (const auto& [name, converter] : ops)
    all.push_back(std::make_shared<ov::frontend::pytorch::ConversionExtension>(name, converter));
  return all;
}

}  // namespace pytorch
}  // namespace visionmamba

namespace {

std::vector<ov::Extension::Ptr> all_extensions() {
  std::vector<ov::Extension::Ptr> all = {
      std::make_shared<ov::OpExtension<visionmamba::BiSelectiveScan>>(),
      std::make_shared<ov::frontend::onnx::OpExtension<visionmamba::BiSelectiveScan>>("BiSelectiveScan", "visionmamba"),
      std::make_shared<ov::OpExtension<visionmamba::ConvSiLU>>(),
      std::make_shared<ov::frontend::onnx::OpExtension<visionmamba::ConvSiLU>>("ConvSiLU", "visionmamba"),
  };
  for (auto& conversion : visionmamba::pytorch::conversions()) all.push_back(conversion);
  return all;
}

}  // namespace

// OpenVINO's entry point (what OPENVINO_CREATE_EXTENSIONS writes), with the instruction-set check first: a CPU that
// lacks an extension the library was compiled for gets the message as an exception from Core.add_extension.
OPENVINO_EXTENSION_C_API void OV_CREATE_EXTENSION(std::vector<ov::Extension::Ptr>& ext);
OPENVINO_EXTENSION_C_API VISIONMAMBA_BASELINE void OV_CREATE_EXTENSION(std::vector<ov::Extension::Ptr>& ext) {
  static char message[256];
  if (visionmamba::isa_mismatch(message, sizeof(message), "libvisionmamba_openvino_portable")) throw std::runtime_error(message);
  ext = all_extensions();
}

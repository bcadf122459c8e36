// OpenVINO's kernels of the nodes visionmamba.BiSelectiveScan and visionmamba.ConvSiLU (scan_lanes.h and
// conv_silu.h, as the PyTorch ops and ONNX Runtime's kernels run them) as OpenVINO operations, on
// OpenVINO's TBB threads. The extension library holds the operations and the ONNX frontend's mapping of the
// nodes (domain "visionmamba") to them; openvino.Core.add_extension(path) loads both. Contracts:
// onnxruntime_op.cpp.
#include <tbb/parallel_for.h>

#include <openvino/core/extension.hpp>
#include <openvino/core/op_extension.hpp>
#include <openvino/frontend/onnx/extension/op.hpp>
#include <openvino/op/op.hpp>

#include <vector>

#include "conv_silu.h"
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
    const auto args = lanes::contiguous_args(in, weights, outputs[0].data<float>());
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
      conv::conv_silu_row(p, r / (batch * L), (r / L) % batch, r % L, u + r * E);
    });
    return true;
  }
};

}  // namespace visionmamba

OPENVINO_CREATE_EXTENSIONS(std::vector<ov::Extension::Ptr>({
    std::make_shared<ov::OpExtension<visionmamba::BiSelectiveScan>>(),
    std::make_shared<ov::frontend::onnx::OpExtension<visionmamba::BiSelectiveScan>>("BiSelectiveScan", "visionmamba"),
    std::make_shared<ov::OpExtension<visionmamba::ConvSiLU>>(),
    std::make_shared<ov::frontend::onnx::OpExtension<visionmamba::ConvSiLU>>("ConvSiLU", "visionmamba"),
}));

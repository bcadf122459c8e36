// OpenVINO's kernel of visionmamba.BiSelectiveScan: the lanes forward of scan_lanes.h (the kernel of the
// PyTorch op bi_scan_ and of ONNX Runtime's node) as an OpenVINO operation, on OpenVINO's TBB threads.
//
// The extension library holds the operation and the ONNX frontend's mapping of the node (domain
// "visionmamba") to it; openvino.Core.add_extension(path) loads both. Contract: onnxruntime_op.cpp.
#include <tbb/parallel_for.h>

#include <openvino/core/extension.hpp>
#include <openvino/core/op_extension.hpp>
#include <openvino/frontend/onnx/extension/op.hpp>
#include <openvino/op/op.hpp>

#include <vector>

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

}  // namespace visionmamba

OPENVINO_CREATE_EXTENSIONS(std::vector<ov::Extension::Ptr>({
    std::make_shared<ov::OpExtension<visionmamba::BiSelectiveScan>>(),
    std::make_shared<ov::frontend::onnx::OpExtension<visionmamba::BiSelectiveScan>>("BiSelectiveScan", "visionmamba"),
}));

// The Python bindings of the CPU scan kernels: the only list of what the extension exports.
#include <torch/extension.h>

#include "selective_scan.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "visionmamba's CPU selective-scan kernels (layouts in selective_scan.h)";
  m.def("scan_forward", &visionmamba::scan_forward, "one-direction scan, forward");
  m.def("scan_backward", &visionmamba::scan_backward, "one-direction scan, gradients");
  m.def("bi_forward", &visionmamba::bi_forward, "both directions of the mixer, forward (channels as lanes)");
  m.def("bi_backward", &visionmamba::bi_backward, "both directions of the mixer, gradients");
  m.def("mixer_core", &visionmamba::mixer_core, "conv + SiLU, x_proj and both scans in token tiles, inference");
  m.def("conv_forward", &visionmamba::conv_forward, "depthwise conv + SiLU of both directions, forward");
  m.def("conv_backward", &visionmamba::conv_backward, "depthwise conv + SiLU of both directions, gradients");
  m.def("rms_norm_forward", &visionmamba::rms_norm_forward, "residual add + RMSNorm, forward");
  m.def("rms_norm_backward", &visionmamba::rms_norm_backward, "residual add + RMSNorm, gradients");
}

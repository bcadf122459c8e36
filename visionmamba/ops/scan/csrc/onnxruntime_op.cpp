// ONNX Runtime's kernel of visionmamba.BiSelectiveScan: the lanes forward of scan_lanes.h (the kernel of the
// PyTorch op bi_scan_) behind ONNX Runtime's C API, on the runtime's own intra-op threads. No torch here.
//
// The node (domain "visionmamba", version 1) has the contract of the op bi_scan, inference only:
//   u (2, b, L, E), x_proj_out (2, b, L, R + 2N), dt_weight (2, E, R), A (2, E, N), D (2, E), z (b, L, E),
//   bias (2, E), all float32 -> y (b, L, E) = (y_forward + y_backward) / 2.
// ONNX Runtime loads the library with SessionOptions.register_custom_ops_library, which calls RegisterCustomOps.
#include <climits>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "scan_lanes.h"
#include "third_party/onnxruntime/onnxruntime_c_api.h"

namespace {

using visionmamba::lanes::BiForwardArgs;

constexpr size_t kInputs = 7;
const char* const kInputNames[kInputs] = {"u", "x_proj_out", "dt_weight", "A", "D", "z", "bias"};
const size_t kRanks[kInputs] = {4, 4, 3, 3, 2, 3, 2};

const OrtApi* g_api = nullptr;

// A failed check as the runtime's error (the node's name is added by the runtime).
OrtStatusPtr invalid(const char* what, const char* name) {
  char message[256];
  std::snprintf(message, sizeof message, "visionmamba.BiSelectiveScan: %s %s", name, what);
  return g_api->CreateStatus(ORT_INVALID_ARGUMENT, message);
}

#define RETURN_IF_ERROR(expr)             \
  do {                                    \
    OrtStatusPtr status_ = (expr);        \
    if (status_ != nullptr) return status_; \
  } while (0)

// The float32 data and dimensions of input i, its rank checked.
OrtStatusPtr input(OrtKernelContext* context, size_t i, const float** data, std::vector<int64_t>* dims) {
  const OrtValue* value = nullptr;
  RETURN_IF_ERROR(g_api->KernelContext_GetInput(context, i, &value));
  OrtTensorTypeAndShapeInfo* info = nullptr;
  RETURN_IF_ERROR(g_api->GetTensorTypeAndShape(value, &info));
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  size_t rank = 0;
  OrtStatusPtr status = g_api->GetTensorElementType(info, &type);
  if (status == nullptr) status = g_api->GetDimensionsCount(info, &rank);
  if (status == nullptr && rank == kRanks[i]) {
    dims->resize(rank);
    status = g_api->GetDimensions(info, dims->data(), rank);
  }
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  RETURN_IF_ERROR(status);
  if (type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) return invalid("must be float32", kInputNames[i]);
  if (rank != kRanks[i]) return invalid("has the wrong rank", kInputNames[i]);
  void* raw = nullptr;
  RETURN_IF_ERROR(g_api->GetTensorMutableData(const_cast<OrtValue*>(value), &raw));
  *data = static_cast<const float*>(raw);
  return nullptr;
}

void run_task(void* data, size_t task) {
  const auto& args = *static_cast<const BiForwardArgs<float>*>(data);
  thread_local std::vector<float> h;
  h.resize(visionmamba::lanes::bi_forward_scratch(args));
  visionmamba::lanes::bi_forward_task(args, static_cast<int64_t>(task), h.data());
}

OrtStatusPtr compute(OrtKernelContext* context) {
  const float* in[kInputs];
  std::vector<int64_t> dims[kInputs];
  for (size_t i = 0; i < kInputs; ++i) RETURN_IF_ERROR(input(context, i, &in[i], &dims[i]));
  const int64_t batch = dims[0][1], L = dims[0][2], E = dims[0][3], R = dims[2][2], N = dims[3][2];
  const std::vector<int64_t> u_shape = {2, batch, L, E}, x_shape = {2, batch, L, R + 2 * N}, w_shape = {2, E, R},
                             a_shape = {2, E, N}, de_shape = {2, E}, z_shape = {batch, L, E};
  const std::vector<int64_t>* expected[kInputs] = {&u_shape, &x_shape, &w_shape, &a_shape, &de_shape, &z_shape, &de_shape};
  for (size_t i = 0; i < kInputs; ++i)
    if (dims[i] != *expected[i]) return invalid("does not match the shapes of u, dt_weight and A", kInputNames[i]);

  OrtValue* output = nullptr;
  RETURN_IF_ERROR(g_api->KernelContext_GetOutput(context, 0, z_shape.data(), z_shape.size(), &output));
  void* out = nullptr;
  RETURN_IF_ERROR(g_api->GetTensorMutableData(output, &out));
  if (batch * L * E == 0) return nullptr;

  visionmamba::lanes::BiScanInputs<float> inputs;
  inputs.u = in[0];
  inputs.x_proj_out = in[1];
  inputs.dt_weight = in[2];
  inputs.A = in[3];
  inputs.D = in[4];
  inputs.z = in[5];
  inputs.bias = in[6];
  inputs.batch = batch;
  inputs.L = L;
  inputs.E = E;
  inputs.N = N;
  inputs.R = R;
  const auto weights = visionmamba::lanes::lane_weights(inputs);
  BiForwardArgs<float> args = visionmamba::lanes::contiguous_args(inputs, weights, static_cast<float*>(out));
  return g_api->KernelContext_ParallelFor(context, run_task, static_cast<size_t>(visionmamba::lanes::bi_forward_tasks(args)),
                                          0, &args);
}

// ----------------------------------------------------------------------------------- the OrtCustomOp table
void* ORT_API_CALL create_kernel(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*) { return &g_api; }
OrtStatusPtr ORT_API_CALL create_kernel_v2(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*, void** kernel) {
  *kernel = &g_api;  // stateless: every call reads its shapes anew
  return nullptr;
}
const char* ORT_API_CALL name(const OrtCustomOp*) { return "BiSelectiveScan"; }
const char* ORT_API_CALL provider(const OrtCustomOp*) { return "CPUExecutionProvider"; }
ONNXTensorElementDataType ORT_API_CALL float_type(const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
size_t ORT_API_CALL input_count(const OrtCustomOp*) { return kInputs; }
size_t ORT_API_CALL output_count(const OrtCustomOp*) { return 1; }
void ORT_API_CALL kernel_compute(void*, OrtKernelContext* context) {
  OrtStatusPtr status = compute(context);
  if (status != nullptr) g_api->ReleaseStatus(status);  // never called: the runtime uses KernelComputeV2
}
OrtStatusPtr ORT_API_CALL kernel_compute_v2(void*, OrtKernelContext* context) { return compute(context); }
void ORT_API_CALL kernel_destroy(void*) {}
OrtCustomOpInputOutputCharacteristic ORT_API_CALL required(const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; }
OrtMemType ORT_API_CALL memory_type(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int ORT_API_CALL one(const OrtCustomOp*) { return 1; }
int ORT_API_CALL zero(const OrtCustomOp*) { return 0; }
int ORT_API_CALL last_version(const OrtCustomOp*) { return INT_MAX; }
size_t ORT_API_CALL no_pairs(int** input_index, int** output_index) {
  *input_index = *output_index = nullptr;
  return 0;
}
void ORT_API_CALL release_pairs(int*, int*) {}

OrtCustomOp make_op() {
  OrtCustomOp op{};
  op.version = ORT_API_VERSION;
  op.CreateKernel = create_kernel;
  op.GetName = name;
  op.GetExecutionProviderType = provider;
  op.GetInputType = float_type;
  op.GetInputTypeCount = input_count;
  op.GetOutputType = float_type;
  op.GetOutputTypeCount = output_count;
  op.KernelCompute = kernel_compute;
  op.KernelDestroy = kernel_destroy;
  op.GetInputCharacteristic = required;
  op.GetOutputCharacteristic = required;
  op.GetInputMemoryType = memory_type;
  op.GetVariadicInputMinArity = one;
  op.GetVariadicInputHomogeneity = zero;
  op.GetVariadicOutputMinArity = one;
  op.GetVariadicOutputHomogeneity = zero;
  op.CreateKernelV2 = create_kernel_v2;
  op.KernelComputeV2 = kernel_compute_v2;
  op.InferOutputShapeFn = nullptr;  // the file carries the output's shape
  op.GetStartVersion = one;
  op.GetEndVersion = last_version;
  op.GetMayInplace = no_pairs;
  op.ReleaseMayInplace = release_pairs;
  op.GetAliasMap = no_pairs;
  op.ReleaseAliasMap = release_pairs;
  return op;
}

const OrtCustomOp kOp = make_op();

}  // namespace

extern "C" {

// Registers the domain "visionmamba" with BiSelectiveScan; the domain lives as long as the process (the
// sessions made with these options keep pointers to it).
#if defined(_WIN32)
__declspec(dllexport)
#else
__attribute__((visibility("default")))
#endif
OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* base) {
  const OrtApi* api = base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    std::fprintf(stderr, "visionmamba: this ONNX Runtime is older than 1.%d, which the library needs\n", ORT_API_VERSION);
    return nullptr;
  }
  g_api = api;
  OrtCustomOpDomain* domain = nullptr;
  RETURN_IF_ERROR(api->CreateCustomOpDomain("visionmamba", &domain));
  RETURN_IF_ERROR(api->CustomOpDomain_Add(domain, &kOp));
  return api->AddCustomOpDomain(options, domain);
}

}  // extern "C"

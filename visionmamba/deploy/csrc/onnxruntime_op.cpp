// ONNX Runtime's kernels of the nodes of domain "visionmamba" (version 1), behind the runtime's C API, on its
// own intra-op threads; the same C++ as the PyTorch ops' kernels, no torch here. Float32, inference:
//   BiSelectiveScan (the op bi_scan; scan_lanes.h): u (2, b, L, E), x_proj_out (2, b, L, R + 2N),
//     dt_weight (2, E, R), A (2, E, N), D (2, E), z (b, L, E), bias (2, E) -> y (b, L, E)
//     = (y_forward + y_backward) / 2.
//   ConvSiLU (the op conv_silu; conv_silu.h): x (b, L, E), weight (2, E, K), bias (2, E) -> u (2, b, L, E).
// ONNX Runtime loads the library with SessionOptions.register_custom_ops_library, which calls RegisterCustomOps.
#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <thread>
#include <vector>

#include "conv_silu.h"
#include "isa_guard.h"
#include "scan_lanes.h"
#include "third_party/onnxruntime/onnxruntime_c_api.h"

namespace {

using visionmamba::lanes::BiForwardArgs;

constexpr size_t kScanInputs = 7;
const char* const kScanNames[kScanInputs] = {"u", "x_proj_out", "dt_weight", "A", "D", "z", "bias"};
const size_t kScanRanks[kScanInputs] = {4, 4, 3, 3, 2, 3, 2};
constexpr size_t kConvInputs = 3;
const char* const kConvNames[kConvInputs] = {"x", "weight", "bias"};
const size_t kConvRanks[kConvInputs] = {3, 3, 2};

const OrtApi* g_api = nullptr;

// A failed check as the runtime's error (the node's name is added by the runtime).
OrtStatusPtr invalid(const char* op, const char* what, const char* name) {
  char message[256];
  std::snprintf(message, sizeof message, "visionmamba.%s: %s %s", op, name, what);
  return g_api->CreateStatus(ORT_INVALID_ARGUMENT, message);
}

// What one node's inputs must be.
struct Signature {
  const char* op;
  size_t count;
  const char* const* names;
  const size_t* ranks;
};
const Signature kScan{"BiSelectiveScan", kScanInputs, kScanNames, kScanRanks};
const Signature kConv{"ConvSiLU", kConvInputs, kConvNames, kConvRanks};

#define RETURN_IF_ERROR(expr)             \
  do {                                    \
    OrtStatusPtr status_ = (expr);        \
    if (status_ != nullptr) return status_; \
  } while (0)

// The float32 data and dimensions of input i of a node of signature sig, its rank checked.
OrtStatusPtr input(OrtKernelContext* context, const Signature& sig, size_t i, const float** data,
                   std::vector<int64_t>* dims) {
  const OrtValue* value = nullptr;
  RETURN_IF_ERROR(g_api->KernelContext_GetInput(context, i, &value));
  OrtTensorTypeAndShapeInfo* info = nullptr;
  RETURN_IF_ERROR(g_api->GetTensorTypeAndShape(value, &info));
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  size_t rank = 0;
  OrtStatusPtr status = g_api->GetTensorElementType(info, &type);
  if (status == nullptr) status = g_api->GetDimensionsCount(info, &rank);
  if (status == nullptr && rank == sig.ranks[i]) {
    dims->resize(rank);
    status = g_api->GetDimensions(info, dims->data(), rank);
  }
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  RETURN_IF_ERROR(status);
  if (type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) return invalid(sig.op, "must be float32", sig.names[i]);
  if (rank != sig.ranks[i]) return invalid(sig.op, "has the wrong rank", sig.names[i]);
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

OrtStatusPtr compute_scan(OrtKernelContext* context) {
  const float* in[kScanInputs];
  std::vector<int64_t> dims[kScanInputs];
  for (size_t i = 0; i < kScanInputs; ++i) RETURN_IF_ERROR(input(context, kScan, i, &in[i], &dims[i]));
  const int64_t batch = dims[0][1], L = dims[0][2], E = dims[0][3], R = dims[2][2], N = dims[3][2];
  const std::vector<int64_t> u_shape = {2, batch, L, E}, x_shape = {2, batch, L, R + 2 * N}, w_shape = {2, E, R},
                             a_shape = {2, E, N}, de_shape = {2, E}, z_shape = {batch, L, E};
  const std::vector<int64_t>* expected[kScanInputs] = {&u_shape, &x_shape, &w_shape, &a_shape, &de_shape, &z_shape, &de_shape};
  for (size_t i = 0; i < kScanInputs; ++i)
    if (dims[i] != *expected[i]) return invalid(kScan.op, "does not match the shapes of u, dt_weight and A", kScanNames[i]);

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
  // the session's thread count is not in the C API: the machine's is an upper bound (the choice only sizes tasks)
  args.task_blocks = visionmamba::lanes::task_blocks(batch, E, std::max(1u, std::thread::hardware_concurrency()));
  return g_api->KernelContext_ParallelFor(context, run_task, static_cast<size_t>(visionmamba::lanes::bi_forward_tasks(args)),
                                          0, &args);
}

// One conv task: its parameters and u (2, b, L, E).
struct ConvJob {
  visionmamba::conv::ConvParams<float> p;
  float* u;
};

void run_conv_row(void* data, size_t row) {
  const auto& job = *static_cast<const ConvJob*>(data);
  const auto& p = job.p;
  const int64_t r = static_cast<int64_t>(row), dir = r / (p.batch * p.L), b = (r / p.L) % p.batch, t = r % p.L;
  visionmamba::conv::conv_silu_row(p, dir, b, t, job.u + r * p.E, job.u + r * p.E);
}

OrtStatusPtr compute_conv(OrtKernelContext* context) {
  const float* in[kConvInputs];
  std::vector<int64_t> dims[kConvInputs];
  for (size_t i = 0; i < kConvInputs; ++i) RETURN_IF_ERROR(input(context, kConv, i, &in[i], &dims[i]));
  const int64_t batch = dims[0][0], L = dims[0][1], E = dims[0][2], K = dims[1][2];
  if (dims[1] != std::vector<int64_t>{2, E, K}) return invalid(kConv.op, "must be (2, E, K)", "weight");
  if (dims[2] != std::vector<int64_t>{2, E}) return invalid(kConv.op, "must be (2, E)", "bias");
  const std::vector<int64_t> u_shape = {2, batch, L, E};
  OrtValue* output = nullptr;
  RETURN_IF_ERROR(g_api->KernelContext_GetOutput(context, 0, u_shape.data(), u_shape.size(), &output));
  void* out = nullptr;
  RETURN_IF_ERROR(g_api->GetTensorMutableData(output, &out));
  if (batch * L * E == 0) return nullptr;
  const std::vector<float> taps = visionmamba::lanes::transposed_pairs(in[1], E, K);  // (2, K, E)
  ConvJob job;
  auto& p = job.p;
  p.x = in[0];
  p.sx_b = L * E;
  p.sx_t = E;
  p.w = taps.data();
  p.bias = in[2];
  p.batch = batch;
  p.L = L;
  p.E = E;
  p.K = K;
  job.u = static_cast<float*>(out);
  // rows in at most 256 batches: one scheduled task per row of E values would cost more than the row
  return g_api->KernelContext_ParallelFor(context, run_conv_row, static_cast<size_t>(2 * batch * L), 256, &job);
}

// ----------------------------------------------------------------------------------- the OrtCustomOp tables
// One node type: the runtime's table first (the callbacks get it back and cast), then what differs.
struct Op {
  OrtCustomOp table;
  const Signature* sig;
  OrtStatusPtr (*compute)(OrtKernelContext*);
};

const Op& op_of(const OrtCustomOp* table) { return *reinterpret_cast<const Op*>(table); }

void* ORT_API_CALL create_kernel(const OrtCustomOp* table, const OrtApi*, const OrtKernelInfo*) {
  return const_cast<Op*>(&op_of(table));  // stateless: every call reads its shapes anew
}
OrtStatusPtr ORT_API_CALL create_kernel_v2(const OrtCustomOp* table, const OrtApi*, const OrtKernelInfo*, void** kernel) {
  *kernel = const_cast<Op*>(&op_of(table));
  return nullptr;
}
const char* ORT_API_CALL name(const OrtCustomOp* table) { return op_of(table).sig->op; }
const char* ORT_API_CALL provider(const OrtCustomOp*) { return "CPUExecutionProvider"; }
ONNXTensorElementDataType ORT_API_CALL float_type(const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
size_t ORT_API_CALL input_count(const OrtCustomOp* table) { return op_of(table).sig->count; }
size_t ORT_API_CALL output_count(const OrtCustomOp*) { return 1; }
void ORT_API_CALL kernel_compute(void* kernel, OrtKernelContext* context) {
  OrtStatusPtr status = static_cast<Op*>(kernel)->compute(context);
  if (status != nullptr) g_api->ReleaseStatus(status);  // never called: the runtime uses KernelComputeV2
}
OrtStatusPtr ORT_API_CALL kernel_compute_v2(void* kernel, OrtKernelContext* context) {
  return static_cast<Op*>(kernel)->compute(context);
}
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

Op make_op(const Signature* sig, OrtStatusPtr (*compute)(OrtKernelContext*)) {
  Op op{};
  OrtCustomOp& t = op.table;
  t.version = ORT_API_VERSION;
  t.CreateKernel = create_kernel;
  t.GetName = name;
  t.GetExecutionProviderType = provider;
  t.GetInputType = float_type;
  t.GetInputTypeCount = input_count;
  t.GetOutputType = float_type;
  t.GetOutputTypeCount = output_count;
  t.KernelCompute = kernel_compute;
  t.KernelDestroy = kernel_destroy;
  t.GetInputCharacteristic = required;
  t.GetOutputCharacteristic = required;
  t.GetInputMemoryType = memory_type;
  t.GetVariadicInputMinArity = one;
  t.GetVariadicInputHomogeneity = zero;
  t.GetVariadicOutputMinArity = one;
  t.GetVariadicOutputHomogeneity = zero;
  t.CreateKernelV2 = create_kernel_v2;
  t.KernelComputeV2 = kernel_compute_v2;
  t.InferOutputShapeFn = nullptr;  // the file carries the output's shape
  t.GetStartVersion = one;
  t.GetEndVersion = last_version;
  t.GetMayInplace = no_pairs;
  t.ReleaseMayInplace = release_pairs;
  t.GetAliasMap = no_pairs;
  t.ReleaseAliasMap = release_pairs;
  op.sig = sig;
  op.compute = compute;
  return op;
}

// Registers the domain "visionmamba" with BiSelectiveScan and ConvSiLU; the domain lives as long as the process (the
// sessions made with these options keep pointers to it). The tables are made here, not at load: nothing of the
// library runs before the instruction-set check.
OrtStatus* register_domain(OrtSessionOptions* options, const OrtApi* api) {
  static const Op scan_op = make_op(&kScan, compute_scan);
  static const Op conv_op = make_op(&kConv, compute_conv);
  g_api = api;
  OrtCustomOpDomain* domain = nullptr;
  RETURN_IF_ERROR(api->CreateCustomOpDomain("visionmamba", &domain));
  RETURN_IF_ERROR(api->CustomOpDomain_Add(domain, &scan_op.table));
  RETURN_IF_ERROR(api->CustomOpDomain_Add(domain, &conv_op.table));
  return api->AddCustomOpDomain(options, domain);
}

}  // namespace

extern "C" {

// The library's entry point: refuses, with a message, a CPU that lacks an extension the library was compiled for.
#if defined(_WIN32)
__declspec(dllexport)
#else
__attribute__((visibility("default")))
#endif
VISIONMAMBA_BASELINE OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* base) {
  const OrtApi* api = base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    std::fprintf(stderr, "visionmamba: this ONNX Runtime is older than 1.%d, which the library needs\n", ORT_API_VERSION);
    return nullptr;
  }
  static char message[256];
  if (visionmamba::isa_mismatch(message, sizeof(message), "libvisionmamba_onnxruntime_portable")) {
    return api->CreateStatus(ORT_FAIL, message);
  }
  return register_domain(options, api);
}

}  // extern "C"

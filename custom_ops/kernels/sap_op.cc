// ONNX Runtime glue: attribute parsing and checks, the kernel object (call counter, key), and the one
// place where the operator is registered for each execution provider and element type.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <atomic>
#include <cmath>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <unistd.h>

#include "sap_kernels.h"

#define SAP_EXPORT extern "C" __attribute__((visibility("default")))

namespace onnx_sap {
namespace {

constexpr const char* kDomain = "onnx_sap";
constexpr const char* kOpType = "StochasticActivationPruning";

struct Attributes {
  std::string node;
  Mode mode = Mode::kMultinomial;
  float ratio = 1.0f;
  int64_t samples = 0;
  int64_t axis = 1;
  uint64_t seed = 0;
  uint64_t stream = 0;
};

[[noreturn]] void fail_attribute(const std::string& node, const char* name, const std::string& value,
                                 const char* expected) {
  std::ostringstream msg;
  msg << kOpType << " node '" << node << "': attribute '" << name << "' is " << value << "; " << expected;
  throw Ort::Exception(msg.str(), ORT_INVALID_ARGUMENT);
}

// Optional attributes: a missing one keeps its default (the C API reports "missing" as a status).
template <typename T>
bool try_attribute(const OrtApi& api, const OrtKernelInfo* info, const char* name, T* out);

template <>
bool try_attribute(const OrtApi& api, const OrtKernelInfo* info, const char* name, float* out) {
  OrtStatus* st = api.KernelInfoGetAttribute_float(info, name, out);
  if (st) api.ReleaseStatus(st);
  return st == nullptr;
}

template <>
bool try_attribute(const OrtApi& api, const OrtKernelInfo* info, const char* name, int64_t* out) {
  OrtStatus* st = api.KernelInfoGetAttribute_int64(info, name, out);
  if (st) api.ReleaseStatus(st);
  return st == nullptr;
}

template <>
bool try_attribute(const OrtApi& api, const OrtKernelInfo* info, const char* name, std::string* out) {
  size_t size = 0;
  OrtStatus* st = api.KernelInfoGetAttribute_string(info, name, nullptr, &size);
  if (st) {
    api.ReleaseStatus(st);
    return false;
  }
  std::string value(size, '\0');
  st = api.KernelInfoGetAttribute_string(info, name, value.data(), &size);
  if (st) {
    api.ReleaseStatus(st);
    return false;
  }
  value.resize(size > 0 ? size - 1 : 0);  // size counts the terminating NUL
  *out = value;
  return true;
}

std::string node_name(const OrtApi& api, const OrtKernelInfo* info) {
  size_t size = 0;
  OrtStatus* st = api.KernelInfo_GetNodeName(info, nullptr, &size);
  if (st) {
    api.ReleaseStatus(st);
    return "?";
  }
  std::string name(size, '\0');
  st = api.KernelInfo_GetNodeName(info, name.data(), &size);
  if (st) {
    api.ReleaseStatus(st);
    return "?";
  }
  name.resize(size > 0 ? size - 1 : 0);
  return name;
}

Attributes read_attributes(const OrtApi& api, const OrtKernelInfo* info) {
  Attributes a;
  a.node = node_name(api, info);
  std::string mode = "multinomial";
  try_attribute(api, info, "mode", &mode);
  if (mode == "multinomial") a.mode = Mode::kMultinomial;
  else if (mode == "bernoulli") a.mode = Mode::kBernoulli;
  else fail_attribute(a.node, "mode", "'" + mode + "'", "use 'multinomial' or 'bernoulli'");

  try_attribute(api, info, "ratio", &a.ratio);
  if (!(std::isfinite(a.ratio) && a.ratio > 0.0f))
    fail_attribute(a.node, "ratio", std::to_string(a.ratio), "it must be finite and > 0");

  try_attribute(api, info, "samples", &a.samples);
  if (a.samples < 0 || a.samples > kMaxSamples)
    fail_attribute(a.node, "samples", std::to_string(a.samples), "it must be in [0, 2^31 - 1] (0: use ratio)");

  try_attribute(api, info, "axis", &a.axis);
  if (a.axis < 0) fail_attribute(a.node, "axis", std::to_string(a.axis), "it must satisfy 0 <= axis < rank");

  int64_t v = 0;
  if (try_attribute(api, info, "seed", &v)) a.seed = static_cast<uint64_t>(v);
  v = 0;
  if (try_attribute(api, info, "stream", &v)) a.stream = static_cast<uint64_t>(v);
  return a;
}

// Fresh key from the operating system on every call when seed = 0 (the deployed defense).
uint64_t entropy_key() {
  thread_local std::random_device device;
  return (static_cast<uint64_t>(device()) << 32) | device();
}

DType dtype_of(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return DType::kFloat16;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return DType::kFloat64;
    default: return DType::kFloat32;
  }
}

void ort_parallel_for(void* runner, void (*fn)(void*, size_t), size_t total, void* ctx) {
  if (total <= 1) {
    for (size_t i = 0; i < total; ++i) fn(ctx, i);
    return;
  }
  static_cast<Ort::KernelContext*>(runner)->ParallelFor(fn, total, 0, ctx);
}

class SapKernel {
 public:
  SapKernel(Attributes attrs, bool cuda) : attrs_(std::move(attrs)), cuda_(cuda) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* raw) {
    try {
      Compute(raw);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
    }
  }

 private:
  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext ctx(raw);
    Ort::ConstValue input = ctx.GetInput(0);
    Ort::TensorTypeAndShapeInfo info = input.GetTensorTypeAndShapeInfo();
    const std::vector<int64_t> shape = info.GetShape();
    const int64_t rank = static_cast<int64_t>(shape.size());
    if (rank < 1) {
      throw Ort::Exception(std::string(kOpType) + " node '" + attrs_.node +
                               "': input X is a scalar; SAP needs rank >= 1",
                           ORT_INVALID_ARGUMENT);
    }
    if (attrs_.axis >= rank) {
      fail_attribute(attrs_.node, "axis", std::to_string(attrs_.axis),
                     ("it must satisfy 0 <= axis < rank, and X has rank " + std::to_string(rank)).c_str());
    }
    Ort::UnownedValue output = ctx.GetOutput(0, shape);
    // The call index is taken even for empty tensors so that call c always means the c-th run.
    const uint64_t call = calls_.fetch_add(1, std::memory_order_relaxed);
    // An empty tensor's other dims may be anything: multiply only once none is 0 (the product is
    // then the element count of a tensor that exists).
    for (int64_t d : shape)
      if (d == 0) return;
    int64_t examples = 1, m = 1;
    for (int64_t d = 0; d < rank; ++d) (d < attrs_.axis ? examples : m) *= shape[static_cast<size_t>(d)];

    const uint64_t k64 = attrs_.seed == 0 ? entropy_key() : derive_key(attrs_.seed, attrs_.stream);
    const StreamKey key{static_cast<uint32_t>(k64), static_cast<uint32_t>(k64 >> 32), static_cast<uint32_t>(call)};
    const uint64_t r = sample_count(attrs_.ratio, attrs_.samples, m);
    const DType dtype = dtype_of(info.GetElementType());
    const void* x = input.GetTensorRawData();
    void* y = output.GetTensorMutableRawData();

    if (!cuda_) {
      const Layout layout = layout_for(examples, m, r, kCpuChunk, kCpuVarChunk);
      check_host_scratch(layout);
      run_cpu(dtype, x, y, layout, key, &ort_parallel_for, &ctx);
      return;
    }
#ifdef ONNX_SAP_WITH_CUDA
    const Layout layout = layout_for(examples, m, r, kCudaChunk, kCudaVarChunk);
    Ort::ConstMemoryInfo where = input.GetTensorMemoryInfo();
    Ort::MemoryInfo device_mem("Cuda", OrtDeviceAllocator, where.GetDeviceId(), OrtMemTypeDefault);
    OrtAllocator* allocator = ctx.GetAllocator(*static_cast<const OrtMemoryInfo*>(device_mem));
    const size_t bytes = sizeof(double) * static_cast<size_t>(layout.scratch_doubles());
    // Stream-ordered reuse: freeing before the kernels finish is safe because the arena hands the
    // block out again only to work queued on the same stream.
    void* scratch = allocator->Alloc(allocator, bytes);
    const int rc = run_cuda(dtype, x, y, layout, key, static_cast<double*>(scratch), ctx.GetGPUComputeStream());
    allocator->Free(allocator, scratch);
    if (rc != 0) {
      throw Ort::Exception(std::string(kOpType) + " node '" + attrs_.node + "': CUDA launch failed with error " +
                               std::to_string(rc),
                           ORT_FAIL);
    }
#endif
  }

  [[noreturn]] void fail_scratch(const Layout& l, const std::string& why) const {
    std::ostringstream msg;
    msg << kOpType << " node '" << attrs_.node << "': " << l.examples << " examples of " << l.m << " elements with r = "
        << l.r << " samples " << why << "; lower 'samples' or 'ratio', or split the batch";
    throw Ort::Exception(msg.str(), ORT_INVALID_ARGUMENT);
  }

  Layout layout_for(int64_t examples, int64_t m, uint64_t r, int64_t chunk, int64_t var_chunk) const {
    Layout l;
    if (!make_layout(examples, m, r, attrs_.mode, chunk, var_chunk, l)) {
      l.examples = examples, l.m = m, l.r = r;
      fail_scratch(l, "need a scratch size beyond 64-bit range");
    }
    return l;
  }

  // The CPU scratch is written in full, so a size beyond physical memory can only end in the OOM
  // killer (or, without overcommit, std::bad_alloc): refuse it up front with a clear message.
  void check_host_scratch(const Layout& l) const {
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    if (pages <= 0 || page <= 0) return;
    const double physical = static_cast<double>(pages) * static_cast<double>(page);
    const double bytes = static_cast<double>(l.scratch_doubles()) * sizeof(double);
    if (bytes > physical) {
      std::ostringstream why;
      why.precision(3);
      why << "need " << bytes / (1 << 30) << " GiB of scratch, more than this machine's " << physical / (1 << 30)
          << " GiB of memory";
      fail_scratch(l, why.str());
    }
  }

  Attributes attrs_;
  bool cuda_;
  std::atomic<uint64_t> calls_{0};
};

template <ONNXTensorElementDataType kType, bool kCuda>
struct SapOp : Ort::CustomOpBase<SapOp<kType, kCuda>, SapKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new SapKernel(read_attributes(api, info), kCuda);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return api.CreateStatus(e.GetOrtErrorCode(), e.what());
    }
  }
  const char* GetName() const { return kOpType; }
  const char* GetExecutionProviderType() const { return kCuda ? "CUDAExecutionProvider" : "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetInputType(size_t) const { return kType; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return kType; }
};

// The registration table: one entry per (element type, execution provider).
SapOp<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, false> g_cpu_f32;
SapOp<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, false> g_cpu_f16;
SapOp<ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE, false> g_cpu_f64;
#ifdef ONNX_SAP_WITH_CUDA
SapOp<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, true> g_cuda_f32;
SapOp<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, true> g_cuda_f16;
SapOp<ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE, true> g_cuda_f64;
#endif

// Domains must outlive every session that uses them.
std::mutex g_domains_mutex;
std::vector<std::unique_ptr<Ort::CustomOpDomain>> g_domains;

}  // namespace
}  // namespace onnx_sap

SAP_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  using namespace onnx_sap;
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) return nullptr;  // cannot even report: the runtime is older than our headers
  Ort::InitApi(api);
  try {
    auto domain = std::make_unique<Ort::CustomOpDomain>(kDomain);
    domain->Add(&g_cpu_f32);
    domain->Add(&g_cpu_f16);
    domain->Add(&g_cpu_f64);
#ifdef ONNX_SAP_WITH_CUDA
    domain->Add(&g_cuda_f32);
    domain->Add(&g_cuda_f16);
    domain->Add(&g_cuda_f64);
#endif
    Ort::UnownedSessionOptions(options).Add(*domain);
    std::lock_guard<std::mutex> lock(g_domains_mutex);
    g_domains.push_back(std::move(domain));
    return nullptr;
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(e.GetOrtErrorCode(), e.what());
  }
}

// Whether this build holds the CUDA kernels (queried from Python with ctypes).
SAP_EXPORT int onnx_sap_has_cuda(void) {
#ifdef ONNX_SAP_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}

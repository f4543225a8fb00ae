// ONNX Runtime glue: attribute parsing and checks, the kernel object (call counter, key), and the one
// place where the operator is registered for each execution provider and element type.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <atomic>
#include <cmath>
#include <cstdlib>
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

// The C API has one getter per attribute type; a getter fails alike for a missing attribute and
// for one of another type. The getters, each returning a status (null: found, of this type):
OrtStatus* get_attribute(const OrtApi& api, const OrtKernelInfo* info, const char* name, float* out) {
  return api.KernelInfoGetAttribute_float(info, name, out);
}
OrtStatus* get_attribute(const OrtApi& api, const OrtKernelInfo* info, const char* name, int64_t* out) {
  return api.KernelInfoGetAttribute_int64(info, name, out);
}
OrtStatus* get_attribute(const OrtApi& api, const OrtKernelInfo* info, const char* name, std::string* out) {
  size_t size = 0;
  if (OrtStatus* st = api.KernelInfoGetAttribute_string(info, name, nullptr, &size)) return st;
  std::string value(size, '\0');
  if (OrtStatus* st = api.KernelInfoGetAttribute_string(info, name, value.data(), &size)) return st;
  value.resize(size > 0 ? size - 1 : 0);  // size counts the terminating NUL
  *out = value;
  return nullptr;
}

// Whether the getter found the attribute; its status is released either way.
template <typename T>
bool found(const OrtApi& api, const OrtKernelInfo* info, const char* name, T* out) {
  OrtStatus* st = get_attribute(api, info, name, out);
  if (st) api.ReleaseStatus(st);
  return st == nullptr;
}

std::string shown(float v) {
  std::ostringstream s;
  s.precision(9);
  s << v;
  return s.str();
}
std::string shown(int64_t v) { return std::to_string(v); }
std::string shown(const std::string& v) { return "'" + v + "'"; }

// The attribute `name` read as any type other than the one asked for, e.g. "2 (an int)"; empty when
// no getter finds it.
std::string read_as_other_type(const OrtApi& api, const OrtKernelInfo* info, const char* name) {
  float f;
  if (found(api, info, name, &f)) return shown(f) + " (a float)";
  int64_t i;
  if (found(api, info, name, &i)) return shown(i) + " (an int)";
  std::string str;
  if (found(api, info, name, &str)) return shown(str) + " (a string)";
  // The list getters succeed on any attribute that is present, counting its elements of their type.
  size_t floats = 0, ints = 0;
  OrtStatus* st_floats = api.KernelInfoGetAttributeArray_float(info, name, nullptr, &floats);
  OrtStatus* st_ints = api.KernelInfoGetAttributeArray_int64(info, name, nullptr, &ints);
  const bool present = st_floats == nullptr || st_ints == nullptr;
  if (st_floats) api.ReleaseStatus(st_floats);
  if (st_ints) api.ReleaseStatus(st_ints);
  if (st_floats == nullptr && floats > 0) return "a list of " + std::to_string(floats) + " floats";
  if (st_ints == nullptr && ints > 0) return "a list of " + std::to_string(ints) + " ints";
  return present ? "of another type" : "";
}

// Optional attributes: a missing one keeps its default (returns false); one of another type fails,
// naming the value (SPEC.md: nothing is silently replaced by its default).
template <typename T>
bool read_attribute(const OrtApi& api, const OrtKernelInfo* info, const std::string& node, const char* name,
                    const char* type, T* out) {
  OrtStatus* st = get_attribute(api, info, name, out);
  if (st == nullptr) return true;
  const std::string message = api.GetErrorMessage(st);
  api.ReleaseStatus(st);
  const std::string other = read_as_other_type(api, info, name);
  const std::string expected = std::string("it must be ") + type;
  if (!other.empty()) fail_attribute(node, name, other, expected.c_str());
  // Present, but of a type no getter reads (a tensor, a graph, a list of strings): ONNX Runtime says
  // the type does not match, where for a missing attribute it says there is none.
  if (message.find("match") != std::string::npos) fail_attribute(node, name, "of another type", expected.c_str());
  return false;
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
  read_attribute(api, info, a.node, "mode", "a string", &mode);
  if (mode == "multinomial") a.mode = Mode::kMultinomial;
  else if (mode == "bernoulli") a.mode = Mode::kBernoulli;
  else fail_attribute(a.node, "mode", shown(mode), "use 'multinomial' or 'bernoulli'");

  read_attribute(api, info, a.node, "ratio", "a float", &a.ratio);
  if (!(std::isfinite(a.ratio) && a.ratio > 0.0f)) fail_attribute(a.node, "ratio", shown(a.ratio), "it must be finite and > 0");

  read_attribute(api, info, a.node, "samples", "an int", &a.samples);
  if (a.samples < 0 || a.samples > kMaxSamples)
    fail_attribute(a.node, "samples", shown(a.samples), "it must be in [0, 2^31 - 1] (0: use ratio)");

  read_attribute(api, info, a.node, "axis", "an int", &a.axis);
  if (a.axis < 0) fail_attribute(a.node, "axis", shown(a.axis), "it must satisfy 0 <= axis < rank");

  int64_t v = 0;
  if (read_attribute(api, info, a.node, "seed", "an int", &v)) a.seed = static_cast<uint64_t>(v);
  v = 0;
  if (read_attribute(api, info, a.node, "stream", "an int", &v)) a.stream = static_cast<uint64_t>(v);
  return a;
}

// The status for the exception being handled: only statuses may cross the C ABI into ONNX Runtime,
// so every entry point ends in catch (...) { return exception_status(...); }. Builds no string
// itself (an allocation could throw again while handling std::bad_alloc).
OrtStatus* exception_status(const OrtApi& api) noexcept {
  try {
    throw;
  } catch (const Ort::Exception& e) {
    return api.CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::bad_alloc&) {
    return api.CreateStatus(ORT_FAIL, "StochasticActivationPruning: out of memory");
  } catch (const std::exception& e) {
    return api.CreateStatus(ORT_FAIL, e.what());
  } catch (...) {
    return api.CreateStatus(ORT_FAIL, "StochasticActivationPruning: unknown C++ exception");
  }
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

// The CPU level of the most recent CPU call (-1 before any), and whether it wrote its output over its
// input (-1 before any), so that tests can prove which level ran and that ONNX Runtime reused the buffer.
std::atomic<int> g_last_cpu_isa{-1};
std::atomic<int> g_last_cpu_in_place{-1};

Isa cpu_isa_or_throw(const std::string& node) {
  Isa isa = Isa::kScalar;
  if (const char* error = choose_isa(&isa)) {
    throw Ort::Exception(std::string(kOpType) + " node '" + node + "': " + error, ORT_INVALID_ARGUMENT);
  }
  return isa;
}

class SapKernel {
 public:
  // The CPU level is fixed when the session creates the kernel (ONNX_SAP_ISA is read then).
  SapKernel(Attributes attrs, bool cuda)
      : attrs_(std::move(attrs)), cuda_(cuda), isa_(cuda ? Isa::kScalar : cpu_isa_or_throw(attrs_.node)) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* raw) {
    try {
      Compute(raw);
      return nullptr;
    } catch (...) {
      return exception_status(Ort::GetApi());
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
      const Layout layout = layout_for(examples, m, r, cpu_chunk(examples, m), kCpuVarChunk);
      check_host_scratch(layout);
      // ONNX Runtime may hand us the input's buffer as the output (MayInplace, below): every phase
      // task reads its elements before writing them (the multinomial fix-up for a sample past the
      // last boundary uses the value it kept from that read), and no task reads another's elements.
      const bool in_place = x == y;
      run_cpu(isa_, dtype, x, y, layout, key, Pool{&ort_parallel_for, &ctx});
      g_last_cpu_isa.store(static_cast<int>(isa_), std::memory_order_relaxed);
      g_last_cpu_in_place.store(in_place ? 1 : 0, std::memory_order_relaxed);
      return;
    }
#ifdef ONNX_SAP_WITH_CUDA
    const Layout layout = layout_for(examples, m, r, kCudaChunk, kCudaVarChunk);
    // Scratch comes from CUDA's stream-ordered allocator (sap_cuda.cu), not ctx.GetAllocator: it is
    // freed behind the kernels on this stream, so no Run() on any stream can reuse it early.
    const int rc = run_cuda(dtype, x, y, layout, key, ctx.GetGPUComputeStream());
    if (rc != 0) {
      throw Ort::Exception(std::string(kOpType) + " node '" + attrs_.node + "': CUDA error " + std::to_string(rc) +
                               " (" + cuda_error_string(rc) + ") for " + std::to_string(layout.scratch_doubles() * 8) +
                               " bytes of scratch and the kernels",
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
  Isa isa_;
  std::atomic<uint64_t> calls_{0};
};

template <ONNXTensorElementDataType kType, bool kCuda>
struct SapOp : Ort::CustomOpBase<SapOp<kType, kCuda>, SapKernel, true> {
#if ORT_API_VERSION >= 18
  // Y may reuse X's buffer on the CPU (ONNX Runtime decides: only when X has no other consumer and is
  // not a graph input or output). Inside a model this saves a fresh output buffer per call, and the
  // cache misses of writing it. ONNX Runtime reads these fields from C API version 18 on, and
  // RegisterCustomOps sets the version to the runtime's, so 1.17 never sees them.
  SapOp() {
    OrtCustomOp::InferOutputShapeFn = &infer_output_shape;
    if (!kCuda) {
      OrtCustomOp::GetMayInplace = &may_in_place;
      OrtCustomOp::ReleaseMayInplace = &release_may_in_place;
    }
  }
  // Input 0 -> output 0. Returns 0 pairs (no in-place) if the arrays cannot be allocated.
  static size_t ORT_API_CALL may_in_place(int** input_index, int** output_index) {
    *input_index = static_cast<int*>(std::malloc(sizeof(int)));
    *output_index = static_cast<int*>(std::malloc(sizeof(int)));
    if (*input_index == nullptr || *output_index == nullptr) {
      release_may_in_place(*input_index, *output_index);
      *input_index = *output_index = nullptr;
      return 0;
    }
    **input_index = 0;
    **output_index = 0;
    return 1;
  }
  static void ORT_API_CALL release_may_in_place(int* input_index, int* output_index) {
    std::free(input_index);
    std::free(output_index);
  }
#endif

  // Y's shape is X's (ONNX Runtime reads this from C API version 17 on). Without it Y's shape is
  // unknown, and ONNX Runtime reuses a buffer only between tensors known to be of the same size.
  // An input of unknown rank, or with an unknown dim that has no name, leaves Y's shape unknown:
  // ONNX Runtime would store such a dim as the value -1, a wrong shape that later nodes' shape
  // inference rejects (Ort::ShapeInferContext refuses them for the same reason).
  static OrtStatusPtr ORT_API_CALL infer_output_shape(const OrtCustomOp*, OrtShapeInferContext* ctx) {
    const OrtApi& api = Ort::GetApi();
    OrtTensorTypeAndShapeInfo* in = nullptr;
    OrtTensorTypeAndShapeInfo* out = nullptr;
    OrtStatus* st = nullptr;
    try {
      st = api.ShapeInferContext_GetInputTypeShape(ctx, 0, &in);
      size_t rank = 0;
      if (st == nullptr) st = api.GetDimensionsCount(in, &rank);
      if (st == nullptr && rank > 0) {
        std::vector<int64_t> dims(rank);
        std::vector<const char*> names(rank, nullptr);
        st = api.GetDimensions(in, dims.data(), rank);
        if (st == nullptr) st = api.GetSymbolicDimensions(in, names.data(), rank);
        bool unnamed_unknown = false;
        for (size_t i = 0; i < rank; ++i) unnamed_unknown |= dims[i] < 0 && (names[i] == nullptr || *names[i] == '\0');
        if (st == nullptr && unnamed_unknown) return nullptr;  // see above
        if (st == nullptr) st = api.CreateTensorTypeAndShapeInfo(&out);
        // The input's type, not kType: ONNX Runtime runs one op's function for all types of a name.
        ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
        if (st == nullptr) st = api.GetTensorElementType(in, &type);
        if (st == nullptr) st = api.SetTensorElementType(out, type);
        if (st == nullptr) st = api.SetDimensions(out, dims.data(), rank);
        if (st == nullptr) st = api.SetSymbolicDimensions(out, names.data(), rank);
        if (st == nullptr) st = api.ShapeInferContext_SetOutputTypeShape(ctx, 0, out);
      }
    } catch (...) {
      st = exception_status(api);
    }
    if (out) api.ReleaseTensorTypeAndShapeInfo(out);
    return st;  // `in` belongs to the context
  }
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new SapKernel(read_attributes(api, info), kCuda);
      return nullptr;
    } catch (...) {
      return exception_status(api);
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

std::vector<OrtCustomOp*> all_ops() {
  return {&g_cpu_f32, &g_cpu_f16, &g_cpu_f64,
#ifdef ONNX_SAP_WITH_CUDA
          &g_cuda_f32, &g_cuda_f16, &g_cuda_f64,
#endif
  };
}

// Domains must outlive every session that uses them.
std::mutex g_domains_mutex;
std::vector<std::unique_ptr<Ort::CustomOpDomain>> g_domains;

// The oldest ONNX Runtime C API this library can use: KernelContext_ParallelFor (1.17) is the newest
// function it calls, and kernels report errors through CreateKernelV2/KernelComputeV2 (1.16).
constexpr uint32_t kMinApiVersion = 17;

// The highest C API version, up to our headers' ORT_API_VERSION, that the loaded runtime serves
// (GetApi returns null for versions it does not know); 0 when it serves none from the minimum on.
// Probed upwards: a runtime prints a line for each version it refuses, so at most one is asked for.
uint32_t negotiated_api_version(const OrtApiBase* base) {
  uint32_t version = 0;
  for (uint32_t v = kMinApiVersion; v <= ORT_API_VERSION && base->GetApi(v) != nullptr; ++v) version = v;
  return version;
}

}  // namespace
}  // namespace onnx_sap

SAP_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  using namespace onnx_sap;
  const uint32_t version = negotiated_api_version(api_base);
  if (version == 0) {
    // Version 1 is served by every runtime: enough to report the problem.
    const OrtApi* v1 = api_base->GetApi(1);
    if (v1 == nullptr) return nullptr;  // not an ONNX Runtime: nothing to report with
    std::string msg;
    try {
      msg = std::string("the onnx_sap op library needs onnxruntime 1.") + std::to_string(kMinApiVersion) +
            " or newer (C API version " + std::to_string(kMinApiVersion) + ".." + std::to_string(ORT_API_VERSION) +
            "), but this onnxruntime is " + api_base->GetVersionString() + "; upgrade it (pip install -U onnxruntime)";
    } catch (...) {
      return v1->CreateStatus(ORT_FAIL, "the onnx_sap op library needs a newer onnxruntime");
    }
    return v1->CreateStatus(ORT_FAIL, msg.c_str());
  }
  const OrtApi* api = api_base->GetApi(version);
  try {
    std::lock_guard<std::mutex> lock(g_domains_mutex);
    Ort::InitApi(api);
    auto domain = std::make_unique<Ort::CustomOpDomain>(kDomain);
    for (OrtCustomOp* op : all_ops()) {
      if (op->version != version) op->version = version;  // the runtime reads the fields of this version only
      domain->Add(op);
    }
    Ort::UnownedSessionOptions(options).Add(*domain);
    g_domains.push_back(std::move(domain));
    return nullptr;
  } catch (...) {
    return exception_status(*api);
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

// CPU instruction-set levels (queried from Python with ctypes): whether level i (0 scalar, 1 avx2,
// 2 avx512) can run here, its name, and the level of the most recent CPU call (-1 before any).
SAP_EXPORT int onnx_sap_cpu_isa_available(int level) {
  using namespace onnx_sap;
  return level >= 0 && level < kIsaLevels && isa_available(static_cast<Isa>(level)) ? 1 : 0;
}

SAP_EXPORT const char* onnx_sap_cpu_isa_name(int level) {
  using namespace onnx_sap;
  return level >= 0 && level < kIsaLevels ? isa_name(static_cast<Isa>(level)) : "";
}

SAP_EXPORT int onnx_sap_cpu_isa_last(void) { return onnx_sap::g_last_cpu_isa.load(std::memory_order_relaxed); }

// Whether the most recent CPU call wrote its output over its input (1), into a buffer of its own (0),
// or -1 before any (queried from Python with ctypes, for the tests).
SAP_EXPORT int onnx_sap_cpu_in_place_last(void) {
  return onnx_sap::g_last_cpu_in_place.load(std::memory_order_relaxed);
}

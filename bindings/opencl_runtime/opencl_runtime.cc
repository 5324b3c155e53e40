/*
 * qwen35_mobile: an OpenCL device runtime add-on for the apache-tvm 0.27 wheel.
 *
 * The wheel ships CPU and CUDA runtimes only.  This file is the project's own
 * OpenCL runtime, written against the headers the wheels ship (tvm/include,
 * tvm_ffi/include), so that libraries built for an OpenCL target (preset
 * `android-pocl`: android's OpenCL kernels with x86_64 host code) run on any
 * OpenCL implementation, PoCL in particular.  It registers:
 *
 *   device_api.opencl                     the DeviceAPI of kDLOpenCL (device type 4)
 *   ffi.Module.load_from_bytes.opencl     the loader of the device module that TVM's
 *                                         OpenCL codegen serializes into a library
 *   ffi.Module.create.opencl              the factory TVM's OpenCL codegen calls when it is
 *                                         registered (else it makes a module that cannot run),
 *                                         so that tvm.compile(...) output runs without export
 *
 * Memory: a tensor's data pointer is the cl_mem handle itself (no wrapper).
 * Byte offsets of DLTensors are honoured by the copies; kernels get the cl_mem
 * as their buffer argument (TVM's host code passes DLTensor::data and any
 * element offset as a separate scalar).
 *
 * Serialized module (TVM 0.27, DeviceSourceModule / OpenCLModuleNode::SaveToBytes),
 * all integers little endian:
 *   string fmt ("cl"); map<string, FunctionInfo> fmap; string source
 *   string            = u64 length + bytes
 *   map               = u64 count + (key string, value) pairs
 *   FunctionInfo      = string name, array<DLDataType> arg_types (u64 n + n x {u8 code,
 *                       u8 bits, u16 lanes}), array<string> launch_param_tags,
 *                       array<ArgExtraTags> (u64 n + n x i32)
 * The source holds every kernel, each after a line "// Function: <name>".
 *
 * Calling convention of a kernel function (as TVM's ThreadAxisConfig): the
 * kernel arguments (arg_types), then one integer per launch_param_tag
 * (blockIdx.* = number of work groups, threadIdx.* = work-group size,
 * tirx.use_dyn_shared_memory = dynamic local memory bytes).
 *
 * Built by scripts/setup_emulators.d/opencl.sh into .emulators/lib/libtvm_runtime_opencl.so;
 * loaded by qwen35_mobile.bindings.opencl_runtime.load_opencl_runtime().
 */
#ifndef CL_TARGET_OPENCL_VERSION
#define CL_TARGET_OPENCL_VERSION 120
#endif
#include <CL/cl.h>
#include <dlpack/dlpack.h>
#include <tvm/ffi/any.h>
#include <tvm/ffi/cast.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/memory.h>
#include <tvm/ffi/reflection/accessor.h>
#include <tvm/ffi/reflection/registry.h>
#include <tvm/ffi/string.h>
#include <tvm/runtime/device_api.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

namespace qwen35_opencl {

using tvm::Device;
using tvm::runtime::DeviceAPI;
using tvm::runtime::DeviceAttrKind;
namespace ffi = tvm::ffi;

const char* CLErrorString(cl_int err) {
  switch (err) {
    case CL_SUCCESS: return "CL_SUCCESS";
    case CL_DEVICE_NOT_FOUND: return "CL_DEVICE_NOT_FOUND";
    case CL_DEVICE_NOT_AVAILABLE: return "CL_DEVICE_NOT_AVAILABLE";
    case CL_COMPILER_NOT_AVAILABLE: return "CL_COMPILER_NOT_AVAILABLE";
    case CL_MEM_OBJECT_ALLOCATION_FAILURE: return "CL_MEM_OBJECT_ALLOCATION_FAILURE";
    case CL_OUT_OF_RESOURCES: return "CL_OUT_OF_RESOURCES";
    case CL_OUT_OF_HOST_MEMORY: return "CL_OUT_OF_HOST_MEMORY";
    case CL_BUILD_PROGRAM_FAILURE: return "CL_BUILD_PROGRAM_FAILURE";
    case CL_INVALID_VALUE: return "CL_INVALID_VALUE";
    case CL_INVALID_DEVICE: return "CL_INVALID_DEVICE";
    case CL_INVALID_CONTEXT: return "CL_INVALID_CONTEXT";
    case CL_INVALID_COMMAND_QUEUE: return "CL_INVALID_COMMAND_QUEUE";
    case CL_INVALID_MEM_OBJECT: return "CL_INVALID_MEM_OBJECT";
    case CL_INVALID_BUFFER_SIZE: return "CL_INVALID_BUFFER_SIZE";
    case CL_INVALID_PROGRAM: return "CL_INVALID_PROGRAM";
    case CL_INVALID_PROGRAM_EXECUTABLE: return "CL_INVALID_PROGRAM_EXECUTABLE";
    case CL_INVALID_KERNEL_NAME: return "CL_INVALID_KERNEL_NAME";
    case CL_INVALID_KERNEL: return "CL_INVALID_KERNEL";
    case CL_INVALID_ARG_INDEX: return "CL_INVALID_ARG_INDEX";
    case CL_INVALID_ARG_VALUE: return "CL_INVALID_ARG_VALUE";
    case CL_INVALID_ARG_SIZE: return "CL_INVALID_ARG_SIZE";
    case CL_INVALID_KERNEL_ARGS: return "CL_INVALID_KERNEL_ARGS";
    case CL_INVALID_WORK_DIMENSION: return "CL_INVALID_WORK_DIMENSION";
    case CL_INVALID_WORK_GROUP_SIZE: return "CL_INVALID_WORK_GROUP_SIZE";
    case CL_INVALID_WORK_ITEM_SIZE: return "CL_INVALID_WORK_ITEM_SIZE";
    case CL_INVALID_GLOBAL_WORK_SIZE: return "CL_INVALID_GLOBAL_WORK_SIZE";
    case CL_INVALID_PLATFORM: return "CL_INVALID_PLATFORM";
    default: return "CL_ERROR";
  }
}

#define QCL_CALL(expr)                                                                    \
  do {                                                                                    \
    cl_int qcl_err_ = (expr);                                                             \
    if (qcl_err_ != CL_SUCCESS) {                                                         \
      TVM_FFI_THROW(RuntimeError) << "OpenCL error " << qcl_err_ << " ("                  \
                                  << CLErrorString(qcl_err_) << ") in " #expr;            \
    }                                                                                     \
  } while (0)

// ---------------------------------------------------------------------------
// The devices: every GPU of every platform, or every device when there is no
// GPU (PoCL's CPU device).  One context and one in-order queue per device.
// ---------------------------------------------------------------------------
struct CLDevice {
  cl_platform_id platform{nullptr};
  cl_device_id id{nullptr};
  cl_context context{nullptr};
  cl_command_queue queue{nullptr};
};

class Workspace {
 public:
  static Workspace* Global() {
    static Workspace* inst = new Workspace();  // never destroyed: outlives every module
    return inst;
  }

  void Init() {
    std::call_once(init_flag_, [this]() { this->InitDevices(); });
  }

  size_t NumDevices() {
    Init();
    return devices_.size();
  }

  CLDevice& Get(int device_id) {
    Init();
    if (device_id < 0 || static_cast<size_t>(device_id) >= devices_.size()) {
      TVM_FFI_THROW(RuntimeError) << "opencl:" << device_id << " does not exist: "
                                  << devices_.size() << " OpenCL device(s) found"
                                  << (devices_.empty() ? " (is an OpenCL ICD such as PoCL installed?)"
                                                       : "");
    }
    return devices_[device_id];
  }

  cl_command_queue Queue(int device_id) { return Get(device_id).queue; }

 private:
  void InitDevices() {
    cl_uint nplat = 0;
    if (clGetPlatformIDs(0, nullptr, &nplat) != CL_SUCCESS || nplat == 0) return;
    std::vector<cl_platform_id> platforms(nplat);
    if (clGetPlatformIDs(nplat, platforms.data(), nullptr) != CL_SUCCESS) return;
    for (cl_device_type want : {static_cast<cl_device_type>(CL_DEVICE_TYPE_GPU),
                                static_cast<cl_device_type>(CL_DEVICE_TYPE_ALL)}) {
      for (cl_platform_id p : platforms) {
        cl_uint ndev = 0;
        if (clGetDeviceIDs(p, want, 0, nullptr, &ndev) != CL_SUCCESS || ndev == 0) continue;
        std::vector<cl_device_id> ids(ndev);
        if (clGetDeviceIDs(p, want, ndev, ids.data(), nullptr) != CL_SUCCESS) continue;
        for (cl_device_id id : ids) {
          cl_int err;
          cl_context_properties props[] = {CL_CONTEXT_PLATFORM,
                                           reinterpret_cast<cl_context_properties>(p), 0};
          cl_context ctx = clCreateContext(props, 1, &id, nullptr, nullptr, &err);
          if (err != CL_SUCCESS) continue;
          cl_command_queue q = clCreateCommandQueue(ctx, id, 0, &err);
          if (err != CL_SUCCESS) {
            clReleaseContext(ctx);
            continue;
          }
          devices_.push_back(CLDevice{p, id, ctx, q});
        }
      }
      if (!devices_.empty()) return;
    }
  }

  std::once_flag init_flag_;
  std::vector<CLDevice> devices_;
};

std::string DeviceInfoString(cl_device_id dev, cl_device_info key) {
  size_t n = 0;
  if (clGetDeviceInfo(dev, key, 0, nullptr, &n) != CL_SUCCESS || n == 0) return "";
  std::string s(n, '\0');
  clGetDeviceInfo(dev, key, n, &s[0], nullptr);
  while (!s.empty() && s.back() == '\0') s.pop_back();
  return s;
}

template <typename T>
T DeviceInfo(cl_device_id dev, cl_device_info key) {
  T v{};
  clGetDeviceInfo(dev, key, sizeof(T), &v, nullptr);
  return v;
}

// ---------------------------------------------------------------------------
// DeviceAPI
// ---------------------------------------------------------------------------
thread_local int current_device = 0;

class OpenCLDeviceAPI final : public DeviceAPI {
 public:
  static OpenCLDeviceAPI* Global() {
    static OpenCLDeviceAPI* inst = new OpenCLDeviceAPI();
    return inst;
  }

  void SetDevice(Device dev) final { current_device = dev.device_id; }

  void GetAttr(Device dev, DeviceAttrKind kind, ffi::Any* rv) final {
    Workspace* w = Workspace::Global();
    if (kind == tvm::runtime::kExist) {
      *rv = static_cast<int64_t>(dev.device_id >= 0 &&
                                 static_cast<size_t>(dev.device_id) < w->NumDevices());
      return;
    }
    if (dev.device_id < 0 || static_cast<size_t>(dev.device_id) >= w->NumDevices()) return;
    cl_device_id id = w->Get(dev.device_id).id;
    switch (kind) {
      case tvm::runtime::kMaxThreadsPerBlock:
        *rv = static_cast<int64_t>(DeviceInfo<size_t>(id, CL_DEVICE_MAX_WORK_GROUP_SIZE));
        break;
      case tvm::runtime::kWarpSize:
        *rv = static_cast<int64_t>(1);  // no sub-group (warp) semantics are relied on
        break;
      case tvm::runtime::kMaxSharedMemoryPerBlock:
        *rv = static_cast<int64_t>(DeviceInfo<cl_ulong>(id, CL_DEVICE_LOCAL_MEM_SIZE));
        break;
      case tvm::runtime::kComputeVersion:
        *rv = ffi::String(DeviceInfoString(id, CL_DEVICE_VERSION));
        break;
      case tvm::runtime::kDeviceName:
        *rv = ffi::String(DeviceInfoString(id, CL_DEVICE_NAME));
        break;
      case tvm::runtime::kMaxClockRate:
        *rv = static_cast<int64_t>(DeviceInfo<cl_uint>(id, CL_DEVICE_MAX_CLOCK_FREQUENCY));
        break;
      case tvm::runtime::kMultiProcessorCount:
        *rv = static_cast<int64_t>(DeviceInfo<cl_uint>(id, CL_DEVICE_MAX_COMPUTE_UNITS));
        break;
      case tvm::runtime::kMaxThreadDimensions: {
        size_t dims[3] = {0, 0, 0};
        clGetDeviceInfo(id, CL_DEVICE_MAX_WORK_ITEM_SIZES, sizeof(dims), dims, nullptr);
        std::ostringstream os;
        os << "[" << dims[0] << ", " << dims[1] << ", " << dims[2] << "]";
        *rv = ffi::String(os.str());
        break;
      }
      case tvm::runtime::kMaxRegistersPerBlock:
      case tvm::runtime::kGcnArch:
      case tvm::runtime::kImagePitchAlignment:
        break;
      case tvm::runtime::kApiVersion:
        *rv = static_cast<int64_t>(CL_TARGET_OPENCL_VERSION);
        break;
      case tvm::runtime::kDriverVersion:
        *rv = ffi::String(DeviceInfoString(id, CL_DRIVER_VERSION));
        break;
      case tvm::runtime::kL2CacheSizeBytes:
        *rv = static_cast<int64_t>(DeviceInfo<cl_ulong>(id, CL_DEVICE_GLOBAL_MEM_CACHE_SIZE));
        break;
      case tvm::runtime::kTotalGlobalMemory:
        *rv = static_cast<int64_t>(DeviceInfo<cl_ulong>(id, CL_DEVICE_GLOBAL_MEM_SIZE));
        break;
      case tvm::runtime::kAvailableGlobalMemory:
        break;  // OpenCL 1.2 has no query for it
      default:
        break;
    }
  }

  void* AllocDataSpace(Device dev, size_t nbytes, size_t alignment, DLDataType type_hint) final {
    CLDevice& d = Workspace::Global()->Get(dev.device_id);
    cl_int err;
    // A zero-byte buffer is invalid in OpenCL; keep the pointer non-null.
    cl_mem mem = clCreateBuffer(d.context, CL_MEM_READ_WRITE, nbytes == 0 ? 1 : nbytes, nullptr, &err);
    if (err != CL_SUCCESS) {
      TVM_FFI_THROW(RuntimeError) << "OpenCL: cannot allocate " << nbytes << " bytes on opencl:"
                                  << dev.device_id << ": " << CLErrorString(err);
    }
    return static_cast<void*>(mem);
  }

  void* AllocDataSpace(Device dev, int ndim, const int64_t* shape, DLDataType dtype,
                       ffi::Optional<ffi::String> mem_scope = std::nullopt) final {
    if (mem_scope.has_value() && !mem_scope.value().empty() && mem_scope.value() != "global") {
      TVM_FFI_THROW(RuntimeError) << "OpenCL runtime add-on: memory scope '" << mem_scope.value()
                                  << "' (textures) is not supported, only global buffers";
    }
    return DeviceAPI::AllocDataSpace(dev, ndim, shape, dtype, mem_scope);
  }

  void FreeDataSpace(Device dev, void* ptr) final {
    if (ptr == nullptr) return;
    // Kernels that still use the buffer keep it alive (OpenCL reference counts),
    // but finish the queue so that the memory is really reusable.
    clFinish(Workspace::Global()->Queue(dev.device_id));
    QCL_CALL(clReleaseMemObject(static_cast<cl_mem>(ptr)));
  }

  void StreamSync(Device dev, TVMStreamHandle stream) final {
    QCL_CALL(clFinish(Workspace::Global()->Queue(dev.device_id)));
  }

  TVMStreamHandle CreateStream(Device dev) final { return nullptr; }
  void FreeStream(Device dev, TVMStreamHandle stream) final {}
  void SetStream(Device dev, TVMStreamHandle stream) final {}
  TVMStreamHandle GetCurrentStream(Device dev) final { return nullptr; }
  void SyncStreamFromTo(Device dev, TVMStreamHandle src, TVMStreamHandle dst) final {}

 protected:
  void CopyDataFromTo(const void* from, size_t from_offset, void* to, size_t to_offset,
                      size_t size, Device dev_from, Device dev_to, DLDataType type_hint,
                      TVMStreamHandle stream) final {
    if (size == 0) return;
    const bool from_cl = dev_from.device_type == kDLOpenCL;
    const bool to_cl = dev_to.device_type == kDLOpenCL;
    const bool from_host = dev_from.device_type == kDLCPU || dev_from.device_type == kDLCUDAHost;
    const bool to_host = dev_to.device_type == kDLCPU || dev_to.device_type == kDLCUDAHost;
    Workspace* w = Workspace::Global();
    if (from_cl && to_cl) {
      CLDevice& a = w->Get(dev_from.device_id);
      CLDevice& b = w->Get(dev_to.device_id);
      if (a.context == b.context) {
        QCL_CALL(clEnqueueCopyBuffer(a.queue, static_cast<cl_mem>(const_cast<void*>(from)),
                                     static_cast<cl_mem>(to), from_offset, to_offset, size, 0,
                                     nullptr, nullptr));
      } else {  // different contexts: through the host
        std::vector<char> tmp(size);
        QCL_CALL(clEnqueueReadBuffer(a.queue, static_cast<cl_mem>(const_cast<void*>(from)), CL_TRUE,
                                     from_offset, size, tmp.data(), 0, nullptr, nullptr));
        QCL_CALL(clEnqueueWriteBuffer(b.queue, static_cast<cl_mem>(to), CL_TRUE, to_offset, size,
                                      tmp.data(), 0, nullptr, nullptr));
      }
    } else if (from_cl && to_host) {
      CLDevice& a = w->Get(dev_from.device_id);
      QCL_CALL(clEnqueueReadBuffer(a.queue, static_cast<cl_mem>(const_cast<void*>(from)), CL_TRUE,
                                   from_offset, size, static_cast<char*>(to) + to_offset, 0,
                                   nullptr, nullptr));
    } else if (from_host && to_cl) {
      CLDevice& b = w->Get(dev_to.device_id);
      // Blocking: the host memory may be gone as soon as we return.
      QCL_CALL(clEnqueueWriteBuffer(b.queue, static_cast<cl_mem>(to), CL_TRUE, to_offset, size,
                                    static_cast<const char*>(from) + from_offset, 0, nullptr,
                                    nullptr));
    } else {
      TVM_FFI_THROW(RuntimeError) << "OpenCL runtime add-on: cannot copy from device type "
                                  << static_cast<int>(dev_from.device_type) << " to device type "
                                  << static_cast<int>(dev_to.device_type);
    }
  }
};

// ---------------------------------------------------------------------------
// Reading the serialized module
// ---------------------------------------------------------------------------
class Reader {
 public:
  Reader(const char* data, size_t size) : p_(data), end_(data + size) {}
  template <typename T>
  T Pod(const char* what) {
    T v;
    Need(sizeof(T), what);
    std::memcpy(&v, p_, sizeof(T));
    p_ += sizeof(T);
    return v;
  }
  std::string Str(const char* what) {
    uint64_t n = Pod<uint64_t>(what);
    Need(n, what);
    std::string s(p_, p_ + n);
    p_ += n;
    return s;
  }

 private:
  void Need(uint64_t n, const char* what) {
    if (n > static_cast<uint64_t>(end_ - p_)) {
      TVM_FFI_THROW(RuntimeError) << "OpenCL module: truncated or unknown format while reading "
                                  << what;
    }
  }
  const char* p_;
  const char* end_;
};

struct FunctionInfo {
  std::string name;
  std::vector<DLDataType> arg_types;
  std::vector<std::string> launch_param_tags;
};

// Launch parameters: for each tag, where its value goes.
struct LaunchConfig {
  enum Kind { kBlock, kThread, kDynShared, kFlag };
  struct Param {
    Kind kind;
    int dim;
  };
  std::vector<Param> params;  // one per tag that consumes an argument
  int work_dim = 1;

  void Init(const std::vector<std::string>& tags) {
    int max_dim = -1;
    for (const std::string& tag : tags) {
      if (tag.rfind("blockIdx.", 0) == 0 || tag.rfind("threadIdx.", 0) == 0) {
        bool block = tag[0] == 'b';
        char axis = tag.back();
        int dim = axis == 'x' ? 0 : axis == 'y' ? 1 : axis == 'z' ? 2 : -1;
        if (dim < 0) TVM_FFI_THROW(RuntimeError) << "OpenCL module: unknown launch tag " << tag;
        params.push_back({block ? kBlock : kThread, dim});
        if (dim > max_dim) max_dim = dim;
      } else if (tag == "tirx.use_dyn_shared_memory" || tag == "tir.use_dyn_shared_memory") {
        params.push_back({kDynShared, 0});
      }
      // other tirx.* tags (cooperative / programmatic launch) are flags without an argument
    }
    work_dim = max_dim + 1 > 0 ? max_dim + 1 : 1;
  }
};

class OpenCLModuleObj;

struct KernelFunc {
  OpenCLModuleObj* module;
  std::string name;
  std::vector<DLDataType> arg_types;
  std::vector<size_t> arg_size;
  LaunchConfig launch;
};

class OpenCLModuleObj final : public ffi::ModuleObj {
 public:
  const char* kind() const final { return "opencl"; }
  int GetPropertyMask() const final {
    return ffi::Module::kBinarySerializable | ffi::Module::kRunnable;
  }

  ffi::Bytes SaveToBytes() const final {
    std::string out;
    auto pod = [&out](const void* p, size_t n) { out.append(static_cast<const char*>(p), n); };
    auto str = [&](const std::string& s) {
      uint64_t n = s.size();
      pod(&n, 8);
      out += s;
    };
    str(fmt_);
    uint64_t nfunc = fmap_.size();
    pod(&nfunc, 8);
    // In the order the compiler handed the functions over (or the bytes held
    // them), as TVM's own DeviceSourceModule writes them: a build that ran with
    // this add-on loaded is byte-identical to one that ran without it.
    for (const std::string& key : order_) {
      const auto& kv = *fmap_.find(key);
      str(kv.first);
      str(kv.second.name);
      uint64_t n = kv.second.arg_types.size();
      pod(&n, 8);
      for (const DLDataType& t : kv.second.arg_types) {
        pod(&t.code, 1);
        pod(&t.bits, 1);
        pod(&t.lanes, 2);
      }
      n = kv.second.launch_param_tags.size();
      pod(&n, 8);
      for (const std::string& tag : kv.second.launch_param_tags) str(tag);
      n = kv.second.arg_types.size();  // arg_extra_tags: all kNone
      pod(&n, 8);
      int32_t none = 0;
      for (uint64_t i = 0; i < n; ++i) pod(&none, 4);
    }
    str(source_);
    return ffi::Bytes(out);
  }

  ffi::String InspectSource(const ffi::String& format) const final { return ffi::String(source_); }

  ffi::Optional<ffi::Function> GetFunction(const ffi::String& name) final {
    auto it = fmap_.find(std::string(name));
    if (it == fmap_.end()) return std::nullopt;
    const FunctionInfo& info = it->second;
    auto f = std::make_shared<KernelFunc>();
    f->module = this;
    f->name = info.name.empty() ? it->first : info.name;
    f->arg_types = info.arg_types;
    for (const DLDataType& t : info.arg_types) {
      if (t.lanes != 1) {
        TVM_FFI_THROW(RuntimeError) << "OpenCL module: vector kernel argument in " << f->name;
      }
      if (t.code == kDLOpaqueHandle) {
        f->arg_size.push_back(sizeof(cl_mem));
      } else {
        f->arg_size.push_back(t.bits < 8 ? 4 : t.bits / 8);
      }
    }
    f->launch.Init(info.launch_param_tags);
    ffi::ObjectPtr<ffi::Object> self = ffi::GetObjectPtr<ffi::Object>(this);
    return ffi::Function::FromPacked([self, f](ffi::PackedArgs args, ffi::Any* rv) {
      static_cast<OpenCLModuleObj*>(self.get())->Launch(*f, args);
    });
  }

  // From the codegen ("ffi.Module.create.opencl"): fmap values are runtime.FunctionInfo
  // objects, read through their reflected fields.
  void Create(const std::string& data, const std::string& fmt,
              const ffi::Map<ffi::String, ffi::ObjectRef>& fmap) {
    static const ffi::reflection::FieldGetter get_name("runtime.FunctionInfo", "name");
    static const ffi::reflection::FieldGetter get_args("runtime.FunctionInfo", "arg_types");
    static const ffi::reflection::FieldGetter get_tags("runtime.FunctionInfo", "launch_param_tags");
    static const ffi::reflection::FieldGetter get_extra("runtime.FunctionInfo", "arg_extra_tags");
    fmt_ = fmt;
    source_ = data;
    for (const auto& kv : fmap) {
      FunctionInfo info;
      info.name = std::string(get_name(kv.second).cast<ffi::String>());
      for (const DLDataType& t : get_args(kv.second).cast<ffi::Array<DLDataType>>()) {
        info.arg_types.push_back(t);
      }
      for (const ffi::String& tag : get_tags(kv.second).cast<ffi::Array<ffi::String>>()) {
        info.launch_param_tags.push_back(std::string(tag));
      }
      for (const ffi::Any& tag : get_extra(kv.second).cast<ffi::Array<ffi::Any>>()) {
        if (tag.cast<int64_t>() != 0) {
          TVM_FFI_THROW(RuntimeError) << "OpenCL module: argument extra tag " << tag.cast<int64_t>()
                                      << " of " << kv.first << " is not supported";
        }
      }
      if (!fmap_.count(std::string(kv.first))) order_.push_back(std::string(kv.first));
      fmap_[std::string(kv.first)] = std::move(info);
    }
    Finish();
  }

  void Load(const ffi::Bytes& bytes) {
    Reader r(bytes.data(), bytes.size());
    fmt_ = r.Str("format");
    uint64_t nfunc = r.Pod<uint64_t>("function count");
    for (uint64_t i = 0; i < nfunc; ++i) {
      std::string key = r.Str("function name");
      FunctionInfo info;
      info.name = r.Str("function info name");
      uint64_t nargs = r.Pod<uint64_t>("argument count");
      for (uint64_t a = 0; a < nargs; ++a) {
        DLDataType t;
        t.code = r.Pod<uint8_t>("dtype code");
        t.bits = r.Pod<uint8_t>("dtype bits");
        t.lanes = r.Pod<uint16_t>("dtype lanes");
        info.arg_types.push_back(t);
      }
      uint64_t ntags = r.Pod<uint64_t>("launch tag count");
      for (uint64_t a = 0; a < ntags; ++a) info.launch_param_tags.push_back(r.Str("launch tag"));
      uint64_t nextra = r.Pod<uint64_t>("extra tag count");
      for (uint64_t a = 0; a < nextra; ++a) {
        int32_t tag = r.Pod<int32_t>("extra tag");
        if (tag != 0) {
          TVM_FFI_THROW(RuntimeError) << "OpenCL module: argument extra tag " << tag << " of "
                                      << key << " is not supported";
        }
      }
      if (!fmap_.count(key)) order_.push_back(key);
      fmap_[key] = std::move(info);
    }
    source_ = r.Str("source");
    Finish();
  }

 private:
  void Finish() {
    if (fmt_ != "cl") {
      TVM_FFI_THROW(RuntimeError) << "OpenCL runtime add-on: only OpenCL C source modules (format "
                                     "'cl') are supported, not '"
                                  << fmt_ << "'";
    }
    SplitKernels();
  }

  // Split the source on "// Function: <name>" lines; text before the first one
  // (pragmas, helpers) is prepended to every kernel.
  void SplitKernels() {
    const std::string delim = "// Function: ";
    size_t pos = source_.find(delim);
    std::string preamble = pos == std::string::npos ? source_ : source_.substr(0, pos);
    while (pos != std::string::npos) {
      size_t name_begin = pos + delim.size();
      size_t name_end = source_.find('\n', name_begin);
      if (name_end == std::string::npos) name_end = source_.size();
      std::string name = source_.substr(name_begin, name_end - name_begin);
      while (!name.empty() && (name.back() == '\r' || name.back() == ' ')) name.pop_back();
      size_t next = source_.find(delim, name_end);
      size_t body_begin = std::min(name_end + 1, source_.size());
      std::string body = source_.substr(
          body_begin, next == std::string::npos ? std::string::npos : next - body_begin);
      kernel_source_[name] = preamble + body;
      pos = next;
    }
  }

  cl_kernel GetKernel(const std::string& name, int device_id) {
    std::lock_guard<std::mutex> lock(mu_);
    auto key = std::make_pair(name, device_id);
    auto it = kernels_.find(key);
    if (it != kernels_.end()) return it->second;
    CLDevice& d = Workspace::Global()->Get(device_id);
    const std::string* src = &source_;  // fallback: the whole source as one program
    auto ks = kernel_source_.find(name);
    if (ks != kernel_source_.end()) src = &ks->second;
    const char* s = src->c_str();
    size_t len = src->size();
    cl_int err;
    cl_program prog = clCreateProgramWithSource(d.context, 1, &s, &len, &err);
    QCL_CALL(err);
    const char* options = std::getenv("QWEN35_OPENCL_BUILD_OPTIONS");
    err = clBuildProgram(prog, 1, &d.id, options ? options : "", nullptr, nullptr);
    if (err != CL_SUCCESS) {
      size_t n = 0;
      clGetProgramBuildInfo(prog, d.id, CL_PROGRAM_BUILD_LOG, 0, nullptr, &n);
      std::string log(n, '\0');
      if (n) clGetProgramBuildInfo(prog, d.id, CL_PROGRAM_BUILD_LOG, n, &log[0], nullptr);
      clReleaseProgram(prog);
      TVM_FFI_THROW(RuntimeError) << "OpenCL: building kernel " << name << " failed ("
                                  << CLErrorString(err) << "):\n"
                                  << log;
    }
    cl_kernel kernel = clCreateKernel(prog, name.c_str(), &err);
    clReleaseProgram(prog);  // the kernel holds a reference
    QCL_CALL(err);
    kernels_[key] = kernel;
    return kernel;
  }

 public:
  void Launch(const KernelFunc& f, ffi::PackedArgs args) {
    const size_t nargs = f.arg_types.size();
    if (static_cast<size_t>(args.size()) != nargs + f.launch.params.size()) {
      TVM_FFI_THROW(RuntimeError) << "OpenCL kernel " << f.name << ": expected "
                                  << nargs + f.launch.params.size() << " arguments, got "
                                  << args.size();
    }
    int device_id = current_device;
    cl_kernel kernel = GetKernel(f.name, device_id);
    size_t grid[3] = {1, 1, 1}, block[3] = {1, 1, 1};
    for (size_t j = 0; j < f.launch.params.size(); ++j) {
      const LaunchConfig::Param& p = f.launch.params[j];
      int64_t v = args[static_cast<int>(nargs + j)].cast<int64_t>();
      if (p.kind == LaunchConfig::kBlock) grid[p.dim] = static_cast<size_t>(v);
      if (p.kind == LaunchConfig::kThread) block[p.dim] = static_cast<size_t>(v);
      // kDynShared: TVM's OpenCL kernels declare their local memory statically
    }
    std::lock_guard<std::mutex> lock(launch_mu_);  // clSetKernelArg is not thread safe
    for (size_t i = 0; i < nargs; ++i) {
      const DLDataType& t = f.arg_types[i];
      ffi::AnyView a = args[static_cast<int>(i)];
      if (t.code == kDLOpaqueHandle) {
        void* ptr = nullptr;
        int32_t ti = a.type_index();
        if (ti == ffi::TypeIndex::kTVMFFIDLTensorPtr) {
          ptr = a.cast<DLTensor*>()->data;
        } else if (ti != ffi::TypeIndex::kTVMFFINone) {
          ptr = a.cast<void*>();
        }
        cl_mem mem = static_cast<cl_mem>(ptr);
        QCL_CALL(clSetKernelArg(kernel, static_cast<cl_uint>(i), sizeof(cl_mem), &mem));
      } else if (t.code == kDLFloat) {
        double v = a.cast<double>();
        if (t.bits == 64) {
          QCL_CALL(clSetKernelArg(kernel, static_cast<cl_uint>(i), sizeof(double), &v));
        } else if (t.bits == 32) {
          float v32 = static_cast<float>(v);
          QCL_CALL(clSetKernelArg(kernel, static_cast<cl_uint>(i), sizeof(float), &v32));
        } else {
          TVM_FFI_THROW(RuntimeError) << "OpenCL kernel " << f.name << ": float" << int(t.bits)
                                      << " scalar arguments are not supported";
        }
      } else {  // int / uint / bool
        int64_t v = a.cast<int64_t>();
        size_t size = f.arg_size[i];
        char buf[8];
        if (size == 8) {
          std::memcpy(buf, &v, 8);
        } else if (size == 4) {
          int32_t v32 = static_cast<int32_t>(v);
          std::memcpy(buf, &v32, 4);
        } else if (size == 2) {
          int16_t v16 = static_cast<int16_t>(v);
          std::memcpy(buf, &v16, 2);
        } else {
          int8_t v8 = static_cast<int8_t>(v);
          std::memcpy(buf, &v8, 1);
          size = 1;
        }
        QCL_CALL(clSetKernelArg(kernel, static_cast<cl_uint>(i), size, buf));
      }
    }
    size_t global[3], local[3];
    const int wd = f.launch.work_dim;
    for (int d = 0; d < wd; ++d) {
      global[d] = grid[d] * block[d];
      local[d] = block[d];
    }
    for (int d = 0; d < wd; ++d) {
      if (global[d] == 0) return;  // empty launch
    }
    cl_command_queue q = Workspace::Global()->Queue(device_id);
    static const bool trace = std::getenv("QWEN35_OPENCL_TRACE") != nullptr;  // debugging aid
    if (trace) {
      std::fprintf(stderr, "[opencl] %s work_dim=%d global=(%zu,%zu,%zu) local=(%zu,%zu,%zu)\n",
                   f.name.c_str(), wd, global[0], wd > 1 ? global[1] : 1, wd > 2 ? global[2] : 1,
                   local[0], wd > 1 ? local[1] : 1, wd > 2 ? local[2] : 1);
    }
    QCL_CALL(clEnqueueNDRangeKernel(q, kernel, static_cast<cl_uint>(wd), nullptr, global, local, 0,
                                    nullptr, nullptr));
    if (std::getenv("QWEN35_OPENCL_SYNC")) QCL_CALL(clFinish(q));  // debugging aid
  }

  ~OpenCLModuleObj() {
    for (auto& kv : kernels_) clReleaseKernel(kv.second);
  }

 private:
  std::string fmt_;
  std::string source_;
  std::unordered_map<std::string, FunctionInfo> fmap_;
  std::vector<std::string> order_;  // fmap_'s keys in the order they came (SaveToBytes)
  std::unordered_map<std::string, std::string> kernel_source_;
  std::map<std::pair<std::string, int>, cl_kernel> kernels_;
  std::mutex mu_;
  std::mutex launch_mu_;
};

ffi::Module LoadFromBytes(const ffi::Bytes& bytes) {
  auto n = ffi::make_object<OpenCLModuleObj>();
  n->Load(bytes);
  return ffi::Module(n);
}

// (code: Bytes or String, fmt: String, fmap: Map<String, FunctionInfo>, source: String or
// Map<String, String>); code is the whole OpenCL C source with its "// Function:" lines.
void Create(ffi::PackedArgs args, ffi::Any* rv) {
  if (args.size() < 3) TVM_FFI_THROW(RuntimeError) << "ffi.Module.create.opencl: too few arguments";
  std::string data;
  if (auto b = args[0].as<ffi::Bytes>()) {
    data = std::string(b->data(), b->size());
  } else {
    data = std::string(args[0].cast<ffi::String>());
  }
  std::string fmt = std::string(args[1].cast<ffi::String>());
  auto fmap = args[2].cast<ffi::Map<ffi::String, ffi::ObjectRef>>();
  auto n = ffi::make_object<OpenCLModuleObj>();
  n->Create(data, fmt, fmap);
  *rv = ffi::Module(n);
}

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef()
      .def_packed("device_api.opencl",
                  [](ffi::PackedArgs args, ffi::Any* rv) {
                    *rv = static_cast<void*>(static_cast<DeviceAPI*>(OpenCLDeviceAPI::Global()));
                  })
      .def("ffi.Module.load_from_bytes.opencl", LoadFromBytes)
      .def_packed("ffi.Module.create.opencl", Create)
      .def("qwen35.opencl_runtime.num_devices",
           []() { return static_cast<int64_t>(Workspace::Global()->NumDevices()); });
}

}  // namespace qwen35_opencl

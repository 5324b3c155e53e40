/*
 * qwen35-mobile: tvm/support/io.h for building TVM's web runtime from the apache-tvm wheel.
 *
 * The wheel ships the runtime sources that the web runtime compiles
 * (the .cc files of tvm/web/emcc, tvm/src/runtime) but not this header, which
 * tvm/runtime/tensor.h and the VM executable reader include.  This is our own
 * implementation of the interface those sources use: a byte stream with typed
 * Read/Write built on Serializer<T> (tvm/support/serializer.h).  The byte
 * format is the one the wheel's compiler writes (little-endian, the dmlc
 * layout): arithmetic and trivially copyable values as their bytes, strings and
 * sequences as a uint64 element count followed by the elements.
 * tests/test_web_runtime.py round-trips a real VM executable through it.
 */
#ifndef TVM_SUPPORT_IO_H_
#define TVM_SUPPORT_IO_H_

#include <cstddef>
#include <cstdint>

// wasm32 and every target we build for are little-endian: no byte swapping.
#ifndef TVM_FFI_IO_NO_ENDIAN_SWAP
#define TVM_FFI_IO_NO_ENDIAN_SWAP 1
#endif

namespace tvm {
namespace support {

class Stream;

/*! \brief How a value of type T is written to and read from a Stream (serializer.h). */
template <typename T, typename Enable = void>
struct Serializer;

/*! \brief A byte stream; subclasses implement the two raw calls. */
class Stream {
 public:
  virtual ~Stream() = default;
  /*! \return the number of bytes read (fewer than size at the end of the stream). */
  virtual size_t Read(void* ptr, size_t size) = 0;
  /*! \return the number of bytes written. */
  virtual size_t Write(const void* ptr, size_t size) = 0;

  /*! \brief Write a value with its Serializer. */
  template <typename T>
  void Write(const T& data) {
    Serializer<T>::Write(this, data);
  }
  /*! \brief Read a value with its Serializer; false at the end of the stream. */
  template <typename T>
  bool Read(T* out) {
    return Serializer<T>::Read(this, out);
  }
  /*! \brief Write num_elems values one after another (no count). */
  template <typename T>
  void WriteArray(const T* data, size_t num_elems) {
    for (size_t i = 0; i < num_elems; ++i) this->Write<T>(data[i]);
  }
  /*! \brief Read num_elems values one after another (no count). */
  template <typename T>
  bool ReadArray(T* data, size_t num_elems) {
    for (size_t i = 0; i < num_elems; ++i) {
      if (!this->Read<T>(data + i)) return false;
    }
    return true;
  }
};

}  // namespace support
}  // namespace tvm

#include <tvm/support/serializer.h>

#endif  // TVM_SUPPORT_IO_H_

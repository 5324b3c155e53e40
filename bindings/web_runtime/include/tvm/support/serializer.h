/*
 * qwen35-mobile: tvm/support/serializer.h for building TVM's web runtime from the wheel.
 *
 * Serializer<T>::Write(Stream*, const T&) / Read(Stream*, T*) for the types the
 * runtime serialises (see io.h for why this file exists).  Layout, as the
 * wheel's compiler writes it:
 *   trivially copyable (arithmetic, enums, DLDataType, DLDevice)  its bytes
 *   std::string, ffi::String                                      uint64 size, bytes
 *   std::vector<T>, ffi::Array<T>                                 uint64 count, elements
 *   std::pair<A, B>                                               first, second
 *   std::map, std::unordered_map, ffi::Map                        uint64 count, (key, value)...
 * Counts are uint64 on every host, so a wasm32 reader reads what an x86_64
 * writer wrote; the serialised structs use fixed-width fields (int64 Index).
 */
#ifndef TVM_SUPPORT_SERIALIZER_H_
#define TVM_SUPPORT_SERIALIZER_H_

#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/string.h>
#include <tvm/support/io.h>

#include <cstdint>
#include <map>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

namespace tvm {
namespace support {

namespace detail {
inline bool ReadCount(Stream* strm, uint64_t* count) {
  return strm->Read(count, sizeof(*count)) == sizeof(*count);
}
inline void WriteCount(Stream* strm, uint64_t count) { strm->Write(&count, sizeof(count)); }
}  // namespace detail

/*! \brief Trivially copyable values: their bytes. */
template <typename T>
struct Serializer<T, std::enable_if_t<std::is_trivially_copyable_v<T>>> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const T& data) { strm->Write(&data, sizeof(T)); }
  static bool Read(Stream* strm, T* data) { return strm->Read(data, sizeof(T)) == sizeof(T); }
};

/*! \brief std::string: uint64 size, then the bytes. */
template <>
struct Serializer<std::string> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const std::string& data) {
    detail::WriteCount(strm, data.size());
    if (!data.empty()) strm->Write(data.data(), data.size());
  }
  static bool Read(Stream* strm, std::string* data) {
    uint64_t size;
    if (!detail::ReadCount(strm, &size)) return false;
    data->resize(static_cast<size_t>(size));
    return size == 0 || strm->Read(&(*data)[0], data->size()) == data->size();
  }
};

/*! \brief ffi::String: as std::string. */
template <>
struct Serializer<ffi::String> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const ffi::String& data) {
    detail::WriteCount(strm, data.size());
    if (data.size() != 0) strm->Write(data.data(), data.size());
  }
  static bool Read(Stream* strm, ffi::String* data) {
    std::string temp;
    if (!Serializer<std::string>::Read(strm, &temp)) return false;
    *data = ffi::String(std::move(temp));
    return true;
  }
};

/*! \brief std::vector<T>: uint64 count, then the elements (one block when trivially copyable). */
template <typename T, typename A>
struct Serializer<std::vector<T, A>> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const std::vector<T, A>& data) {
    detail::WriteCount(strm, data.size());
    if constexpr (std::is_trivially_copyable_v<T> && !std::is_same_v<T, bool>) {
      if (!data.empty()) strm->Write(data.data(), data.size() * sizeof(T));
    } else {
      for (const T& item : data) Serializer<T>::Write(strm, item);
    }
  }
  static bool Read(Stream* strm, std::vector<T, A>* data) {
    uint64_t count;
    if (!detail::ReadCount(strm, &count)) return false;
    data->resize(static_cast<size_t>(count));
    if constexpr (std::is_trivially_copyable_v<T> && !std::is_same_v<T, bool>) {
      size_t nbytes = data->size() * sizeof(T);
      return nbytes == 0 || strm->Read(data->data(), nbytes) == nbytes;
    } else {
      for (size_t i = 0; i < data->size(); ++i) {
        T item;
        if (!Serializer<T>::Read(strm, &item)) return false;
        (*data)[i] = std::move(item);
      }
      return true;
    }
  }
};

/*! \brief ffi::Array<T>: uint64 count, then the elements. */
template <typename T>
struct Serializer<ffi::Array<T>> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const ffi::Array<T>& data) {
    detail::WriteCount(strm, data.size());
    for (size_t i = 0; i < data.size(); ++i) Serializer<T>::Write(strm, data[i]);
  }
  static bool Read(Stream* strm, ffi::Array<T>* data) {
    uint64_t count;
    if (!detail::ReadCount(strm, &count)) return false;
    ffi::Array<T> result;
    for (uint64_t i = 0; i < count; ++i) {
      T item;
      if (!Serializer<T>::Read(strm, &item)) return false;
      result.push_back(std::move(item));
    }
    *data = std::move(result);
    return true;
  }
};

/*! \brief std::pair: first, then second. */
template <typename A, typename B>
struct Serializer<std::pair<A, B>, std::enable_if_t<!std::is_trivially_copyable_v<std::pair<A, B>>>> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const std::pair<A, B>& data) {
    Serializer<A>::Write(strm, data.first);
    Serializer<B>::Write(strm, data.second);
  }
  static bool Read(Stream* strm, std::pair<A, B>* data) {
    return Serializer<A>::Read(strm, &data->first) && Serializer<B>::Read(strm, &data->second);
  }
};

namespace detail {
template <typename M, bool kFFIMap = false>
struct MapSerializer {
  using K = typename M::key_type;
  using V = typename M::mapped_type;
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const M& data) {
    WriteCount(strm, data.size());
    for (const auto& kv : data) {
      Serializer<K>::Write(strm, kv.first);
      Serializer<V>::Write(strm, kv.second);
    }
  }
  static bool Read(Stream* strm, M* data) {
    uint64_t count;
    if (!ReadCount(strm, &count)) return false;
    *data = M();
    for (uint64_t i = 0; i < count; ++i) {
      K key;
      V value;
      if (!Serializer<K>::Read(strm, &key)) return false;
      if (!Serializer<V>::Read(strm, &value)) return false;
      Insert(data, std::move(key), std::move(value));
    }
    return true;
  }
  template <typename Key, typename Value>
  static void Insert(M* data, Key&& key, Value&& value) {
    if constexpr (kFFIMap) {
      data->Set(std::forward<Key>(key), std::forward<Value>(value));
    } else {
      data->emplace(std::forward<Key>(key), std::forward<Value>(value));
    }
  }
};
}  // namespace detail

template <typename K, typename V, typename C, typename A>
struct Serializer<std::map<K, V, C, A>> : detail::MapSerializer<std::map<K, V, C, A>> {};

template <typename K, typename V, typename H, typename E, typename A>
struct Serializer<std::unordered_map<K, V, H, E, A>>
    : detail::MapSerializer<std::unordered_map<K, V, H, E, A>> {};

template <typename K, typename V>
struct Serializer<ffi::Map<K, V>> : detail::MapSerializer<ffi::Map<K, V>, true> {};

}  // namespace support
}  // namespace tvm

#endif  // TVM_SUPPORT_SERIALIZER_H_

/*
 * qwen35-mobile: src/support/base64.h for building TVM's web runtime from the wheel
 * (see include/tvm/support/io.h).  Streams that base64-encode what is written to an
 * underlying stream (Finish() writes the padding) and decode what is read from one
 * (InitPosition() takes the underlying stream's text, whitespace skipped).
 */
#ifndef TVM_SUPPORT_BASE64_H_
#define TVM_SUPPORT_BASE64_H_

#include <tvm/ffi/error.h>
#include <tvm/support/io.h>

#include <algorithm>
#include <cctype>
#include <cstring>
#include <string>

namespace tvm {
namespace support {

namespace base64 {
inline const char* Alphabet() {
  return "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
}
inline int Value(char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+') return 62;
  if (c == '/') return 63;
  return -1;
}
}  // namespace base64

class Base64OutStream : public Stream {
 public:
  explicit Base64OutStream(Stream* out) : out_(out) {}
  using Stream::Read;
  using Stream::Write;
  size_t Read(void*, size_t) final { return 0; }
  size_t Write(const void* ptr, size_t size) final {
    const unsigned char* p = static_cast<const unsigned char*>(ptr);
    for (size_t i = 0; i < size; ++i) {
      buf_[nbuf_++] = p[i];
      if (nbuf_ == 3) Emit();
    }
    return size;
  }
  /*! \brief Write the last partial group with its padding. */
  void Finish() {
    if (nbuf_ != 0) Emit();
  }

 private:
  void Emit() {
    const char* a = base64::Alphabet();
    unsigned v = (buf_[0] << 16) | (nbuf_ > 1 ? buf_[1] << 8 : 0) | (nbuf_ > 2 ? buf_[2] : 0);
    char text[4] = {a[(v >> 18) & 63], a[(v >> 12) & 63], nbuf_ > 1 ? a[(v >> 6) & 63] : '=',
                    nbuf_ > 2 ? a[v & 63] : '='};
    out_->Write(text, 4);
    nbuf_ = 0;
  }
  Stream* out_;
  unsigned char buf_[3] = {0, 0, 0};
  size_t nbuf_ = 0;
};

class Base64InStream : public Stream {
 public:
  explicit Base64InStream(Stream* in) : in_(in) {}
  using Stream::Read;
  using Stream::Write;
  /*! \brief Decode all of the underlying stream's remaining text. */
  void InitPosition() {
    std::string text;
    char chunk[4096];
    for (size_t n; (n = in_->Read(chunk, sizeof(chunk))) != 0;) text.append(chunk, n);
    unsigned v = 0;
    int bits = 0;
    for (char c : text) {
      if (std::isspace(static_cast<unsigned char>(c)) || c == '"') continue;
      if (c == '=') break;
      int d = base64::Value(c);
      TVM_FFI_ICHECK_GE(d, 0) << "invalid base64 character " << static_cast<int>(c);
      v = (v << 6) | static_cast<unsigned>(d);
      bits += 6;
      if (bits >= 8) {
        bits -= 8;
        decoded_.push_back(static_cast<char>((v >> bits) & 0xFF));
      }
    }
  }
  size_t Read(void* ptr, size_t size) final {
    size_t n = std::min(size, decoded_.size() - pos_);
    if (n != 0) std::memcpy(ptr, decoded_.data() + pos_, n);
    pos_ += n;
    return n;
  }
  size_t Write(const void*, size_t) final { return 0; }

 private:
  Stream* in_;
  std::string decoded_;
  size_t pos_ = 0;
};

}  // namespace support
}  // namespace tvm

#endif  // TVM_SUPPORT_BASE64_H_

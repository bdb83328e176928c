// kvcast's interleaved rANS coder on the CPU (see rans_core.h for the stream layout).
// Copyright (C) 2026 the kvcast authors. GPL-3.0-or-later.
//
// Streams are described by arrays of S entries: symbol offsets sym_start[S + 1] into one flat int16 symbol
// array, lanes[S], and the CDF row of each symbol: row0[S] + i % period[S] for the stream's i-th symbol.
// CDF rows: cum int32 [R, W] (cum[r][0] = 0 < ... < cum[r][nsym[r]] = 65536), nsym int32 [R] (<= 256).
#include <torch/extension.h>

#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "rans_core.h"

namespace {

struct Tables {
  const int32_t* cum;
  int64_t width;
  const int32_t* nsym;
  int64_t rows;
};

Tables tables_of(const torch::Tensor& cum, const torch::Tensor& nsym) {
  TORCH_CHECK(cum.dtype() == torch::kInt32 && cum.dim() == 2 && cum.is_contiguous(), "cum: int32 [R, W]");
  TORCH_CHECK(nsym.dtype() == torch::kInt32 && nsym.dim() == 1 && nsym.size(0) == cum.size(0), "nsym: int32 [R]");
  const int32_t* n = nsym.data_ptr<int32_t>();
  for (int64_t r = 0; r < nsym.size(0); ++r)
    TORCH_CHECK(n[r] >= 1 && n[r] <= 256 && n[r] < cum.size(1), "nsym out of range");
  return {cum.data_ptr<int32_t>(), cum.size(1), n, cum.size(0)};
}

void check_streams(const torch::Tensor& sym_start, const torch::Tensor& lanes, const torch::Tensor& row0,
                   const torch::Tensor& period, int64_t rows) {
  const int64_t s = lanes.size(0);
  TORCH_CHECK(sym_start.dtype() == torch::kInt64 && sym_start.size(0) == s + 1, "sym_start: int64 [S + 1]");
  TORCH_CHECK(lanes.dtype() == torch::kInt32 && row0.dtype() == torch::kInt32 && period.dtype() == torch::kInt32,
              "lanes, row0, period: int32 [S]");
  TORCH_CHECK(row0.size(0) == s && period.size(0) == s, "row0, period: [S]");
  const int32_t* l = lanes.data_ptr<int32_t>();
  const int32_t* r = row0.data_ptr<int32_t>();
  const int32_t* p = period.data_ptr<int32_t>();
  const int64_t* st = sym_start.data_ptr<int64_t>();
  for (int64_t k = 0; k < s; ++k) {
    TORCH_CHECK(l[k] >= 1 && l[k] <= 32, "lanes must be in 1..32");
    TORCH_CHECK(p[k] >= 1 && r[k] >= 0 && static_cast<int64_t>(r[k]) + p[k] <= rows, "CDF rows out of range");
    TORCH_CHECK(st[k + 1] >= st[k], "sym_start must not decrease");
  }
}

}  // namespace

// Encode every stream; returns (bytes uint8 [total], lengths int64 [S]).
std::vector<torch::Tensor> encode_streams(torch::Tensor symbols, torch::Tensor sym_start, torch::Tensor lanes,
                                          torch::Tensor row0, torch::Tensor period, torch::Tensor cum,
                                          torch::Tensor nsym) {
  TORCH_CHECK(symbols.dtype() == torch::kInt16 && symbols.dim() == 1 && symbols.is_contiguous(), "symbols: int16 [N]");
  const Tables t = tables_of(cum, nsym);
  check_streams(sym_start, lanes, row0, period, t.rows);
  const int64_t streams = lanes.size(0);
  const int64_t* st = sym_start.data_ptr<int64_t>();
  TORCH_CHECK(st[0] == 0 && st[streams] <= symbols.size(0), "sym_start exceeds the symbols");
  const int16_t* sym = symbols.data_ptr<int16_t>();
  const int32_t* ln = lanes.data_ptr<int32_t>();
  const int32_t* r0 = row0.data_ptr<int32_t>();
  const int32_t* per = period.data_ptr<int32_t>();
  auto lengths = torch::zeros({streams}, torch::kInt64);
  int64_t* len = lengths.data_ptr<int64_t>();
  std::vector<uint8_t> out;
  std::string error;
  {
    pybind11::gil_scoped_release release;
    std::vector<uint16_t> words;
    for (int64_t k = 0; k < streams && error.empty(); ++k) {
      const int64_t n = st[k + 1] - st[k];
      if (n == 0) continue;
      const int lanes_k = ln[k];
      uint32_t x[32];
      for (int j = 0; j < lanes_k; ++j) x[j] = kvrans::kStateLow;
      words.clear();
      const int64_t steps = (n + lanes_k - 1) / lanes_k;
      for (int64_t step = steps - 1; step >= 0 && error.empty(); --step) {
        const int active = static_cast<int>(std::min<int64_t>(lanes_k, n - step * lanes_k));
        for (int j = active - 1; j >= 0; --j) {
          const int64_t i = step * lanes_k + j;
          const int32_t s = sym[st[k] + i];
          const int64_t r = r0[k] + i % per[k];
          if (s < 0 || s >= t.nsym[r]) { error = "symbol out of its CDF's range"; break; }
          const int32_t* c = t.cum + r * t.width;
          const uint32_t start = static_cast<uint32_t>(c[s]);
          const uint32_t freq = static_cast<uint32_t>(c[s + 1]) - start;
          if (kvrans::enc_needs_word(x[j], freq)) { words.push_back(static_cast<uint16_t>(x[j] & 0xFFFFu)); x[j] >>= 16; }
          x[j] = kvrans::enc_put(x[j], start, freq);
        }
      }
      const size_t base = out.size();
      out.resize(base + 4 * lanes_k + 2 * words.size());
      uint8_t* p = out.data() + base;
      for (int j = 0; j < lanes_k; ++j)
        for (int b = 0; b < 4; ++b) *p++ = static_cast<uint8_t>(x[j] >> (8 * b));
      for (size_t w = words.size(); w-- > 0;) { *p++ = static_cast<uint8_t>(words[w]); *p++ = static_cast<uint8_t>(words[w] >> 8); }
      len[k] = static_cast<int64_t>(4 * lanes_k + 2 * words.size());
    }
  }
  TORCH_CHECK(error.empty(), error);
  auto bytes = torch::empty({static_cast<int64_t>(out.size())}, torch::kUInt8);
  if (!out.empty()) std::memcpy(bytes.data_ptr<uint8_t>(), out.data(), out.size());
  return {bytes, lengths};
}

// Decode every stream; stream k's coded bytes are payload[byte_begin[k], byte_end[k]). Returns
// (symbols int16 [N], status int32 [S]); a stream with a non-zero status leaves its symbols undefined.
std::vector<torch::Tensor> decode_streams(torch::Tensor payload, torch::Tensor byte_begin, torch::Tensor byte_end,
                                          torch::Tensor sym_start, torch::Tensor lanes, torch::Tensor row0,
                                          torch::Tensor period, torch::Tensor cum, torch::Tensor nsym) {
  TORCH_CHECK(payload.dtype() == torch::kUInt8 && payload.dim() == 1 && payload.is_contiguous(), "payload: uint8 [B]");
  const Tables t = tables_of(cum, nsym);
  check_streams(sym_start, lanes, row0, period, t.rows);
  const int64_t streams = lanes.size(0);
  TORCH_CHECK(byte_begin.dtype() == torch::kInt64 && byte_end.dtype() == torch::kInt64 &&
              byte_begin.size(0) == streams && byte_end.size(0) == streams, "byte_begin, byte_end: int64 [S]");
  const int64_t* bb = byte_begin.data_ptr<int64_t>();
  const int64_t* be = byte_end.data_ptr<int64_t>();
  const int64_t total = payload.size(0);
  for (int64_t k = 0; k < streams; ++k) TORCH_CHECK(0 <= bb[k] && bb[k] <= be[k] && be[k] <= total, "byte range out of the payload");
  const int64_t* st = sym_start.data_ptr<int64_t>();
  TORCH_CHECK(st[0] == 0, "sym_start[0] must be 0");
  auto symbols = torch::empty({st[streams]}, torch::kInt16);
  auto status = torch::zeros({streams}, torch::kInt32);
  int16_t* out = symbols.data_ptr<int16_t>();
  int32_t* stat = status.data_ptr<int32_t>();
  const uint8_t* data = payload.data_ptr<uint8_t>();
  const int32_t* ln = lanes.data_ptr<int32_t>();
  const int32_t* r0 = row0.data_ptr<int32_t>();
  const int32_t* per = period.data_ptr<int32_t>();
  {
    pybind11::gil_scoped_release release;
    std::vector<uint8_t> lut(static_cast<size_t>(t.rows) * kvrans::kLutSize);
    for (int64_t r = 0; r < t.rows; ++r) kvrans::build_lut(t.cum + r * t.width, t.nsym[r], lut.data() + r * kvrans::kLutSize);
    for (int64_t k = 0; k < streams; ++k) {
      const int64_t n = st[k + 1] - st[k];
      const uint8_t* p = data + bb[k];
      const uint8_t* end = data + be[k];
      if (n == 0) { stat[k] = p == end ? kvrans::kOk : kvrans::kTrailingBytes; continue; }
      const int lanes_k = ln[k];
      if (end - p < 4 * lanes_k) { stat[k] = kvrans::kTruncated; continue; }
      uint32_t x[32];
      int32_t bad = kvrans::kOk;
      for (int j = 0; j < lanes_k; ++j, p += 4) {
        x[j] = static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) | (static_cast<uint32_t>(p[2]) << 16) |
               (static_cast<uint32_t>(p[3]) << 24);
        if (x[j] < kvrans::kStateLow) bad = kvrans::kBadState;
      }
      const int64_t steps = (n + lanes_k - 1) / lanes_k;
      int16_t* o = out + st[k];
      for (int64_t step = 0; step < steps && bad == kvrans::kOk; ++step) {
        const int active = static_cast<int>(std::min<int64_t>(lanes_k, n - step * lanes_k));
        for (int j = 0; j < active; ++j) {
          const int64_t i = step * lanes_k + j;
          const int64_t r = r0[k] + i % per[k];
          const int32_t* c = t.cum + r * t.width;
          const uint32_t slot = x[j] & 0xFFFFu;
          const int s = kvrans::dec_lookup(c, lut.data() + r * kvrans::kLutSize, slot);
          x[j] = kvrans::dec_advance(x[j], static_cast<uint32_t>(c[s]), static_cast<uint32_t>(c[s + 1] - c[s]));
          o[i] = static_cast<int16_t>(s);
        }
        for (int j = 0; j < active; ++j) {
          if (x[j] >= kvrans::kStateLow) continue;
          if (end - p < 2) { bad = kvrans::kTruncated; break; }
          x[j] = (x[j] << 16) | static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8);
          p += 2;
        }
      }
      if (bad == kvrans::kOk)
        for (int j = 0; j < lanes_k; ++j)
          if (x[j] != kvrans::kStateLow) bad = kvrans::kBadFinalState;
      if (bad == kvrans::kOk && p != end) bad = kvrans::kTrailingBytes;
      stat[k] = bad;
    }
  }
  return {symbols, status};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("encode_streams", &encode_streams, "Encode interleaved rANS streams");
  m.def("decode_streams", &decode_streams, "Decode interleaved rANS streams");
}

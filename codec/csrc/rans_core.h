// kvcast's interleaved rANS coder: the arithmetic shared by the CPU coder (rans_cpu.cpp) and the CUDA
// kernels (rans_cuda.cu), so both read and write the same bytes.
//
// Copyright (C) 2026 the kvcast authors. GPL-3.0-or-later.
//
// Coder: rANS with a 32-bit state x in [2^16, 2^32), 16-bit renormalisation words and 16-bit probabilities
// (the CDF tables kvcast ships: cum[0] = 0 < cum[1] < ... < cum[nsym] = 65536, as torchac reads them). A
// stream of n symbols is split over `lanes` interleaved coders: symbol i belongs to lane i % lanes and is
// decoded at step i / lanes. At every step the lanes decode their symbols, then the lanes whose state fell
// below 2^16 read one word each, in ascending lane order. Stream bytes: the lanes' initial decoder states
// (u32 little-endian, lane 0 first), then the words (u16 little-endian) in reading order. A valid stream
// ends with every lane back at state 2^16 and every word read: a free integrity check.
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define KVC_HD __host__ __device__ __forceinline__
#else
#define KVC_HD inline
#endif

namespace kvrans {

constexpr uint32_t kStateLow = 1u << 16;  // the state's lower bound (and the encoder's initial state)
constexpr int kLutBits = 8;               // the lookup table's buckets: slot >> (16 - kLutBits)
constexpr int kLutSize = (1 << kLutBits) + 1;  // one more entry: the last symbol, for bucket 255's search

// Number of interleaved lanes of a stream of `count` symbols: one per `lane_symbols`, a power of two, at
// least 1, at most `max_lanes` (a power of two <= 32).
KVC_HD int lane_count(int64_t count, int64_t lane_symbols, int max_lanes) {
  int64_t want = count / lane_symbols;
  int lanes = 1;
  while (lanes * 2 <= max_lanes && lanes * 2 <= want) lanes *= 2;
  return lanes;
}

// Encoder: does symbol [start, start + freq) need a word out of the state before it is put?
KVC_HD bool enc_needs_word(uint32_t x, uint32_t freq) {
  return static_cast<uint64_t>(x) >= (static_cast<uint64_t>(freq) << 16);
}

// Encoder: put a symbol (x must be in [freq, freq << 16)).
KVC_HD uint32_t enc_put(uint32_t x, uint32_t start, uint32_t freq) {
  return ((x / freq) << 16) + (x % freq) + start;
}

// Decoder: the symbol whose interval holds `slot` (cum: nsym + 1 entries; lut: kLutSize entries).
KVC_HD int dec_lookup(const int32_t* cum, const uint8_t* lut, uint32_t slot) {
  const uint32_t bucket = slot >> (16 - kLutBits);
  int lo = lut[bucket], hi = lut[bucket + 1];
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (static_cast<uint32_t>(cum[mid]) <= slot) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Decoder: the state after taking out a symbol [start, start + freq) (may fall below kStateLow).
KVC_HD uint32_t dec_advance(uint32_t x, uint32_t start, uint32_t freq) {
  return freq * (x >> 16) + (x & 0xFFFFu) - start;
}

// One row of the lookup table: lut[b] = the largest symbol s with cum[s] <= b << (16 - kLutBits);
// lut[kLutSize - 1] = nsym - 1.
KVC_HD void build_lut(const int32_t* cum, int nsym, uint8_t* lut) {
  int s = 0;
  for (int b = 0; b < kLutSize - 1; ++b) {
    const int32_t slot = b << (16 - kLutBits);
    while (s + 1 < nsym && cum[s + 1] <= slot) ++s;
    lut[b] = static_cast<uint8_t>(s);
  }
  lut[kLutSize - 1] = static_cast<uint8_t>(nsym - 1);
}

// The GPU's tables (smaller than cum + an 8-bit LUT, so a context's per-channel tables stay in cache): one
// packed entry per symbol, start | (freq - 1) << 16, and a 64-bucket LUT, lut[b] = the largest symbol s with
// start(s) <= b << (16 - kPackedLutBits); the decoder scans forward from it (few steps, all in one row).
constexpr int kPackedLutBits = 6;
constexpr int kPackedLutSize = 1 << kPackedLutBits;

KVC_HD uint32_t packed_start(uint32_t e) { return e & 0xFFFFu; }
KVC_HD uint32_t packed_freq(uint32_t e) { return (e >> 16) + 1u; }

// Decoder: the symbol whose interval holds `slot` and its packed entry (entry: a row of a valid table).
KVC_HD int dec_lookup_packed(const uint32_t* __restrict__ entry, const uint8_t* __restrict__ lut, uint32_t slot,
                             uint32_t* e_out) {
  int s = lut[slot >> (16 - kPackedLutBits)];
  uint32_t e = entry[s];
  while (slot >= packed_start(e) + packed_freq(e)) e = entry[++s];
  *e_out = e;
  return s;
}

// Per-stream decoding status.
enum Status : int32_t {
  kOk = 0,
  kTruncated = 1,      // the stream ends before its lanes' states or a word
  kBadFinalState = 2,  // a lane did not end at kStateLow
  kTrailingBytes = 3,  // bytes left after the last word
  kBadState = 4,       // an initial state below kStateLow
  kBadEscapes = 5,     // escape count or raw bits disagree with the stream (grid levels)
};

}  // namespace kvrans

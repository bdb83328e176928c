// kvcast's GPU decoder and encoder for format 2 (interleaved rANS, rans_core.h), dequantization fused.
// Copyright (C) 2026 the kvcast authors. GPL-3.0-or-later.
//
// Launch geometry: every warp holds whole streams (lanes are powers of two, streams sorted by lanes, so none
// crosses a warp); thread t decodes lane lane_of[t] of stream stream_of[t] (-1: idle). The lanes of a stream
// share its word pointer: after each step the lanes that need a word take them in lane order (a ballot and a
// population count), exactly as the CPU coder reads them. Every read is checked against its stream's bytes;
// a corrupt stream sets a bit in *error and its index in *error_stream, never reads or writes out of bounds.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#include "rans_core.h"
#include "rans_cuda_args.h"

namespace {

using kvrans::KvcDecodeArgs;
using kvrans::KvcEncodeArgs;
using kvrans::Output;
using kvrans::Streams;
using kvrans::Tables;

constexpr unsigned kFull = 0xFFFFFFFFu;

__device__ __forceinline__ uint32_t load_u8(const uint8_t* p) { return __ldg(p); }
__device__ __forceinline__ uint32_t load_u16(const uint8_t* p) { return load_u8(p) | (load_u8(p + 1) << 8); }
__device__ __forceinline__ uint32_t load_u32(const uint8_t* p) { return load_u16(p) | (load_u16(p + 2) << 16); }

template <typename T> __device__ __forceinline__ T cast_out(float v);
template <> __device__ __forceinline__ __half cast_out<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 cast_out<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ float cast_out<float>(float v) { return v; }

__device__ __forceinline__ void fail(int32_t* error, int32_t* error_stream, int code, int stream) {
  atomicOr(error, 1 << code);
  atomicMin(error_stream, stream);
}

// low bits of a symbol: `bits` bits at bit offset `bit`, MSB first
__device__ __forceinline__ uint32_t raw_low(const uint8_t* raw, int64_t bit, int bits) {
  const uint8_t* p = raw + (bit >> 3);
  const int shift = static_cast<int>(bit & 7);
  // at most 7 bits starting within a byte: two bytes always hold them; the second exists unless they end
  // in the first byte (checked so the read stays in the stream)
  uint32_t word = load_u8(p) << 8;
  if (shift + bits > 8) word |= load_u8(p + 1);
  return (word >> (16 - shift - bits)) & ((1u << bits) - 1);
}

template <bool kGrid, bool kDelta, typename OutT>
__global__ void __launch_bounds__(256) decode_kernel(const uint8_t* __restrict__ payload, Streams st, Tables tb,
                                                      Output o, const int32_t* __restrict__ stream_of,
                                                      const int8_t* __restrict__ lane_of, int32_t threads,
                                                      int32_t* error, int32_t* error_stream) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  const int lane_id = threadIdx.x & 31;
  const int k = t < threads ? stream_of[t] : -1;
  const int j = k >= 0 ? lane_of[t] : 0;
  int L = 1, count = 0, period = 1, row0 = 0, width = 1, col_off = 0, g = 0, row_base = 0;
  int top = 0, bits = 0, n_esc = 0;
  int64_t rb = 0, re = 0, raw_at = 0, outl_at = 0;
  uint32_t x = kvrans::kStateLow;
  if (k >= 0) {
    L = st.lanes[k]; count = st.count[k]; period = st.period[k]; row0 = st.row0[k]; width = st.width[k];
    col_off = st.col_off[k]; g = st.group[k]; row_base = st.row_base[k];
    rb = st.rans_begin[k]; re = st.rans_end[k];
    if (kGrid) { top = st.top[k]; bits = st.bits[k]; n_esc = st.n_esc[k]; raw_at = st.raw_begin[k]; outl_at = st.outl_begin[k]; }
    if (re - rb < 4 * L) { fail(error, error_stream, kvrans::kTruncated, k); count = 0; }
    else x = load_u32(payload + rb + 4 * j);
    if (count && x < kvrans::kStateLow) { fail(error, error_stream, kvrans::kBadState, k); count = 0; }
  }
  const int first = lane_id - j;  // the stream's first lane in this warp
  const unsigned smask = (L == 32) ? kFull : (((1u << L) - 1u) << first);
  const unsigned below = (1u << lane_id) - 1u;
  const int my_steps = count > j ? (count - j + L - 1) / L : 0;
  const int steps = __reduce_max_sync(kFull, my_steps);
  int64_t wp = rb + 4 * L;   // the stream's word pointer (equal in all its lanes)
  int esc_seen = 0;
  bool broken = false;
  const int o_channels = o.heads * o.head_dim;
  const int64_t group_size = static_cast<int64_t>(o.heads) * o.tokens * o.head_dim;
  OutT* out = reinterpret_cast<OutT*>(o.out) + g * group_size;
  const int object = g / o.groups_per_object;
  // per-stream constants, read once
  const float h = (kGrid || k < 0) ? 1.f : o.half_levels[g];
  const __half* scale_g = kGrid ? nullptr : o.scale + static_cast<int64_t>(g) * o.tokens;
  const __half* mult_o = kGrid ? o.mult + static_cast<int64_t>(object) * o.tokens : nullptr;
  const __half* mean_g = kGrid ? o.mean + static_cast<int64_t>(g) * o_channels : nullptr;
  const __half* step_g = kGrid ? o.step + static_cast<int64_t>(g) * o_channels : nullptr;
  const int16_t* members = kGrid ? o.members + col_off : nullptr;
  // running (row, column), CDF row offset and raw bit offset of symbol i = step * L + j, advanced each step
  int col = j % width, row = j / width, rmod = j % period;
  // a step advances i by L: by L / width rows and L % width columns (and L % period CDF rows), so the loop
  // needs no division
  const int row_step = L / width, col_step = L % width, rmod_step = L % period;
  // output position of a channel: head_dim is a power of two in every model kvcast knows (else divide)
  const int hd_shift = (o.head_dim & (o.head_dim - 1)) == 0 ? __ffs(o.head_dim) - 1 : -1;
  const int64_t token_stride = o.head_dim;
  const int64_t head_stride = static_cast<int64_t>(o.tokens) * o.head_dim;
  int64_t bitpos = static_cast<int64_t>(j) * bits;
  int last_row = -1, token = 0;
  float row_factor = 0.f;  // absmax: scale / half_levels; grid: the token's multiplier
  for (int s = 0; s < steps; ++s) {
    const bool active = s < my_steps && !broken;
    uint32_t sym = 0;
    if (active) {
      const int64_t r = row0 + rmod;
      uint32_t e;
      sym = kvrans::dec_lookup_packed(tb.entry + r * tb.width, tb.lut + r * kvrans::kPackedLutSize, x & 0xFFFFu, &e);
      x = kvrans::dec_advance(x, kvrans::packed_start(e), kvrans::packed_freq(e));
    }
    const bool need = active && x < kvrans::kStateLow;
    const unsigned ballot = __ballot_sync(kFull, need);
    if (need) {
      const int64_t at = wp + 2 * __popc(ballot & smask & below);
      if (at + 2 > re) { broken = true; fail(error, error_stream, kvrans::kTruncated, k); }
      else x = (x << 16) | load_u16(payload + at);
    }
    wp += 2 * __popc(ballot & smask);
    float value = 0.f;
    bool esc = false;
    int channel = 0;
    if (active) {
      if (row != last_row) {
        last_row = row;
        token = o.row_token[row_base + row];
        row_factor = kGrid ? __half2float(mult_o[token]) : __fdiv_rn(__half2float(scale_g[token]), h);
      }
      if (kGrid) {
        channel = members[col];
        uint32_t v = sym;
        if (bits) v = (v << bits) | raw_low(payload + raw_at, bitpos, bits);
        if (v > static_cast<uint32_t>(2 * top)) { broken = true; fail(error, error_stream, kvrans::kBadEscapes, k); }
        esc = top > 0 && (v == 0 || v == static_cast<uint32_t>(2 * top));
        const float q = static_cast<float>(static_cast<int>(v) - top);
        const float grid = __fmul_rn(row_factor, __half2float(step_g[channel]));
        value = __fadd_rn(__half2float(mean_g[channel]), __fmul_rn(q, grid));
      } else {
        channel = col_off + col;
        value = __fmul_rn(__fsub_rn(static_cast<float>(sym), h), row_factor);
        if (kDelta)
          value = __fadd_rn(value, o.anchor_x[(static_cast<int64_t>(g) * o.anchors + token / o.delta_group) * o_channels + channel]);
      }
    }
    if (kGrid) {
      const unsigned eb = __ballot_sync(kFull, active && esc);
      if (active && esc) {
        const int rank = esc_seen + __popc(eb & smask & below);
        if (rank >= n_esc) { broken = true; fail(error, error_stream, kvrans::kBadEscapes, k); }
        else value = __half2float(__ushort_as_half(static_cast<unsigned short>(load_u16(payload + outl_at + 2 * rank))));
      }
      esc_seen += __popc(eb & smask);
    }
    if (active) {
      const int hd = hd_shift >= 0 ? channel >> hd_shift : channel / o.head_dim;
      const int d = channel - hd * o.head_dim;
      out[hd * head_stride + token * token_stride + d] = cast_out<OutT>(value);
    }
    col += col_step;
    row += row_step;
    if (col >= width) { col -= width; ++row; }
    rmod += rmod_step;
    if (rmod >= period) rmod -= period;
    bitpos += static_cast<int64_t>(L) * bits;
  }
  if (k >= 0 && count > 0 && !broken) {
    if (x != kvrans::kStateLow) fail(error, error_stream, kvrans::kBadFinalState, k);
    else if (j == 0 && wp != re) fail(error, error_stream, kvrans::kTrailingBytes, k);
    else if (kGrid && j == 0 && esc_seen != n_esc) fail(error, error_stream, kvrans::kBadEscapes, k);
  }
}

// Encoder, pass 1: every lane encodes its symbols backwards (as the CPU coder does); its stream's words go into
// the scratch buffer from the stream's end towards its start, in the decoder's reading order (a step's words
// before the later steps', ascending lanes within a step); the final states go to state[t]. A symbol outside
// its CDF sets error bit 1.
__global__ void __launch_bounds__(256) encode_kernel(KvcEncodeArgs a) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  const int lane_id = threadIdx.x & 31;
  const int k = t < a.threads ? a.stream_of[t] : -1;
  const int j = k >= 0 ? a.lane_of[t] : 0;
  int L = 1, period = 1, row0 = 0;
  int64_t begin = 0, end = 0;
  if (k >= 0) { L = a.lanes[k]; period = a.period[k]; row0 = a.row0[k]; begin = a.sym_start[k]; end = a.sym_start[k + 1]; }
  const int64_t count = end - begin;
  const int first = lane_id - j;
  const unsigned smask = (L == 32) ? kFull : (((1u << L) - 1u) << first);
  const unsigned below = (1u << lane_id) - 1u;
  const int my_steps = count > j ? static_cast<int>((count - j + L - 1) / L) : 0;
  const int steps = __reduce_max_sync(kFull, my_steps);
  int64_t tail = end;  // the stream's words so far: words[tail, end)
  uint32_t x = kvrans::kStateLow;
  bool broken = false;
  for (int s = steps - 1; s >= 0; --s) {
    const bool active = s < my_steps && !broken;
    bool need = false;
    uint32_t start = 0, freq = 1;
    if (active) {
      const int64_t i = static_cast<int64_t>(s) * L + j;
      const int sym = a.symbols[begin + i];
      const int64_t r = row0 + (period == 1 ? 0 : static_cast<int>(i % period));
      if (sym < 0 || sym >= a.tb.nsym[r]) { broken = true; fail(a.error, a.error + 1, 1, k); }
      else {
        const uint32_t e = a.tb.entry[r * a.tb.width + sym];
        start = kvrans::packed_start(e);
        freq = kvrans::packed_freq(e);
        need = kvrans::enc_needs_word(x, freq);
      }
    }
    const unsigned ballot = __ballot_sync(kFull, need);
    tail -= __popc(ballot & smask);
    if (need) {
      a.words[tail + __popc(ballot & smask & below)] = static_cast<uint16_t>(x & 0xFFFFu);
      x >>= 16;
    }
    if (active && !broken) x = kvrans::enc_put(x, start, freq);
  }
  if (k >= 0) {
    a.state[t] = x;
    if (j == 0) a.word_count[k] = static_cast<int32_t>(end - tail);
  }
}

// Encoder, pass 2: stream k's bytes at offset[k] (even, as every stream's length is): its lanes' states, then
// its words, written as 16-bit little-endian units.
__global__ void __launch_bounds__(256) encode_pack_kernel(KvcEncodeArgs a, const int64_t* __restrict__ offset,
                                                          uint16_t* __restrict__ out) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  const int k = t < a.threads ? a.stream_of[t] : -1;
  if (k < 0) return;
  const int j = a.lane_of[t];
  const int L = a.lanes[k];
  uint16_t* o = out + offset[k] / 2;
  const uint32_t x = a.state[t];
  o[2 * j] = static_cast<uint16_t>(x & 0xFFFFu);
  o[2 * j + 1] = static_cast<uint16_t>(x >> 16);
  const int n = a.word_count[k];
  const uint16_t* w = a.words + a.sym_start[k + 1] - n;
  for (int i = j; i < n; i += L) o[2 * L + i] = w[i];
}

// The anchor's structure (CacheGen/LMCache's torchac_cuda): one thread per single-lane stream, a binary
// search of the CDF per symbol, bytes read one at a time, no bounds checks; symbols only.
__global__ void baseline_kernel(const uint8_t* __restrict__ payload, const int64_t* __restrict__ begin,
                                const int32_t* __restrict__ cum, int32_t width, const int32_t* __restrict__ nsym,
                                const int32_t* __restrict__ row, int32_t symbols_per_stream, int32_t streams,
                                uint8_t* __restrict__ out) {
  const int k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= streams) return;
  const uint8_t* p = payload + begin[k];
  uint32_t x = static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) | (static_cast<uint32_t>(p[2]) << 16) |
               (static_cast<uint32_t>(p[3]) << 24);
  p += 4;
  const int32_t* c = cum + static_cast<int64_t>(row[k]) * width;
  const int n = nsym[row[k]];
  for (int i = 0; i < symbols_per_stream; ++i) {
    const uint32_t slot = x & 0xFFFFu;
    int lo = 0, hi = n - 1;
    while (lo < hi) { const int mid = (lo + hi + 1) >> 1; if (static_cast<uint32_t>(c[mid]) <= slot) lo = mid; else hi = mid - 1; }
    x = kvrans::dec_advance(x, c[lo], c[lo + 1] - c[lo]);
    if (x < kvrans::kStateLow) { x = (x << 16) | p[0] | (static_cast<uint32_t>(p[1]) << 8); p += 2; }
    out[static_cast<int64_t>(k) * symbols_per_stream + i] = static_cast<uint8_t>(lo);
  }
}

}  // namespace

// ------------------------------------------------------------------------------------------- launchers

template <bool G, bool D, typename T>
static void launch(const KvcDecodeArgs& a, cudaStream_t stream) {
  const int block = 256;
  const int blocks = (a.threads + block - 1) / block;
  decode_kernel<G, D, T><<<blocks, block, 0, stream>>>(a.payload, a.st, a.tb, a.o, a.stream_of, a.lane_of, a.threads,
                                                       a.error, a.error_stream);
}

template <bool G, bool D>
static void launch_dtype(const KvcDecodeArgs& a, cudaStream_t stream) {
  if (a.out_dtype == 0) launch<G, D, __half>(a, stream);
  else if (a.out_dtype == 1) launch<G, D, __nv_bfloat16>(a, stream);
  else launch<G, D, float>(a, stream);
}

extern "C" int kvc_decode(const KvcDecodeArgs* a, cudaStream_t stream) {
  if (a->threads <= 0) return 0;
  if (a->grid) launch_dtype<true, false>(*a, stream);
  else if (a->delta) launch_dtype<false, true>(*a, stream);
  else launch_dtype<false, false>(*a, stream);
  return static_cast<int>(cudaGetLastError());
}

extern "C" int kvc_baseline(const uint8_t* payload, const int64_t* begin, const int32_t* cum, int32_t width,
                            const int32_t* nsym, const int32_t* row, int32_t symbols_per_stream, int32_t streams,
                            uint8_t* out, cudaStream_t stream) {
  baseline_kernel<<<(streams + 127) / 128, 128, 0, stream>>>(payload, begin, cum, width, nsym, row, symbols_per_stream,
                                                             streams, out);
  return static_cast<int>(cudaGetLastError());
}

extern "C" int kvc_encode(const KvcEncodeArgs* a, const int64_t* offset, uint16_t* out, cudaStream_t stream) {
  if (a->threads <= 0) return 0;
  const int blocks = (a->threads + 255) / 256;
  if (offset == nullptr) encode_kernel<<<blocks, 256, 0, stream>>>(*a);
  else encode_pack_kernel<<<blocks, 256, 0, stream>>>(*a, offset, out);
  return static_cast<int>(cudaGetLastError());
}

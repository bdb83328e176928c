// The arguments of kvcast's CUDA decode launch (rans_cuda.cu), shared with its torch binding
// (rans_cuda_bind.cpp) so both sides see one layout.
// Copyright (C) 2026 the kvcast authors. GPL-3.0-or-later.
#pragma once
#include <cuda_fp16.h>
#include <stdint.h>

namespace kvrans {

struct Streams {
  const int64_t* rans_begin;   // byte offsets into the payload
  const int64_t* rans_end;
  const int32_t* count;        // symbols
  const int32_t* lanes;
  const int32_t* row0;         // CDF row of symbol i: row0 + i % period
  const int32_t* period;
  const int32_t* group;        // output group (object, K/V, layer) over the batch
  const int32_t* row_base;     // index (into row_token) of the stream's first coded row
  const int32_t* width;        // symbols per row
  const int32_t* col_off;      // grid: offset into members; absmax: first channel
  // grid levels
  const int64_t* raw_begin;    // packed low bits (MSB first), count * bits of them
  const int64_t* outl_begin;   // escaped values, fp16 little-endian, in stream order
  const int32_t* n_esc;
  const int32_t* top;
  const int32_t* bits;
};

struct Tables {
  const uint32_t* entry;       // [R, W]: start | (freq - 1) << 16 per symbol (rans_core.h)
  int32_t width;
  const uint8_t* lut;          // [R, kPackedLutSize]
  const int32_t* nsym;         // [R]
};

struct Output {
  void* out;                   // [groups, heads, tokens, head_dim] of the output dtype
  int32_t heads, tokens, head_dim, groups_per_object;
  const int32_t* row_token;    // coded row -> token
  // grid
  const int16_t* members;      // channel of (class offset + column)
  const __half* mean;          // [groups, C]
  const __half* step;          // [groups, C]
  const __half* mult;          // [objects, tokens]
  // absmax
  const __half* scale;         // [groups, tokens]
  const float* half_levels;    // [groups]
  const float* anchor_x;       // [groups, anchors, C] (delta levels) or null
  int32_t delta_group, anchors;
};

struct KvcEncodeArgs {
  const int16_t* symbols;      // flat, stream k's at sym_start[k]..sym_start[k + 1]
  const int64_t* sym_start;    // [S + 1]
  const int32_t* lanes;        // [S]
  const int32_t* row0;
  const int32_t* period;
  Tables tb;
  const int32_t* stream_of;
  const int8_t* lane_of;
  int32_t threads;
  uint16_t* words;             // scratch [N]: stream k's words end at sym_start[k + 1]
  int32_t* word_count;         // [S], zeroed
  uint32_t* state;             // [threads]: each lane's final encoder state
  int32_t* error;              // [2]: flags, first stream
};

struct KvcDecodeArgs {
  const uint8_t* payload;
  Streams st;
  Tables tb;
  Output o;
  const int32_t* stream_of;
  const int8_t* lane_of;
  int32_t threads;
  int32_t* error;
  int32_t* error_stream;
  int32_t grid;       // 1: grid level, 0: absmax
  int32_t delta;      // absmax with anchors
  int32_t out_dtype;  // 0 fp16, 1 bf16, 2 fp32
};

}  // namespace kvrans

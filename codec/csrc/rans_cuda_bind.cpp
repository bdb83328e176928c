// Python binding of kvcast's CUDA coder (rans_cuda.cu): torch tensors in, kernel launches on the current stream.
// Copyright (C) 2026 the kvcast authors. GPL-3.0-or-later.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <cuda_fp16.h>

#include "rans_core.h"
#include "rans_cuda_args.h"

#include <vector>

using kvrans::KvcDecodeArgs;
using kvrans::KvcEncodeArgs;

extern "C" int kvc_decode(const KvcDecodeArgs*, cudaStream_t);
extern "C" int kvc_encode(const KvcEncodeArgs*, const int64_t*, uint16_t*, cudaStream_t);
extern "C" int kvc_baseline(const uint8_t*, const int64_t*, const int32_t*, int32_t, const int32_t*, const int32_t*,
                            int32_t, int32_t, uint8_t*, cudaStream_t);

template <typename T> static const T* ptr(const torch::Tensor& t) { return t.numel() ? t.data_ptr<T>() : nullptr; }
static const __half* hptr(const torch::Tensor& t) {
  return t.numel() ? reinterpret_cast<const __half*>(t.data_ptr<at::Half>()) : nullptr;
}

static void check(int code, const char* what) {
  TORCH_CHECK(code == 0, what, ": CUDA error ", code, " (", cudaGetErrorString(static_cast<cudaError_t>(code)), ")");
}

// streams: dict of int tensors (see rans_cuda.cu's Streams); out: [groups, heads, tokens, head_dim].
static kvrans::Tables tables(const torch::Tensor& entry, const torch::Tensor& lut, const torch::Tensor& nsym) {
  TORCH_CHECK(entry.dim() == 2 && entry.scalar_type() == torch::kInt32 && lut.dim() == 2 &&
              lut.size(0) == entry.size(0) && lut.size(1) == kvrans::kPackedLutSize && nsym.size(0) == entry.size(0),
              "tables: entry int32 [R, W], lut uint8 [R, 64], nsym int32 [R]");
  return {reinterpret_cast<const uint32_t*>(ptr<int32_t>(entry)), static_cast<int32_t>(entry.size(1)),
          ptr<uint8_t>(lut), ptr<int32_t>(nsym)};
}

// entry, lut, nsym: `kvcast.codec.gpu.packed_tables`
void decode(torch::Tensor payload, std::vector<torch::Tensor> s, torch::Tensor entry, torch::Tensor lut,
            torch::Tensor nsym, torch::Tensor out, int64_t groups_per_object, torch::Tensor row_token,
            torch::Tensor members, torch::Tensor mean, torch::Tensor step, torch::Tensor mult, torch::Tensor scale,
            torch::Tensor half_levels, torch::Tensor anchor_x, int64_t delta_group, torch::Tensor stream_of,
            torch::Tensor lane_of, torch::Tensor error, int64_t grid) {
  TORCH_CHECK(s.size() == 15, "15 stream tensors expected");
  KvcDecodeArgs a{};
  a.payload = ptr<uint8_t>(payload);
  a.st = {ptr<int64_t>(s[0]), ptr<int64_t>(s[1]), ptr<int32_t>(s[2]), ptr<int32_t>(s[3]), ptr<int32_t>(s[4]),
          ptr<int32_t>(s[5]), ptr<int32_t>(s[6]), ptr<int32_t>(s[7]), ptr<int32_t>(s[8]), ptr<int32_t>(s[9]),
          ptr<int64_t>(s[10]), ptr<int64_t>(s[11]), ptr<int32_t>(s[12]), ptr<int32_t>(s[13]), ptr<int32_t>(s[14])};
  a.tb = tables(entry, lut, nsym);
  a.o.out = out.data_ptr();
  a.o.heads = static_cast<int32_t>(out.size(1));
  a.o.tokens = static_cast<int32_t>(out.size(2));
  a.o.head_dim = static_cast<int32_t>(out.size(3));
  a.o.groups_per_object = static_cast<int32_t>(groups_per_object);
  a.o.row_token = ptr<int32_t>(row_token);
  a.o.members = members.numel() ? members.data_ptr<int16_t>() : nullptr;
  a.o.mean = hptr(mean);
  a.o.step = hptr(step);
  a.o.mult = hptr(mult);
  a.o.scale = hptr(scale);
  a.o.half_levels = ptr<float>(half_levels);
  a.o.anchor_x = ptr<float>(anchor_x);
  a.o.delta_group = static_cast<int32_t>(delta_group);
  a.o.anchors = anchor_x.dim() == 3 ? static_cast<int32_t>(anchor_x.size(1)) : 0;
  a.stream_of = ptr<int32_t>(stream_of);
  a.lane_of = lane_of.numel() ? lane_of.data_ptr<int8_t>() : nullptr;
  a.threads = static_cast<int32_t>(stream_of.numel());
  a.error = error.data_ptr<int32_t>();
  a.error_stream = error.data_ptr<int32_t>() + 1;
  a.grid = static_cast<int32_t>(grid);
  a.delta = anchor_x.numel() > 0;
  a.out_dtype = out.scalar_type() == torch::kHalf ? 0 : out.scalar_type() == torch::kBFloat16 ? 1 : 2;
  check(kvc_decode(&a, at::cuda::getCurrentCUDAStream()), "decode");
}

torch::Tensor baseline(torch::Tensor payload, torch::Tensor begin, torch::Tensor cum, torch::Tensor nsym,
                       torch::Tensor row, int64_t symbols_per_stream) {
  auto out = torch::empty({begin.size(0), symbols_per_stream}, payload.options());
  check(kvc_baseline(ptr<uint8_t>(payload), ptr<int64_t>(begin), ptr<int32_t>(cum), static_cast<int32_t>(cum.size(1)),
                     ptr<int32_t>(nsym), ptr<int32_t>(row), static_cast<int32_t>(symbols_per_stream),
                     static_cast<int32_t>(begin.size(0)), out.data_ptr<uint8_t>(), at::cuda::getCurrentCUDAStream()),
        "baseline");
  return out;
}

// Encode streams of device symbols (int16, flat); geometry as the CPU coder's (sym_start int64 [S + 1], lanes,
// row0, period int32 [S]), tables as for decode, launch geometry (stream_of, lane_of) as the decoder's.
// Returns (bytes uint8 [total], lengths int64 [S], error int32 [2]: flags, first stream), all on the device.
std::vector<torch::Tensor> encode(torch::Tensor symbols, torch::Tensor sym_start, torch::Tensor lanes, torch::Tensor row0,
                                  torch::Tensor period, torch::Tensor entry, torch::Tensor lut, torch::Tensor nsym,
                                  torch::Tensor stream_of, torch::Tensor lane_of) {
  TORCH_CHECK(symbols.scalar_type() == torch::kInt16 && symbols.dim() == 1, "symbols: int16 [N]");
  const int64_t streams = lanes.size(0);
  TORCH_CHECK(sym_start.size(0) == streams + 1, "sym_start: int64 [S + 1]");
  auto opts = symbols.options();
  auto words = torch::empty({std::max<int64_t>(symbols.size(0), 1)}, opts);
  auto word_count = torch::zeros({streams}, opts.dtype(torch::kInt32));
  auto state = torch::empty({std::max<int64_t>(stream_of.size(0), 1)}, opts.dtype(torch::kInt32));
  auto error = torch::zeros({2}, opts.dtype(torch::kInt32));
  KvcEncodeArgs a{};
  a.symbols = ptr<int16_t>(symbols);
  a.sym_start = ptr<int64_t>(sym_start);
  a.lanes = ptr<int32_t>(lanes);
  a.row0 = ptr<int32_t>(row0);
  a.period = ptr<int32_t>(period);
  a.tb = tables(entry, lut, nsym);
  a.stream_of = ptr<int32_t>(stream_of);
  a.lane_of = lane_of.numel() ? lane_of.data_ptr<int8_t>() : nullptr;
  a.threads = static_cast<int32_t>(stream_of.numel());
  a.words = reinterpret_cast<uint16_t*>(words.data_ptr<int16_t>());
  a.word_count = word_count.data_ptr<int32_t>();
  a.state = reinterpret_cast<uint32_t*>(state.data_ptr<int32_t>());
  a.error = error.data_ptr<int32_t>();
  error[1].fill_(2147483647);
  auto stream = at::cuda::getCurrentCUDAStream();
  check(kvc_encode(&a, nullptr, nullptr, stream), "encode");
  auto lengths = torch::where((sym_start.slice(0, 1) - sym_start.slice(0, 0, streams)).gt(0),
                              lanes.to(torch::kInt64) * 4 + word_count.to(torch::kInt64) * 2,
                              torch::zeros({}, opts.dtype(torch::kInt64)));
  auto offset = lengths.cumsum(0) - lengths;
  // one device-to-host copy of the total, the only synchronisation
  const int64_t total = streams ? (offset[streams - 1] + lengths[streams - 1]).item<int64_t>() : 0;
  auto out = torch::empty({total / 2 + 1}, opts);
  check(kvc_encode(&a, offset.data_ptr<int64_t>(), reinterpret_cast<uint16_t*>(out.data_ptr<int16_t>()), stream),
        "encode (pack)");
  return {out.view(torch::kUInt8).slice(0, 0, total), lengths, error};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("encode", &encode);
  m.def("decode", &decode);
  m.def("baseline", &baseline);
}

#!/usr/bin/env node
// trtserve from Node.js: ModelMetadata, Infer and Stats over trtserve.v1.
//
// The .proto is loaded at run time (no generated code), tensors are built by
// hand as {name, dtype, shape, data}: raw little-endian bytes, row-major. That
// is all any language needs. Prints one JSON object on stdout; on a gRPC error
// prints the status on stderr and exits 1 (2 for bad arguments).
//
//   node client.js --url localhost:8001 --model example --rows 4
//
// Input element i of every input is Math.fround(Math.sin(i)), so a run is
// reproducible and can be checked against any other runtime.
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const USAGE = `usage: node client.js [--url HOST:PORT] [--model NAME] [--rows N]
                      [--timeout-ms MS] [--proto-root DIR]

  --url         trtserve's gRPC address (default localhost:8001)
  --model       model to call (default example)
  --rows        rows (batch dimension) of the request (default 4)
  --timeout-ms  deadline of each call (default 10000)
  --proto-root  folder holding trtserve/v1/inference.proto (default ../../protos)

  TRTSERVE_AUTH_TOKEN, if set, is sent as "authorization: Bearer <token>".`;

const PROTO_FILE = 'trtserve/v1/inference.proto';

// Element size and a little-endian reader for every DataType of the proto.
const DTYPES = {
  DATA_TYPE_BOOL: { size: 1, read: (v, o) => v.getUint8(o) !== 0 },
  DATA_TYPE_UINT8: { size: 1, read: (v, o) => v.getUint8(o) },
  DATA_TYPE_INT8: { size: 1, read: (v, o) => v.getInt8(o) },
  DATA_TYPE_INT16: { size: 2, read: (v, o) => v.getInt16(o, true) },
  DATA_TYPE_UINT16: { size: 2, read: (v, o) => v.getUint16(o, true) },
  DATA_TYPE_INT32: { size: 4, read: (v, o) => v.getInt32(o, true) },
  DATA_TYPE_UINT32: { size: 4, read: (v, o) => v.getUint32(o, true) },
  DATA_TYPE_INT64: { size: 8, read: (v, o) => bigToJson(v.getBigInt64(o, true)) },
  DATA_TYPE_UINT64: { size: 8, read: (v, o) => bigToJson(v.getBigUint64(o, true)) },
  DATA_TYPE_FP16: { size: 2, read: (v, o) => halfToNumber(v.getUint16(o, true)) },
  // BF16 is the upper 16 bits of the FP32 bit pattern.
  DATA_TYPE_BF16: { size: 2, read: (v, o) => bf16ToNumber(v.getUint16(o, true)) },
  DATA_TYPE_FP32: { size: 4, read: (v, o) => v.getFloat32(o, true) },
  DATA_TYPE_FP64: { size: 8, read: (v, o) => v.getFloat64(o, true) },
};

class UsageError extends Error {}

function parseArgs(argv) {
  const args = {
    url: 'localhost:8001',
    model: 'example',
    rows: 4,
    timeoutMs: 10000,
    protoRoot: path.resolve(__dirname, '..', '..', 'protos'),
  };
  const names = {
    '--url': 'url', '--model': 'model', '--rows': 'rows',
    '--timeout-ms': 'timeoutMs', '--proto-root': 'protoRoot',
  };
  for (let i = 0; i < argv.length; i += 1) {
    if (argv[i] === '-h' || argv[i] === '--help') {
      console.log(USAGE);
      process.exit(0);
    }
    const [flag, inline] = argv[i].split(/=(.*)/s, 2);
    const key = names[flag];
    if (key === undefined) throw new UsageError(`unknown argument ${JSON.stringify(argv[i])}`);
    const value = inline !== undefined ? inline : argv[(i += 1)];
    if (value === undefined) throw new UsageError(`${flag} needs a value`);
    args[key] = value;
  }
  for (const key of ['rows', 'timeoutMs']) {
    const n = Number(args[key]);
    if (!Number.isInteger(n) || n < 1) {
      throw new UsageError(`--${key === 'rows' ? 'rows' : 'timeout-ms'}: expected a positive integer, got ${JSON.stringify(args[key])}`);
    }
    args[key] = n;
  }
  return args;
}

function loadService(protoRoot) {
  const definition = protoLoader.loadSync(PROTO_FILE, {
    includeDirs: [protoRoot],
    keepCase: true, // field names exactly as in the .proto
    longs: Number, // int64 shapes and uint64 counters as JS numbers
    enums: String, // dtype as "DATA_TYPE_FP32"
    defaults: true, // zero-valued fields present in responses
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).trtserve.v1.InferenceService;
}

// One unary call as a promise; a gRPC error keeps its code and gains the RPC name.
function call(client, rpc, request, metadata, timeoutMs) {
  return new Promise((resolve, reject) => {
    client[rpc](request, metadata, { deadline: Date.now() + timeoutMs }, (err, response) => {
      if (err) {
        err.rpc = rpc;
        reject(err);
      } else {
        resolve(response);
      }
    });
  });
}

// An FP32 tensor: shape [rows, ...fixed dims], element i = sin(i), little-endian bytes.
function buildInput(meta, rows) {
  if (meta.dtype !== 'DATA_TYPE_FP32') {
    throw new UsageError(`input ${meta.name} is ${meta.dtype}; this example builds FP32 inputs only`);
  }
  const rest = meta.shape.slice(1);
  if (rest.some((d) => d < 0)) {
    throw new UsageError(`input ${meta.name} has shape [${meta.shape}]; this example fills only the batch dimension`);
  }
  const shape = [rows, ...rest];
  const values = new Float32Array(shape.reduce((a, b) => a * b, 1));
  for (let i = 0; i < values.length; i += 1) values[i] = Math.sin(i);
  // Explicit little-endian writes, so the bytes are right on any host.
  const data = Buffer.alloc(values.length * 4);
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  values.forEach((x, i) => view.setFloat32(i * 4, x, true));
  return { name: meta.name, dtype: 'DATA_TYPE_FP32', shape, data };
}

function decodeTensor(tensor) {
  const dtype = DTYPES[tensor.dtype];
  if (dtype === undefined) throw new Error(`output ${tensor.name}: unknown dtype ${tensor.dtype}`);
  const count = tensor.shape.reduce((a, b) => a * b, 1);
  const bytes = tensor.data;
  if (bytes.length !== count * dtype.size) {
    throw new Error(`output ${tensor.name}: ${bytes.length} bytes for shape [${tensor.shape}] of ${tensor.dtype}`);
  }
  // A DataView reads at any byte offset; typed arrays would need the data aligned.
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const data = new Array(count);
  for (let i = 0; i < count; i += 1) data[i] = dtype.read(view, i * dtype.size);
  return { name: tensor.name, dtype: tensor.dtype, shape: tensor.shape, data };
}

function bigToJson(b) {
  return b >= BigInt(Number.MIN_SAFE_INTEGER) && b <= BigInt(Number.MAX_SAFE_INTEGER)
    ? Number(b) : b.toString();
}

function halfToNumber(h) {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * frac * 2 ** -24;
  if (exp === 0x1f) return frac ? NaN : sign * Infinity;
  return sign * (1 + frac / 1024) * 2 ** (exp - 15);
}

function bf16ToNumber(b) {
  const view = new DataView(new ArrayBuffer(4));
  view.setUint32(0, b << 16);
  return view.getFloat32(0);
}

function summarizeStats(m) {
  return {
    requests: m.requests,
    batches: m.batches,
    inferences: m.inferences,
    errors: m.errors,
    mean_batch_size: m.mean_batch_size,
    queue_depth: m.queue_depth,
    queue_time_p50_us: m.queue_time ? m.queue_time.p50_us : null,
    compute_time_p50_us: m.compute_time ? m.compute_time.p50_us : null,
    workers: m.workers.map((w) => ({
      index: w.index,
      profile: w.profile,
      device: w.device,
      requests: w.requests,
      batches: w.batches,
      utilization: w.utilization,
    })),
  };
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const InferenceService = loadService(args.protoRoot);
  const client = new InferenceService(args.url, grpc.credentials.createInsecure(), {
    'grpc.max_receive_message_length': 256 * 1024 * 1024,
    'grpc.max_send_message_length': 256 * 1024 * 1024,
  });
  const metadata = new grpc.Metadata();
  if (process.env.TRTSERVE_AUTH_TOKEN) {
    metadata.set('authorization', `Bearer ${process.env.TRTSERVE_AUTH_TOKEN}`);
  }
  try {
    const meta = await call(client, 'ModelMetadata', { model: args.model }, metadata, args.timeoutMs);
    const inputs = meta.inputs.map((m) => buildInput(m, args.rows));

    const started = process.hrtime.bigint();
    const response = await call(client, 'Infer', { model: args.model, id: 'node-1', inputs },
      metadata, args.timeoutMs);
    const inferMs = Number(process.hrtime.bigint() - started) / 1e6;

    const stats = await call(client, 'Stats', { model: args.model }, metadata, args.timeoutMs);
    const modelStats = stats.models.find((m) => m.name === args.model);
    if (modelStats === undefined) throw new Error(`Stats has no entry for model ${args.model}`);

    const result = {
      url: args.url,
      model: meta.name,
      backend: meta.backend,
      id: response.id,
      inputs: inputs.map((t) => ({ name: t.name, dtype: t.dtype, shape: t.shape })),
      outputs: response.outputs.map(decodeTensor),
      infer_ms: inferMs,
      stats: summarizeStats(modelStats),
    };
    process.stdout.write(`${JSON.stringify(result)}\n`);
  } finally {
    client.close();
  }
}

main().catch((err) => {
  if (err instanceof UsageError) {
    process.stderr.write(`trtserve-node-client: ${err.message}\n${USAGE}\n`);
    process.exit(2);
  }
  if (typeof err.code === 'number' && err.rpc) {
    const status = Object.keys(grpc.status).find((k) => grpc.status[k] === err.code);
    process.stderr.write(`trtserve-node-client: ${err.rpc} failed: ${status} (${err.code}): ${err.details}\n`);
  } else {
    process.stderr.write(`trtserve-node-client: ${err.stack || err}\n`);
  }
  process.exit(1);
});

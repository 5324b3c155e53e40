// A whole webgpu artifact run through tvmjs (TVM's JavaScript runtime) on Dawn
// for Node (npm `webgpu`), as a web page would run it: model.wasm instantiated by
// tvmjs, tvmjs's own tensor-cache loader, its VM, the paged KV cache and the RNN
// state of the wasm runtime.  Driven by parity/emulators/web_model.py.
//
// Protocol: one JSON request per stdin line, one JSON reply per stdout line
// ({"ok": true, ...} or {"ok": false, "error": "..."}); logits travel through files.
//   {"op": "open", "artifact": DIR, "wasm": FILE, "params": [names],
//    "vision_params": [names] | null, "sizes": {...}}
//   {"op": "add", "seq": N}            {"op": "remove", "seq": N}
//   {"op": "forward", "func": "prefill" | "prefill_all_logits" | "decode",
//    "seqs": [..], "lengths": [..], "offsets": [..] (int32, [b, n, 3]), "shape": [b, n],
//    "tokens": [..] | "embeds": FILE (model dtype, [b * n, hidden]), "out": FILE}
//        -> logits written to FILE, reply {shape, dtype, seconds}
//   {"op": "embed", "tokens": [..], "out": FILE}                 -> token embeddings
//   {"op": "image", "pixels": FILE, "hw": [H, W], "out": FILE}  -> image embeddings
//   {"op": "call", "func": NAME, "args": [{"file", "dtype", "shape"} | {"int": N}], "out": PREFIX}
//        any other VM function without parameters (WebLLM's sampler, compile/model/webllm.py):
//        its tensor results written to PREFIX.0, PREFIX.1, ..., reply {outputs: [{shape, dtype}]};
//        a string result is replied as {value}
// (files hold a tensor's raw little-endian bytes; the reply gives shape and dtype)
//   {"op": "exit"}
// Env: QWEN35_WEBGPU_MODULE (npm webgpu's index.js), QWEN35_TVMJS (tvmjs.bundle.js).
import { readFileSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { createInterface } from 'node:readline';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { performance } from 'node:perf_hooks';

// stdout carries the protocol: anything else printed (tvmjs, the wasm runtime's own
// stdout) goes to stderr.
const reply = process.stdout.write.bind(process.stdout);
process.stdout.write = process.stderr.write.bind(process.stderr);
console.log = console.info = (...args) => process.stderr.write(args.join(' ') + '\n');
const require = createRequire(import.meta.url);
const { create, globals } = require(process.env.QWEN35_WEBGPU_MODULE || 'webgpu');
Object.assign(globalThis, globals);
// tvmjs looks for WebGPU where a browser has it.
Object.defineProperty(globalThis, 'navigator', { value: { gpu: create([]) }, configurable: true });
const tvmjs = require(process.env.QWEN35_TVMJS);

// tvmjs's tensor-cache loader reads through an "artifact cache"; this one reads the
// artifact's files from disk (a page uses the browser's Cache API over HTTP).
const fileCache = {
  async fetchWithCache(url, storetype) {
    const bytes = readFileSync(fileURLToPath(url));
    if (storetype === 'json') return JSON.parse(bytes.toString('utf8'));
    return bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
  },
  async addToCache() {},
  async hasAllKeys() { return true; },
  async deleteInCache() {},
};

let tvm, vm, params, visionParams, kv, state, device, builtins, gpuInfo, dtype;
const fn = {};

async function open(req) {
  const t0 = performance.now();
  const gpu = await tvmjs.detectGPUDevice();
  if (gpu === undefined) throw new Error('no WebGPU adapter');
  gpuInfo = gpu.adapterInfo;
  const logs = [];
  tvm = await tvmjs.instantiate(
    new Uint8Array(readFileSync(req.wasm)), tvmjs.createPolyfillWASI(), (m) => logs.push(m));
  tvm.initWebGPU(gpu.device);
  device = tvm.webgpu();
  tvm.beginScope();
  vm = tvm.detachFromCurrentScope(tvm.createVirtualMachine(device));
  for (const name of ['embed', 'prefill', 'prefill_all_logits', 'decode',
                      'create_paged_kv_cache', 'create_rnn_state']) {
    fn[name] = tvm.detachFromCurrentScope(vm.getFunction(name));
  }
  if (req.vision_params) fn.image_embed = tvm.detachFromCurrentScope(vm.getFunction('image_embed'));
  builtins = {};
  for (const name of ['add_sequence', 'remove_sequence', 'begin_forward', 'end_forward']) {
    builtins[name] = tvm.detachFromCurrentScope(tvm.getGlobalFunc(`vm.builtin.kv_state_${name}`));
  }
  tvm.endScope();
  const tLoad = performance.now();
  await tvm.fetchTensorCache(pathToFileURL(req.artifact + '/').href, device,
                             { artifactCache: fileCache });
  tvm.beginScope();
  params = tvm.detachFromCurrentScope(tvm.getParamsFromCacheByName(req.params));
  if (req.vision_params) {
    visionParams = tvm.detachFromCurrentScope(tvm.getParamsFromCacheByName(req.vision_params));
  }
  dtype = req.dtype;
  const s = req.sizes;
  kv = tvm.detachFromCurrentScope(fn.create_paged_kv_cache(
    tvm.makeShapeTuple([s.max_batch]), tvm.makeShapeTuple([s.max_total]),
    tvm.makeShapeTuple([s.prefill_chunk]), tvm.makeShapeTuple([s.page_size]),
    tvm.makeShapeTuple([0])));
  state = tvm.detachFromCurrentScope(fn.create_rnn_state(
    tvm.makeShapeTuple([s.max_batch]), tvm.makeShapeTuple([1])));
  tvm.endScope();
  await device.sync();
  const t1 = performance.now();
  return {
    adapter: gpuInfo ? { vendor: gpuInfo.vendor, architecture: gpuInfo.architecture,
                         description: gpuInfo.description } : null,
    features: [...gpu.device.features],
    max_binding: gpu.device.limits.maxStorageBufferBindingSize,
    seconds: (t1 - t0) / 1000, weights_seconds: (t1 - tLoad) / 1000, log: logs,
  };
}

function seqOp(name, seq) {
  tvm.beginScope();
  const id = tvm.scalar(seq, 'int64');
  builtins[name](kv, id);
  builtins[name](state, id);
  tvm.endScope();
  return {};
}

// A device tensor's bytes in a file (the one device-to-host copy of a call); the
// reply carries its shape and dtype.
async function toFile(tensor, out) {
  const host = tvm.empty(tensor.shape, tensor.dtype, tvm.cpu()).copyFrom(tensor);
  await device.sync();
  writeFileSync(out, host.toRawBytes());
  return { shape: [...tensor.shape], dtype: tensor.dtype };
}

function tokenEmbeddings(tokens) {  // [n, hidden] on the device
  const ids = tvm.empty([tokens.length], 'int32', device).copyFrom(new Int32Array(tokens));
  return fn.embed(ids, params);
}

async function embed(req) {
  tvm.beginScope();
  const meta = await toFile(tokenEmbeddings(req.tokens), req.out);
  tvm.endScope();
  return meta;
}

async function image(req) {
  if (!fn.image_embed) throw new Error('the artifact has no vision tower (image_embed)');
  const t0 = performance.now();
  tvm.beginScope();
  const [h, w] = req.hw;
  const bytes = new Uint8Array(readFileSync(req.pixels));
  const pixels = tvm.empty([h, w, 3], 'uint8', device).copyFromRawBytes(bytes);
  const meta = await toFile(fn.image_embed(pixels, visionParams), req.out);
  tvm.endScope();
  return { ...meta, seconds: (performance.now() - t0) / 1000 };
}

async function forward(req) {
  const t0 = performance.now();
  const [b, n] = req.shape;
  tvm.beginScope();
  let flat;
  if (req.embeds) {  // rows merged on the host (an image prompt)
    const bytes = new Uint8Array(readFileSync(req.embeds));
    const hiddenSize = bytes.length / (b * n * (dtype === 'float16' ? 2 : 4));
    flat = tvm.empty([b * n, hiddenSize], dtype, device).copyFromRawBytes(bytes);
  } else {
    flat = tokenEmbeddings(req.tokens);  // [b * n, hidden]
  }
  const hidden = flat.shape[flat.shape.length - 1];
  const embed = flat.view([b, n, hidden]);
  const offsets = tvm.empty([b, n, 3], 'int32', device).copyFrom(new Int32Array(req.offsets));
  const seqs = tvm.makeShapeTuple(req.seqs);
  const lengths = tvm.makeShapeTuple(req.lengths);
  for (const cache of [kv, state]) builtins.begin_forward(cache, seqs, lengths);
  const out = fn[req.func](embed, offsets, kv, state, params);
  const logits = out.get(0);
  for (const cache of [kv, state]) builtins.end_forward(cache);
  // The only device-to-host copy of a step: the logits the caller samples from.
  const meta = await toFile(logits, req.out);
  const t1 = performance.now();
  tvm.endScope();
  return { ...meta, seconds: (t1 - t0) / 1000 };
}

async function call(req) {
  tvm.beginScope();
  const f = vm.getFunction(req.func);
  const args = req.args.map((a) => (a.file === undefined
    ? tvm.scalar(a.int, 'int64')
    : tvm.empty(a.shape, a.dtype, device).copyFromRawBytes(new Uint8Array(readFileSync(a.file)))));
  const result = f(...args);
  let reply;
  if (typeof result === 'string' || result instanceof String) {
    reply = { value: String(result) };
  } else {
    const items = result.size === undefined || result.shape !== undefined
      ? [result] : Array.from({ length: result.size() }, (_, i) => result.get(i));
    const outputs = [];
    for (let i = 0; i < items.length; ++i) outputs.push(await toFile(items[i], `${req.out}.${i}`));
    reply = { outputs };
  }
  tvm.endScope();
  return reply;
}

const handlers = {
  open,
  call,
  add: (req) => seqOp('add_sequence', req.seq),
  remove: (req) => seqOp('remove_sequence', req.seq),
  forward,
  embed,
  image,
  exit: () => ({}),
};

const rl = createInterface({ input: process.stdin });
for await (const line of rl) {
  if (!line.trim()) continue;
  let req;
  let answer;
  try {
    req = JSON.parse(line);
    const handler = handlers[req.op];
    if (!handler) throw new Error(`unknown op ${req.op}`);
    answer = { ok: true, ...(await handler(req)) };
  } catch (err) {
    answer = { ok: false, error: String(err && err.stack ? err.stack : err) };
  }
  reply(JSON.stringify(answer) + '\n');
  if (req && req.op === 'exit') break;
}
process.exit(0);

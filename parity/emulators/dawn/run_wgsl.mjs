// Runs TVM's WGSL compute kernels on Dawn (npm `webgpu`), driven from Python
// (parity/emulators/webgpu.py) over JSON lines: one request per stdin line,
// one reply per stdout line (anything Dawn prints goes to stderr).
//
// Requests ({"id": any, "op": ...}; every reply carries the same "id"):
//   {"op": "info"}
//       -> {"ok": true, "adapter": {...}, "features": [...], "limits": {...}}
//   {"op": "check", "sources": {"name": "<wgsl>", ...}}
//       -> {"ok": true, "errors": {"name": null | "message", ...}}
//          (shader module creation + compilation info; nothing runs)
//   {"op": "run",
//    "kernels": {"key": {"code": "<wgsl>", "entry": "fn_name"}, ...}   // code may be
//             omitted for a key sent before (shader modules and pipelines are cached),
//    "buffers": [{"size": bytes, "file": "path" | null}, ...],          // null: zero-filled
//    "dispatches": [{"kernel": "key", "bind": [buffer index, ...],      // @binding(i) order
//                    "access": ["read" | "read_write", ...],            // per binding
//                    "pod": "<base64 PODArgs bytes>",                   // scalars + packGridDimX
//                    "grid": [x, y, z]}, ...],
//    "read": [[buffer index, "out path"], ...]}
//       -> {"ok": true, "ms": elapsed}   after the read-back buffers were written
//   {"op": "exit"}
// Failures reply {"ok": false, "error": "message"} and the process stays usable.
//
// The device is requested as TVM's web runtime does (tvm/web/src/webgpu.ts):
// shader-f16 (and subgroups) when the adapter has them, 10 storage buffers per
// stage, 32 KB workgroup storage, and large buffer/binding sizes.
import { readFileSync, writeFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { pathToFileURL } from 'node:url';

// The `webgpu` package lives in .emulators/node/node_modules (scripts/setup_emulators.d/webgpu.sh);
// QWEN35_WEBGPU_MODULE names its index.js (else a normal `webgpu` import).
const where = process.env.QWEN35_WEBGPU_MODULE;
const { create, globals } = await import(where ? pathToFileURL(where).href : 'webgpu');

Object.assign(globalThis, globals);

const gpu = create([]);
const adapter = await gpu.requestAdapter({ powerPreference: 'high-performance' });
if (!adapter) {
  process.stdout.write(JSON.stringify({ id: null, ok: false, fatal: true, error: 'no WebGPU adapter (Vulkan driver missing?)' }) + '\n');
  process.exit(2);
}
const clamp = (want, have) => Math.min(want, have);
const invocations = [1024, 512, 256].find((x) => x <= adapter.limits.maxComputeInvocationsPerWorkgroup);
const requiredLimits = {
  maxBufferSize: clamp(2 ** 31, adapter.limits.maxBufferSize),
  maxStorageBufferBindingSize: clamp(2 ** 30, adapter.limits.maxStorageBufferBindingSize),
  maxComputeWorkgroupStorageSize: clamp(32768, adapter.limits.maxComputeWorkgroupStorageSize),
  maxStorageBuffersPerShaderStage: clamp(10, adapter.limits.maxStorageBuffersPerShaderStage),
};
if (invocations) requiredLimits.maxComputeInvocationsPerWorkgroup = invocations;
const requiredFeatures = ['shader-f16', 'subgroups'].filter((f) => adapter.features.has(f));
const device = await adapter.requestDevice({ requiredLimits, requiredFeatures });
let uncaptured = [];
device.addEventListener('uncapturederror', (ev) => uncaptured.push(ev.error.message));
device.lost.then((info) => {
  process.stdout.write(JSON.stringify({ id: null, ok: false, fatal: true, error: `device lost: ${info.message}` }) + '\n');
  process.exit(3);
});

const info = adapter.info || {};
const adapterInfo = {
  vendor: info.vendor, architecture: info.architecture, device: info.device, description: info.description,
};

// ---------------------------------------------------------------- shaders
const modules = new Map(); // key -> {module, entry, pipelines: Map(accessKey -> pipeline)}

async function compileErrors(module) {
  const ci = await module.getCompilationInfo();
  const errs = ci.messages.filter((m) => m.type === 'error');
  if (!errs.length) return null;
  return errs.map((m) => `${m.lineNum}:${m.linePos}: ${m.message}`).join('\n');
}

async function shaderModule(code) {
  device.pushErrorScope('validation');
  const module = device.createShaderModule({ code });
  const scopeErr = await device.popErrorScope();
  const errs = await compileErrors(module);
  if (errs || scopeErr) return { module: null, error: errs || scopeErr.message };
  return { module, error: null };
}

async function kernelEntry(key, spec) {
  let k = modules.get(key);
  if (k) return k;
  if (!spec || spec.code === undefined) throw new Error(`kernel ${key}: no code sent`);
  const { module, error } = await shaderModule(spec.code);
  if (error) throw new Error(`kernel ${key}: WGSL does not compile:\n${error}`);
  k = { module, entry: spec.entry, pipelines: new Map() };
  modules.set(key, k);
  return k;
}

async function pipelineFor(k, key, access) {
  const akey = access.join(',');
  let p = k.pipelines.get(akey);
  if (p) return p;
  // Explicit layout as TVM's runtime: storage buffers in parameter order, then the uniform PODArgs.
  const entries = access.map((a, i) => ({
    binding: i,
    visibility: GPUShaderStage.COMPUTE,
    buffer: { type: a === 'read' ? 'read-only-storage' : 'storage' },
  }));
  entries.push({ binding: access.length, visibility: GPUShaderStage.COMPUTE, buffer: { type: 'uniform' } });
  const layout = device.createBindGroupLayout({ entries });
  const pipelineLayout = device.createPipelineLayout({ bindGroupLayouts: [layout] });
  device.pushErrorScope('validation');
  let pipeline;
  try {
    pipeline = await device.createComputePipelineAsync({
      layout: pipelineLayout, compute: { module: k.module, entryPoint: k.entry },
    });
  } catch (e) {
    await device.popErrorScope();
    throw new Error(`kernel ${key}: pipeline creation failed: ${e.message}`);
  }
  const err = await device.popErrorScope();
  if (err) throw new Error(`kernel ${key}: pipeline creation failed: ${err.message}`);
  p = { pipeline, layout };
  k.pipelines.set(akey, p);
  return p;
}

// ---------------------------------------------------------------- ops
async function opCheck(req) {
  const errors = {};
  for (const [name, code] of Object.entries(req.sources)) {
    try {
      const { module, error } = await shaderModule(code);
      errors[name] = error;
      void module;
    } catch (e) {
      errors[name] = String(e.message || e);
    }
  }
  return { errors };
}

const pad4 = (n) => Math.max(4, Math.ceil(n / 4) * 4);

async function opRun(req) {
  const t0 = performance.now();
  uncaptured = [];
  const kernels = req.kernels || {};
  const prepared = [];
  for (const d of req.dispatches) {
    const k = await kernelEntry(d.kernel, kernels[d.kernel]);
    prepared.push(await pipelineFor(k, d.kernel, d.access));
  }
  const usage = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;
  const buffers = req.buffers.map((b) => {
    const size = pad4(b.size);
    const buf = device.createBuffer({ size, usage });
    if (b.file) {
      const data = readFileSync(b.file);
      if (data.length !== b.size) throw new Error(`${b.file}: ${data.length} bytes, expected ${b.size}`);
      if (data.length % 4) {
        const padded = new Uint8Array(size);
        padded.set(data);
        device.queue.writeBuffer(buf, 0, padded);
      } else if (data.length) {
        device.queue.writeBuffer(buf, 0, data.buffer, data.byteOffset, data.length);
      }
    }
    return buf;
  });
  const temps = [];
  device.pushErrorScope('validation');
  const enc = device.createCommandEncoder();
  req.dispatches.forEach((d, i) => {
    const { pipeline, layout } = prepared[i];
    const pod = Buffer.from(d.pod, 'base64');
    const ubuf = device.createBuffer({ size: Math.ceil(pod.length / 16) * 16, usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST });
    device.queue.writeBuffer(ubuf, 0, pod.buffer, pod.byteOffset, pod.length);
    temps.push(ubuf);
    const entries = d.bind.map((bi, j) => ({ binding: j, resource: { buffer: buffers[bi] } }));
    entries.push({ binding: d.bind.length, resource: { buffer: ubuf, size: pod.length } });
    const pass = enc.beginComputePass();
    pass.setPipeline(pipeline);
    pass.setBindGroup(0, device.createBindGroup({ layout, entries }));
    pass.dispatchWorkgroups(d.grid[0], d.grid[1], d.grid[2]);
    pass.end();
  });
  const staging = (req.read || []).map(([bi]) => {
    const size = pad4(req.buffers[bi].size);
    const s = device.createBuffer({ size, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
    enc.copyBufferToBuffer(buffers[bi], 0, s, 0, size);
    return s;
  });
  const t1 = performance.now();
  device.queue.submit([enc.finish()]);
  const err = await device.popErrorScope();
  if (err || uncaptured.length) {
    [...buffers, ...temps, ...staging].forEach((b) => b.destroy());
    throw new Error(`dispatch failed: ${err ? err.message : uncaptured.join('\n')}`);
  }
  try {
    await Promise.all(staging.map((s) => s.mapAsync(GPUMapMode.READ)));
    if (process.env.QWEN35_DAWN_TIMING) console.error(`prep ${t1 - t0} ms, gpu+map ${performance.now() - t1} ms`);
    (req.read || []).forEach(([bi, path], j) => {
      const bytes = new Uint8Array(staging[j].getMappedRange(), 0, req.buffers[bi].size);
      writeFileSync(path, bytes);
      staging[j].unmap();
    });
  } finally {
    [...buffers, ...temps, ...staging].forEach((b) => b.destroy());
  }
  if (uncaptured.length) throw new Error(`GPU error: ${uncaptured.join('\n')}`);
  return { ms: performance.now() - t0 };
}

const ops = {
  info: async () => ({ adapter: adapterInfo, features: [...device.features], limits: Object.fromEntries(
    Object.keys(requiredLimits).concat(['maxComputeWorkgroupsPerDimension']).map((k) => [k, device.limits[k]])) }),
  check: opCheck,
  run: opRun,
  forget: async () => { modules.clear(); return {}; },
};

process.stdout.write(JSON.stringify({ id: 'ready', ok: true }) + '\n');
// Requests are handled one at a time, in order, from this top-level loop (Dawn's
// promises -- getCompilationInfo, mapAsync -- did not settle when awaited from a
// readline 'line' callback).
const rl = createInterface({ input: process.stdin, crlfDelay: Infinity });
for await (const line of rl) {
  if (!line.trim()) continue;
  let req;
  try {
    req = JSON.parse(line);
  } catch (e) {
    process.stdout.write(JSON.stringify({ id: null, ok: false, error: `bad request: ${e.message}` }) + '\n');
    continue;
  }
  if (req.op === 'exit') break;
  let reply;
  // Keep the event loop turning while Dawn's promises are pending: without a timer
  // a request sometimes waited forever on one (mapAsync, getCompilationInfo).
  const pump = setInterval(() => {}, 1);
  try {
    const op = ops[req.op];
    if (!op) throw new Error(`unknown op ${req.op}`);
    reply = { id: req.id, ok: true, ...(await op(req)) };
  } catch (e) {
    reply = { id: req.id, ok: false, error: String((e && e.message) || e) };
  } finally {
    clearInterval(pump);
  }
  process.stdout.write(JSON.stringify(reply) + '\n');
}
device.destroy();
process.exit(0);

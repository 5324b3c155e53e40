// The chat page of `qwen35-mobile serve ARTIFACT`: loads the artifact's model.wasm
// with tvmjs (TVM's web runtime), its weights with tvmjs's tensor-cache loader
// (kept in the browser's Cache API), the tokenizer with @mlc-ai/web-tokenizers,
// and generates greedily on WebGPU, streaming tokens and showing tokens/s.
// Per decode step only the logits row comes back to the page (argmax here).
//
// URL parameters (the tests and scripts/bench_web.py use them): ?prompt=TEXT&max=N runs one
// turn on load (&runs=K: K times); the outcome lands in window.qwen35Result
// {prompt_ids, tokens, text, prefill_tps, decode_tps, first, runs}; &nosw: no service worker.
/* global tvmjs, tokenizers */
'use strict';

const $ = (id) => document.getElementById(id);
const status = (text) => { $('status').textContent = text; };

function chatPrompt(user) {  // bindings/model.py chat_prompt, thinking off
  return `<|im_start|>user\n${user}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n`;
}

class WebModel {
  async load(base) {
    const t0 = performance.now();
    const json = async (name) => (await fetch(base + name)).json();
    this.manifest = await json('manifest.json');
    this.chat = await json('mlc-chat-config.json');
    if (!this.manifest.wasm) throw new Error('the artifact has no model.wasm (compile it with the web runtime set up)');
    $('model').textContent = `${this.manifest.model} ${this.manifest.quantization} (${this.manifest.dtype}), ` +
      `model.wasm ${(this.manifest.wasm_bytes / 2 ** 20).toFixed(1)} MiB`;
    status('tokenizer...');
    this.tokenizer = await tokenizers.Tokenizer.fromJSON(await (await fetch(base + 'tokenizer.json')).arrayBuffer());
    status('WebGPU adapter...');
    const gpu = await tvmjs.detectGPUDevice();
    if (gpu === undefined) throw new Error('this browser has no WebGPU adapter');
    if (this.manifest.dtype === 'float16' && !gpu.device.features.has('shader-f16')) {
      throw new Error('this float16 build needs shader-f16, which the adapter lacks: use a q0f32 / q4f32_1 build');
    }
    status('model.wasm...');
    const wasm = await (await fetch(base + this.manifest.wasm)).arrayBuffer();
    const tvm = this.tvm = await tvmjs.instantiate(new Uint8Array(wasm), tvmjs.createPolyfillWASI(), console.log);
    tvm.initWebGPU(gpu.device);
    tvm.registerInitProgressCallback((report) => status(report.text));
    this.device = tvm.webgpu();
    tvm.beginScope();
    const vm = tvm.detachFromCurrentScope(tvm.createVirtualMachine(this.device));
    this.fn = {};
    for (const name of ['embed', 'prefill', 'decode', 'create_paged_kv_cache', 'create_rnn_state']) {
      this.fn[name] = tvm.detachFromCurrentScope(vm.getFunction(name));
    }
    this.kv_state = {};
    for (const name of ['add_sequence', 'remove_sequence', 'begin_forward', 'end_forward']) {
      this.kv_state[name] = tvm.detachFromCurrentScope(tvm.getGlobalFunc(`vm.builtin.kv_state_${name}`));
    }
    tvm.endScope();
    await tvm.fetchTensorCache(new URL(base, location.href).href, this.device, { cacheScope: 'qwen35-mobile' });
    tvm.beginScope();
    const names = (this.manifest.entry_points.text || {}).parameters;
    this.params = tvm.detachFromCurrentScope(tvm.getParamsFromCacheByName(names));
    this.window = this.chat.context_window_size;
    this.chunk = Math.min(this.chat.prefill_chunk_size, this.window);
    const shape = (n) => tvm.makeShapeTuple([n]);
    this.kv = tvm.detachFromCurrentScope(this.fn.create_paged_kv_cache(
      shape(1), shape(this.window), shape(this.chunk), shape(16), shape(0)));
    this.state = tvm.detachFromCurrentScope(this.fn.create_rnn_state(shape(1), shape(1)));
    tvm.endScope();
    await this.device.sync();
    this.loadSeconds = (performance.now() - t0) / 1000;
    this.nextSeq = 0;
  }

  // One forward call of `func` over `ids` appended to sequence `seq`: the last logits row.
  async forward(func, seq, ids) {
    const tvm = this.tvm;
    tvm.beginScope();
    const tokens = tvm.empty([ids.length], 'int32', this.device).copyFrom(Int32Array.from(ids));
    const flat = this.fn.embed(tokens, this.params);
    const embed = flat.view([1, ids.length, flat.shape[1]]);
    // text only: every token's M-RoPE position is its index (offsets 0)
    const offsets = tvm.empty([1, ids.length, 3], 'int32', this.device)
      .copyFrom(new Int32Array(ids.length * 3));
    const seqs = tvm.makeShapeTuple([seq]);
    const lengths = tvm.makeShapeTuple([ids.length]);
    for (const cache of [this.kv, this.state]) this.kv_state.begin_forward(cache, seqs, lengths);
    const out = this.fn[func](embed, offsets, this.kv, this.state, this.params);
    for (const cache of [this.kv, this.state]) this.kv_state.end_forward(cache);
    const logits = out.get(0);
    const vocab = logits.shape[logits.shape.length - 1];
    const row = logits.view([vocab]);  // prefill returns the last position only; decode has one
    const host = tvm.empty([vocab], 'float32', tvm.cpu()).copyFrom(row);
    await this.device.sync();
    const values = host.toArray();
    tvm.endScope();
    return values;
  }

  // Greedy generation; onToken(ids so far) after each token.  Returns tokens and timings.
  async generate(promptIds, maxNew, onToken) {
    if (promptIds.length + maxNew > this.window) {
      throw new Error(`${promptIds.length} prompt tokens + ${maxNew} new exceed the context window of ${this.window}`);
    }
    const seq = this.nextSeq++;
    const tvm = this.tvm;
    const id = () => tvm.scalar(seq, 'int64');
    tvm.beginScope();
    for (const cache of [this.kv, this.state]) this.kv_state.add_sequence(cache, id());
    tvm.endScope();
    const stop = new Set([this.chat.eos_token_id].flat().filter((x) => x !== undefined));
    try {
      let t = performance.now();
      let logits;
      for (let i = 0; i < promptIds.length; i += this.chunk) {
        logits = await this.forward('prefill', seq, promptIds.slice(i, i + this.chunk));
      }
      const prefillSeconds = (performance.now() - t) / 1000;
      const tokens = [];
      t = performance.now();
      for (let step = 0; step < maxNew; ++step) {
        let best = 0;
        for (let v = 1; v < logits.length; ++v) if (logits[v] > logits[best]) best = v;
        tokens.push(best);
        onToken(tokens);
        if (stop.has(best) || step + 1 === maxNew) break;
        logits = await this.forward('decode', seq, [best]);
      }
      const decodeSeconds = (performance.now() - t) / 1000;
      return {
        tokens,
        prefill_tps: promptIds.length / prefillSeconds,
        decode_tps: tokens.length > 1 ? (tokens.length - 1) / decodeSeconds : null,
      };
    } finally {
      tvm.beginScope();
      for (const cache of [this.kv, this.state]) this.kv_state.remove_sequence(cache, id());
      tvm.endScope();
    }
  }
}

const model = new WebModel();

async function turn(user, maxNew) {
  const log = $('log');
  const you = document.createElement('div');
  you.className = 'user';
  you.textContent = user;
  const reply = document.createElement('div');
  reply.className = 'assistant';
  log.append(you, reply);
  const promptIds = Array.from(model.tokenizer.encode(chatPrompt(user)));
  status(`generating (${promptIds.length} prompt tokens)...`);
  const out = await model.generate(promptIds, maxNew, (ids) => {
    reply.textContent = model.tokenizer.decode(Int32Array.from(ids));
  });
  const text = reply.textContent;
  $('speed').textContent = `prefill ${out.prefill_tps.toFixed(1)} tok/s, decode ` +
    `${out.decode_tps === null ? '-' : out.decode_tps.toFixed(1)} tok/s (${out.tokens.length} tokens)`;
  status('ready');
  return { prompt_ids: promptIds, text, ...out };
}

async function main() {
  const query = new URLSearchParams(location.search);
  if ('serviceWorker' in navigator && !query.has('nosw')) {
    await navigator.serviceWorker.register('sw.js').catch((err) => console.warn('no service worker:', err));
  }
  await model.load('model/');
  status(`ready (loaded in ${model.loadSeconds.toFixed(1)} s)`);
  $('prompt').disabled = $('send').disabled = false;
  $('form').addEventListener('submit', async (event) => {
    event.preventDefault();
    const user = $('prompt').value.trim();
    if (!user) return;
    $('prompt').value = '';
    $('send').disabled = true;
    try { await turn(user, Number(query.get('max') || 128)); } finally { $('send').disabled = false; }
  });
  if (query.has('prompt')) {
    // ?runs=N: the same turn N times (each a new sequence); the result is the last one's,
    // with the first's speeds (which include compiling the shaders) as `first`
    const runs = Math.max(1, Number(query.get('runs') || 1));
    let first;
    let result;
    for (let i = 0; i < runs; ++i) {
      result = await turn(query.get('prompt'), Number(query.get('max') || 16));
      first = first || { prefill_tps: result.prefill_tps, decode_tps: result.decode_tps };
    }
    window.qwen35Result = { ...result, first, runs };
  }
}

main().catch((err) => {
  status(`error: ${err.message || err}`);
  window.qwen35Result = { error: String(err && err.stack ? err.stack : err) };
});

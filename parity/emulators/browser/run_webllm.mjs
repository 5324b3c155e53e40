// WebLLM (@mlc-ai/web-llm, as installed in .emulators/browser) loads one of our
// webgpu artifacts in headless Chromium (WebGPU on SwiftShader) through a custom
// app config, as a web app on WebLLM would: `model` = the artifact served here,
// `model_lib` = its model.wasm.  Prints one JSON line:
//   {greedy: {text, ids}, biased: {text, ids}, chat: {text}, stats, console}
// greedy: a text completion of PROMPT, temperature 0, MAX tokens (ignore_eos);
// biased: the same prompt with logit_bias {BIAS_TOKEN: 100}, 2 tokens (each must be
// BIAS_TOKEN: WebLLM's logit processor and sampler ran on our functions);
// chat: a chat completion of 2 tokens through the artifact's conv_template.
//   node run_webllm.mjs ARTIFACT PROMPT_FILE MAX BIAS_TOKEN [--timeout SECONDS]
// Env: QWEN35_CHROMIUM (default /usr/bin/chromium), QWEN35_PLAYWRIGHT (playwright-core),
// QWEN35_WEBLLM (web-llm's lib/index.js).
import { createReadStream, existsSync, readFileSync, statSync } from 'node:fs';
import { createServer } from 'node:http';
import { createRequire } from 'node:module';
import { join, normalize } from 'node:path';

import { launchChromium } from './chromium.mjs';

const require = createRequire(import.meta.url);
const { chromium } = require(process.env.QWEN35_PLAYWRIGHT || 'playwright-core');
const args = process.argv.slice(2);
const [artifact, promptFile, maxTokens, biasToken] = args;
const opt = (name) => { const i = args.indexOf(name); return i >= 0 ? args[i + 1] : undefined; };
const timeout = Number(opt('--timeout') || 900) * 1000;
const prompt = readFileSync(promptFile, 'utf8');

// The page, WebLLM's bundle, and the artifact where WebLLM looks for a model:
// <model>/resolve/main/<file> (it appends resolve/main/ to a model URL).
const PAGE = `<!doctype html><meta charset="utf-8"><title>WebLLM</title>
<script type="module">import * as webllm from '/webllm.js'; window.webllm = webllm;</script>`;
const TYPES = { '.js': 'text/javascript', '.json': 'application/json', '.wasm': 'application/wasm' };
const server = createServer((req, res) => {
  const path = decodeURIComponent(new URL(req.url, 'http://x').pathname);
  let file;
  if (path === '/') {
    res.writeHead(200, { 'content-type': 'text/html' });
    res.end(PAGE);
    return;
  } else if (path === '/webllm.js') {
    file = process.env.QWEN35_WEBLLM;
  } else if (path === '/model.wasm') {
    file = join(artifact, 'model.wasm');
  } else if (path.startsWith('/model/resolve/main/')) {
    const rel = normalize(path.slice('/model/resolve/main/'.length));
    if (!rel.startsWith('..')) file = join(artifact, rel);
  }
  if (!file || !existsSync(file) || !statSync(file).isFile()) {
    res.writeHead(404);
    res.end();
    return;
  }
  const ext = file.slice(file.lastIndexOf('.'));
  res.writeHead(200, { 'content-type': TYPES[ext] || 'application/octet-stream',
                       'content-length': statSync(file).size });
  createReadStream(file).pipe(res);
});
await new Promise((ok) => server.listen(0, '127.0.0.1', ok));
const origin = `http://127.0.0.1:${server.address().port}`;

const browser = await launchChromium(chromium);
const out = {};
const console_ = [];
try {
  const page = await browser.newPage();
  page.setDefaultTimeout(timeout);
  page.on('console', (m) => console_.push(`${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => console_.push(`pageerror: ${e.message}`));
  await page.goto(origin + '/');
  await page.waitForFunction(() => window.webllm !== undefined);
  Object.assign(out, await page.evaluate(async ({ origin, prompt, max, bias }) => {
    const id = 'qwen35-mobile';
    const engine = await window.webllm.CreateMLCEngine(id, {
      appConfig: {
        model_list: [{ model: `${origin}/model`, model_id: id, model_lib: `${origin}/model.wasm` }],
      },
      logLevel: 'WARN',
    });
    const pipeline = engine.loadedModelIdToPipeline.get(id);  // to read the token ids it sampled
    const plain = { temperature: 0, presence_penalty: 0, frequency_penalty: 0, ignore_eos: true };
    const greedy = await engine.completions.create({ prompt, max_tokens: max, ...plain });
    const greedyIds = [...pipeline.outputIds];
    const biased = await engine.completions.create({
      prompt, max_tokens: 2, ...plain, logit_bias: { [bias]: 100 },
    });
    const biasedIds = [...pipeline.outputIds];
    const chat = await engine.chat.completions.create({
      messages: [{ role: 'user', content: 'Hello' }], max_tokens: 2, ...plain,
    });
    return {
      greedy: { text: greedy.choices[0].text, ids: greedyIds },
      biased: { text: biased.choices[0].text, ids: biasedIds },
      chat: { text: chat.choices[0].message.content },
      stats: greedy.usage,
    };
  }, { origin, prompt, max: Number(maxTokens), bias: Number(biasToken) }));
} catch (err) {
  out.error = String(err && err.stack ? err.stack : err);
} finally {
  out.console = console_.slice(-40);
  await browser.close();
  server.close();
}
process.stdout.write(JSON.stringify(out) + '\n');

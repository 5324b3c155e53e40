// Open the chat page of `qwen35-mobile serve` in headless Chromium (WebGPU on
// SwiftShader), wait for its auto-run turn (?prompt=...&max=N) and print
// window.qwen35Result as JSON; optionally a screenshot, and a second run offline.
//   node run_page.mjs URL [--screenshot FILE] [--offline-rerun] [--timeout SECONDS]
// Env: QWEN35_CHROMIUM (default /usr/bin/chromium), NODE_PATH finds playwright-core.
import { createRequire } from 'node:module';

import { launchChromium } from './chromium.mjs';

const require = createRequire(import.meta.url);
const { chromium } = require(process.env.QWEN35_PLAYWRIGHT || 'playwright-core');
const args = process.argv.slice(2);
const url = args[0];
const opt = (name) => { const i = args.indexOf(name); return i >= 0 ? args[i + 1] : undefined; };
const timeout = Number(opt('--timeout') || 900) * 1000;

const browser = await launchChromium(chromium);
const out = {};
try {
  const context = await browser.newContext({ viewport: { width: 900, height: 640 } });
  const page = await context.newPage();
  const console_ = [];
  page.on('console', (m) => console_.push(`${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => console_.push(`pageerror: ${e.message}`));
  const run = async () => {
    await page.goto(url);
    await page.waitForFunction(() => window.qwen35Result !== undefined, null, { timeout });
    return page.evaluate(() => ({
      ...window.qwen35Result,
      status: document.getElementById('status').textContent,
      speed: document.getElementById('speed').textContent,
      shown: document.getElementById('log').textContent,
      adapter: null,
    }));
  };
  out.online = await run();
  const shot = opt('--screenshot');
  if (shot) await page.screenshot({ path: shot, fullPage: true });
  if (args.includes('--offline-rerun')) {
    await context.setOffline(true);
    try {
      out.offline = await run();
    } catch (err) {
      out.offline = { error: String(err.message || err) };
    }
  }
  out.console = console_.slice(-40);
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(out) + '\n');

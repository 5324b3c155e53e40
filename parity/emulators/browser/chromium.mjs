// Headless Chromium for the browser tests: WebGPU on SwiftShader; the background-networking
// flags keep Chromium off the closed network (otherwise it retries Google's hosts the whole time).
// Env: QWEN35_CHROMIUM (default /usr/bin/chromium).
export function launchChromium(chromium) {
  return chromium.launch({
    executablePath: process.env.QWEN35_CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--enable-unsafe-webgpu', '--use-webgpu-adapter=swiftshader',
           '--enable-features=Vulkan', '--disable-background-networking', '--disable-component-update',
           '--disable-sync', '--no-first-run', '--disable-quic', '--disable-default-apps'],
  });
}

// Offline once loaded: every same-origin GET goes to the network and its answer is
// kept; when the network fails, the kept answer is served.  The weights are cached by tvmjs itself (Cache API,
// scope "qwen35-mobile"), so they are not stored twice.
const CACHE = 'qwen35-mobile-page';
// What the page fetches before this worker controls it (the first visit).
const PAGE = ['./', 'index.html', 'chat.js', 'tvmjs.bundle.js', 'tokenizers.js', 'model/manifest.json',
              'model/mlc-chat-config.json', 'model/tokenizer.json', 'model/model.wasm'];
self.addEventListener('install', (e) => e.waitUntil((async () => {
  const cache = await caches.open(CACHE);
  await cache.addAll(PAGE);
  await self.skipWaiting();
})()));
self.addEventListener('activate', (e) => e.waitUntil(self.clients.claim()));
self.addEventListener('fetch', (event) => {
  const url = new URL(event.request.url);
  if (event.request.method !== 'GET' || url.origin !== location.origin) return;
  if (/params_shard_|tensor-cache\.json/.test(url.pathname)) return;
  event.respondWith((async () => {
    const cache = await caches.open(CACHE);
    try {
      const response = await fetch(event.request);
      if (response.ok) await cache.put(event.request, response.clone());
      return response;
    } catch (err) {
      const hit = await cache.match(event.request, { ignoreSearch: true });
      if (hit) return hit;
      throw err;
    }
  })());
});

// api.js: every request the console makes goes through here, so every one
// carries the bearer token once the daemon asks for one. The token is typed
// once, kept in sessionStorage (this tab only, never in a URL), and asked
// again only if the daemon refuses it.
const KEY = 'ebb.token';
let tokenRequired = false;
let asking = null;

export function token() { return sessionStorage.getItem(KEY) || ''; }

function askToken(why) {
  if (asking) return asking;
  const dialog = document.getElementById('token-dialog');
  const form = document.getElementById('token-form');
  const input = document.getElementById('token-input');
  if (why) document.getElementById('token-why').textContent = why;
  asking = new Promise((resolve) => {
    form.addEventListener('submit', () => {
      sessionStorage.setItem(KEY, input.value);
      input.value = '';
      asking = null;
      resolve();
    }, { once: true });
  });
  // Escape would close the dialog with no token and leave every call waiting.
  dialog.addEventListener('cancel', (e) => e.preventDefault());
  if (!dialog.open) dialog.showModal();
  input.focus();
  return asking;
}

// /health is public (it is what load balancers poll): the one call that may
// go without a token, made once at start to learn whether one is needed.
export async function start() {
  const headers = token() ? { Authorization: 'Bearer ' + token() } : {};
  const r = await fetch('/health', { headers, cache: 'no-store' });
  const h = await r.json();
  tokenRequired = !!h.token_required;
  if (tokenRequired && !token()) await askToken();
  return h;
}

function headersFor(extra) {
  const h = new Headers(extra || {});
  if (token()) h.set('Authorization', 'Bearer ' + token());
  return h;
}

// One request. Resolves to {status, ok, data (parsed JSON or null), text}.
export async function api(path, opts = {}) {
  if (tokenRequired && !token()) await askToken();
  const headers = headersFor(opts.headers);
  let body;
  if (opts.json !== undefined) {
    headers.set('Content-Type', 'application/json');
    body = JSON.stringify(opts.json);
  }
  const r = await fetch(path, { method: opts.method || 'GET', headers, body, signal: opts.signal, cache: 'no-store' });
  if (r.status === 401) {
    sessionStorage.removeItem(KEY);
    tokenRequired = true;
    await askToken('The daemon refused that token. Enter the right one.');
    return api(path, opts);
  }
  const text = await r.text();
  let data = null;
  try { data = JSON.parse(text); } catch { /* not JSON: metrics, or an empty body */ }
  return { status: r.status, ok: r.ok, data, text };
}

// Reads a Server-Sent Events stream with fetch (EventSource cannot send the
// Authorization header). onEvent({id, event, data}) per message; resolves
// when the stream ends or signal aborts it.
export async function sse(path, { lastId, signal, onEvent, onOpen }) {
  if (tokenRequired && !token()) await askToken();
  const headers = headersFor({ Accept: 'text/event-stream' });
  if (lastId != null) headers.set('Last-Event-ID', String(lastId));
  const r = await fetch(path, { headers, signal, cache: 'no-store' });
  if (!r.ok) {
    const text = await r.text();
    throw new Error(`${r.status}: ${text}`);
  }
  if (onOpen) onOpen();
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    let cut;
    while ((cut = buf.indexOf('\n\n')) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const msg = { id: null, event: 'message', data: '' };
      let any = false;
      for (const line of block.split('\n')) {
        if (line.startsWith(':')) continue;
        const i = line.indexOf(':');
        const field = i < 0 ? line : line.slice(0, i);
        const val = i < 0 ? '' : line.slice(i + 1).replace(/^ /, '');
        if (field === 'id') msg.id = val;
        else if (field === 'event') msg.event = val;
        else if (field === 'data') { msg.data += (msg.data ? '\n' : '') + val; any = true; }
      }
      if (any) onEvent(msg);
    }
  }
}

// Calls fn now and then every `ms` (never less than a second), until stop()
// or the page changes; one call at a time, never overlapping.
export function every(ms, fn) {
  const period = Math.max(ms, 1000);
  let stopped = false, timer = null;
  const run = async () => {
    if (stopped) return;
    try { await fn(); } catch (e) { console.error(e); }
    if (!stopped) timer = setTimeout(run, period);
  };
  run();
  return () => { stopped = true; clearTimeout(timer); };
}

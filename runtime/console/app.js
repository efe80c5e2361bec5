// app.js: the console's entry point: the token, the router (#/page...), the
// head position and the banner for anything faulted or stalled, shown on
// every page. Each page is a module exporting render(main, hash) which may
// return a function that stops what it started (polls, streams).
import { api, every, start } from './api.js';
import { el } from './util.js';
import * as overview from './overview.js';
import * as streams from './streams.js';
import * as trace from './trace.js';
import * as tail from './tail.js';
import * as aggregate from './aggregate.js';
import * as send from './send.js';
import * as projections from './projections.js';

const pages = { overview, streams, stream: streams, trace, tail, aggregate, send, projections };
let stopPage = null;

function route() {
  const hash = location.hash || '#/overview';
  const name = hash.slice(2).split(/[/?]/)[0] || 'overview';
  const page = pages[name] || overview;
  if (stopPage) stopPage();
  stopPage = null;
  const main = document.getElementById('main');
  main.replaceChildren();
  for (const a of document.querySelectorAll('nav a')) {
    const target = a.getAttribute('href').slice(2);
    if (target === name || (name === 'stream' && target === 'streams')) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  document.body.dataset.page = name;
  const stop = page.render(main, hash);
  stopPage = typeof stop === 'function' ? stop : null;
}

// The banner: faulted or stalled projections (and reactors, where the daemon
// has them), a store that is not ok, a publisher that is not connected.
const STALLED_MS = 30000;
let hasReactors = true;
async function watch() {
  const problems = [];
  const h = await api('/health');
  if (h.data) {
    document.getElementById('head').textContent = `head ${h.data.position}`;
    if (h.data.status !== 'ok') problems.push(`the daemon is ${h.data.status}` + (h.data.reason ? `: ${h.data.reason}` : ''));
    const pub = h.data.publisher || h.data.nats;
    if (pub && pub.state && !/^(ok|connected|live)$/.test(pub.state)) problems.push(`the publisher is ${pub.state}`);
  }
  const p = await api('/projections');
  for (const s of p.data || []) {
    if (s.state === 'faulted') problems.push(['projection ', el('a', { href: '#/projections' }, s.name), ' is faulted']);
    else if (s.lag_ms > STALLED_MS) problems.push(['projection ', el('a', { href: '#/projections' }, s.name), ` is stalled (${s.lag_events} events behind)`]);
  }
  if (hasReactors) {
    const r = await api('/reactors');
    if (r.status === 404) hasReactors = false; // a daemon without reactors: stop asking
    const list = Array.isArray(r.data) ? r.data : (r.data && r.data.reactors) || [];
    for (const s of r.status === 200 ? list : []) {
      if (s.state === 'faulted') problems.push(['reactor ', el('a', { href: '#/projections' }, s.name), ' is faulted']);
    }
  }
  const banner = document.getElementById('banner');
  banner.replaceChildren(...problems.map((x) => el('div', x)));
  banner.hidden = problems.length === 0;
}

async function main() {
  try {
    await start();
  } catch (e) {
    document.getElementById('main').replaceChildren(el('p.error', `cannot reach the daemon: ${e.message}`));
    return;
  }
  window.addEventListener('hashchange', route);
  route();
  every(3000, watch);
}

main();

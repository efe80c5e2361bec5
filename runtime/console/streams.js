// streams.js: #/streams (browse names by category or prefix, paged) and
// #/stream/NAME (its events, paged, with data and metadata).
import { api } from './api.js';
import { aggregateOf, el, errorText, eventCard, params, when } from './util.js';

const PAGE = 50;

function list(main, hash) {
  const p = params(hash);
  const category = el('input', { id: 'f-category', name: 'category', value: p.get('category') || '', placeholder: 'Order' });
  const prefix = el('input', { id: 'f-prefix', name: 'prefix', value: p.get('prefix') || '', placeholder: 'Order-o-1' });
  const form = el('form.bar', { role: 'search' },
    el('label', { for: 'f-category' }, 'Category', category),
    el('label', { for: 'f-prefix' }, 'Name prefix', prefix),
    el('button', { type: 'submit' }, 'Show'));
  const body = el('tbody');
  const status = el('p.muted', { 'aria-live': 'polite' });
  const prev = el('button.secondary', { type: 'button', disabled: true }, 'Previous page');
  const next = el('button.secondary', { type: 'button', disabled: true }, 'Next page');
  main.append(el('h1', 'Streams'), form,
    el('div.table-wrap', el('table', el('thead', el('tr', el('th', 'Stream'), el('th', 'Version'),
      el('th.wide', 'Positions'), el('th', 'Last event'), el('th', ''))), body)),
    el('div.bar', prev, next), status);
  const pages = [null]; // the after= of each page seen
  let at = 0, nextAfter = null;
  async function load() {
    const q = new URLSearchParams({ limit: PAGE });
    if (category.value) q.set('category', category.value);
    if (prefix.value) q.set('prefix', prefix.value);
    if (pages[at]) q.set('after', pages[at]);
    const r = await api('/streams?' + q);
    if (!r.ok) { status.textContent = errorText(r); status.className = 'error'; return; }
    status.className = 'muted';
    body.replaceChildren(...r.data.streams.map((s) => {
      const agg = aggregateOf(s.stream);
      return el('tr',
        el('td', el('a', { href: '#/stream/' + encodeURIComponent(s.stream) }, s.stream)),
        el('td', String(s.version), s.deleted ? el('span.error', ' deleted') : null),
        el('td.wide', `${s.first_position} - ${s.last_position}`),
        el('td', when(s.last_recorded_at)),
        el('td', agg ? el('a', { href: `#/aggregate?type=${encodeURIComponent(agg.type)}&id=${encodeURIComponent(agg.id)}` }, 'state') : null));
    }));
    nextAfter = r.data.next;
    status.textContent = `${r.data.streams.length} streams on page ${at + 1}`;
    prev.disabled = at === 0;
    next.disabled = nextAfter == null;
  }
  form.addEventListener('submit', (e) => { e.preventDefault(); pages.length = 1; at = 0; load(); });
  next.addEventListener('click', () => { pages[at + 1] = nextAfter; at++; load(); });
  prev.addEventListener('click', () => { at--; load(); });
  load();
}

function one(main, hash) {
  const name = decodeURIComponent(hash.slice('#/stream/'.length).split('?')[0]);
  let from = Number(params(hash).get('from') || 1);
  const agg = aggregateOf(name);
  const info = el('p.muted');
  const events = el('div', { 'aria-live': 'polite', id: 'st-events' });
  const raw = el('input', { type: 'checkbox', id: 'st-raw', name: 'raw' });
  const prev = el('button.secondary', { type: 'button' }, 'Earlier');
  const next = el('button.secondary', { type: 'button' }, 'Later');
  main.append(el('h1', 'Stream ', name), info,
    agg ? el('p', el('a', { href: `#/aggregate?type=${encodeURIComponent(agg.type)}&id=${encodeURIComponent(agg.id)}` }, 'State and time travel')) : null,
    el('label.inline', { for: 'st-raw' }, raw, 'Show events as stored (raw), not upcast to their current schemas'),
    events, el('div.bar', prev, next));
  raw.addEventListener('change', load);
  async function load() {
    const r = await api(`/streams/${encodeURIComponent(name)}?from=${from}&limit=${PAGE}${raw.checked ? '&raw=true' : ''}`);
    if (!r.ok) { events.replaceChildren(el('p.error', errorText(r))); return; }
    info.textContent = `version ${r.data.version}${r.data.deleted ? ', deleted' : ''}; events ${from} to ${Math.min(r.data.version, from + PAGE - 1)}`;
    events.replaceChildren(...r.data.events.map((e) => eventCard(e)));
    prev.disabled = from <= 1;
    next.disabled = from + PAGE > r.data.version;
  }
  prev.addEventListener('click', () => { from = Math.max(1, from - PAGE); load(); });
  next.addEventListener('click', () => { from += PAGE; load(); });
  load();
}

export function render(main, hash) {
  if (hash.startsWith('#/stream/')) one(main, hash);
  else list(main, hash);
}
